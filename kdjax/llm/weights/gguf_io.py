"""llama.cpp GGUF files -> (LlamaConfig, params), through kdjax.llm.weights.convert's HF layout.

`gguf_getter` returns each tensor HF-named and in HF layout (dequantized with gguf.quants, the q/k
row permutation llama.cpp applies undone: `unpermute_qk`), so `convert._params_from_hf_tensors`
builds the canonical tree exactly as it does for safetensors.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from kdjax.cli import UserError
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.weights.convert import Getter, _layer_names, _params_from_hf_tensors


def open_gguf(path: str):
  """A gguf.GGUFReader, with any failure (missing, truncated, not GGUF) as a UserError naming path.

  One reader per file and version of it (path, size, mtime, inode) in a process: describe_spec,
  validate_spec, load_model and the tokenizer each open the file. The reader slices its bytes as a
  plain ndarray view of the memmap: gguf slices np.memmap once per part of every field (147k for
  SmolLM2's 49k tokens and 48k merges), and memmap's __getitem__ / __array_finalize__ made that
  3.2 CPU seconds a reader against 1.1 (the same fields and tensor bytes)."""
  if not os.path.isfile(path):
    raise UserError(f"gguf:{path}: no such file")
  st = os.stat(path)
  return _open_gguf(path, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4)
def _open_gguf(path: str, *version):
  import gguf

  class PlainReader(gguf.GGUFReader):
    @property
    def data(self):
      return self._plain

    @data.setter
    def data(self, memmap):
      self._plain = memmap.view(np.ndarray)  # the memmap stays alive as its base

  try:
    return PlainReader(path)
  except Exception as e:  # the reader raises ValueError/KeyError/IndexError/... on bad bytes
    raise UserError(f"gguf:{path}: not a readable GGUF file (truncated or corrupt?): "
                    f"{type(e).__name__}: {e}") from None


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def _f32_to_float(x) -> float:
  """GGUF stores these as float32: 1e-5 reads back as 9.9999997e-06. Keep float32's 7 digits."""
  return float(f"{float(x):.7g}")


def config_from_gguf(reader, path: str) -> LlamaConfig:
  """LlamaConfig from the llama.* metadata of a GGUF; refuses other architectures."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise UserError(f"gguf:{path}: general.architecture is {arch!r}; only 'llama' GGUFs are supported")
  scaling = _field(reader, "llama.rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise UserError(f"gguf:{path}: rope scaling {scaling!r} is not supported")

  def get(key, required=True):
    value = _field(reader, "llama." + key)
    if value is None and required:
      raise UserError(f"gguf:{path}: metadata llama.{key} is missing")
    return value

  try:
    d, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", False) or d // heads)
    rot = get("rope.dimension_count", False)
    if rot is not None and int(rot) != head_dim:
      raise UserError(f"gguf:{path}: partial rotary ({rot} of {head_dim} dims) is not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else int(get("vocab_size"))
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", False) or heads), head_dim=head_dim,
        rope_theta=_f32_to_float(get("rope.freq_base", False) or 10000.0),
        rms_norm_eps=_f32_to_float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length")),
        tie_embeddings="output.weight" not in names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)))
  except (TypeError, ValueError) as e:
    raise UserError(f"gguf:{path}: unusable llama metadata ({type(e).__name__}: {e})") from None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation: [n*E, D] interleaved pairs -> HF rotate-half rows.

  llama.cpp's convert_hf_to_gguf.py applies, to Wq (n = heads) and Wk (n = kv heads),
      w.reshape(n, 2, E // 2, D).swapaxes(1, 2).reshape(n * E, D)
  so that within each head, rows (i, i + E/2) of HF's rotate-half layout become the adjacent pair
  (2i, 2i + 1) that ggml's interleaved rope rotates together. Our rotary (kdjax.llm.model.llama.rotary)
  follows HF and rotates the two halves, so we swap the axes back:
      w.reshape(n, E // 2, 2, D).swapaxes(1, 2).reshape(n * E, D).
  Leaving the rows permuted gives a model that runs but whose attention is scrambled by position
  (tests/test_llm_real_checkpoint.py would catch it: log-probs far from transformers').
  """
  rows, d = w.shape
  e = rows // n_heads
  return w.reshape(n_heads, e // 2, 2, d).swapaxes(1, 2).reshape(rows, d)


_GGUF_NAMES = {
    "attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "mlp_norm": "ffn_norm", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
}


def _gguf_names(config: LlamaConfig) -> dict[str, str]:
  """HF tensor name -> GGUF tensor name."""
  to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
  for i in range(config.num_layers):
    for ours, hf_name in _layer_names(i).items():
      to_gguf[hf_name] = f"blk.{i}.{_GGUF_NAMES[ours]}.weight"
  return to_gguf


def gguf_tensor_shapes(reader, config: LlamaConfig) -> dict[str, tuple]:
  """HF name -> HF shape of the tensors a GGUF holds (GGUF lists dims fastest-first)."""
  shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}
  return {hf: shapes[g] for hf, g in _gguf_names(config).items() if g in shapes}


def gguf_getter(reader, config: LlamaConfig, path: str) -> Getter:
  """HF-named, HF-layout float32 tensors from a GGUF (dequantized with gguf.quants, q/k unpermuted)."""
  from gguf import quants
  tensors = {t.name: t for t in reader.tensors}
  to_gguf = _gguf_names(config)

  def get(name: str) -> np.ndarray:
    g = to_gguf.get(name)
    if g not in tensors:
      raise UserError(f"gguf:{path}: tensor {g or name} is missing")
    t = tensors[g]
    try:
      w = quants.dequantize(t.data, t.tensor_type)
      # GGUF lists dims fastest-first (ne0 = in features); numpy's shape is the reverse, [out, in].
      w = np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    except (NotImplementedError, ValueError) as e:
      raise UserError(f"gguf:{path}: cannot dequantize {g} ({t.tensor_type.name}): {e}") from None
    if ".attn_q." in g:
      w = unpermute_qk(w, config.num_heads)
    elif ".attn_k." in g:
      w = unpermute_qk(w, config.num_kv_heads)
    return w

  return get


def load_gguf(path: str) -> tuple[LlamaConfig, dict]:
  """(config, params) from a llama.cpp GGUF file (any quantization gguf.quants can dequantize)."""
  reader = open_gguf(path)
  config = config_from_gguf(reader, path)
  return config, _params_from_hf_tensors(config, gguf_getter(reader, config, path), f"gguf:{path}")
