"""Weights in and out: GGUF (llama.cpp) and HF (config.json + safetensors) <-> (LlamaConfig, params).

Every reader first builds a function `get(hf_name) -> np.ndarray` that returns a tensor in
transformers' LlamaForCausalLM layout ([out, in] matrices, HF's rotate-half rotary convention);
`_params_from_hf_tensors` then fills the canonical stacked tree of kdjax.llm.model (one layer at a
time into preallocated [L, ...] arrays, so peak memory is about one copy of the model).
Params come back as float32 numpy arrays; `kdjax.llm.loading.load_model` puts them on device.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from kdjax.cli import UserError, atomic_write_json
from kdjax.llm.config import LlamaConfig

Getter = Callable[[str], np.ndarray]

# ----------------------------------------------------------------------------- HF layout <-> ours


def _layer_names(i: int) -> dict[str, str]:
  p = f"model.layers.{i}."
  return {
      "attn_norm": p + "input_layernorm.weight",
      "q": p + "self_attn.q_proj.weight",
      "k": p + "self_attn.k_proj.weight",
      "v": p + "self_attn.v_proj.weight",
      "o": p + "self_attn.o_proj.weight",
      "mlp_norm": p + "post_attention_layernorm.weight",
      "gate": p + "mlp.gate_proj.weight",
      "up": p + "mlp.up_proj.weight",
      "down": p + "mlp.down_proj.weight",
  }


def _check_shape(name: str, x: np.ndarray, shape: tuple, source: str) -> np.ndarray:
  if tuple(x.shape) != tuple(shape):
    raise UserError(f"{source}: tensor {name} has shape {tuple(x.shape)}, the config implies {tuple(shape)}")
  return x


def _params_from_hf_tensors(config: LlamaConfig, get: Getter, source: str) -> dict:
  """The canonical parameter tree from HF-layout tensors, converted one layer at a time."""
  c = config
  d, f, v, h, k, e, n = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                         c.num_kv_heads, c.head_dim, c.num_layers)
  f32 = lambda name, shape: _check_shape(name, np.asarray(get(name), np.float32), shape, source)
  layers = {
      "attn_norm": {"scale": np.empty((n, d), np.float32)},
      "attn": {"q": {"kernel": np.empty((n, d, h, e), np.float32)},
               "k": {"kernel": np.empty((n, d, k, e), np.float32)},
               "v": {"kernel": np.empty((n, d, k, e), np.float32)},
               "o": {"kernel": np.empty((n, h, e, d), np.float32)}},
      "mlp_norm": {"scale": np.empty((n, d), np.float32)},
      "mlp": {"gate": {"kernel": np.empty((n, d, f), np.float32)},
              "up": {"kernel": np.empty((n, d, f), np.float32)},
              "down": {"kernel": np.empty((n, f, d), np.float32)}},
  }
  for i in range(n):
    nm = _layer_names(i)
    layers["attn_norm"]["scale"][i] = f32(nm["attn_norm"], (d,))
    layers["mlp_norm"]["scale"][i] = f32(nm["mlp_norm"], (d,))
    # HF Linear weights are [out, in]; our kernels are [in, out] with the head axes split out.
    layers["attn"]["q"]["kernel"][i] = f32(nm["q"], (h * e, d)).T.reshape(d, h, e)
    layers["attn"]["k"]["kernel"][i] = f32(nm["k"], (k * e, d)).T.reshape(d, k, e)
    layers["attn"]["v"]["kernel"][i] = f32(nm["v"], (k * e, d)).T.reshape(d, k, e)
    layers["attn"]["o"]["kernel"][i] = f32(nm["o"], (d, h * e)).T.reshape(h, e, d)
    layers["mlp"]["gate"]["kernel"][i] = f32(nm["gate"], (f, d)).T
    layers["mlp"]["up"]["kernel"][i] = f32(nm["up"], (f, d)).T
    layers["mlp"]["down"]["kernel"][i] = f32(nm["down"], (d, f)).T
  params = {
      "embed": {"embedding": f32("model.embed_tokens.weight", (v, d))},
      "layers": layers,
      "final_norm": {"scale": f32("model.norm.weight", (d,))},
  }
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(f32("lm_head.weight", (v, d)).T)}
  return params


def _hf_tensors_from_params(config: LlamaConfig, params) -> dict[str, np.ndarray]:
  """The inverse of _params_from_hf_tensors: HF names -> float32 [out, in] arrays."""
  c = config
  d, h, k, e = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  a = lambda x: np.asarray(x, np.float32)
  lay = params["layers"]
  out = {"model.embed_tokens.weight": a(params["embed"]["embedding"]),
         "model.norm.weight": a(params["final_norm"]["scale"])}
  stacked = {name: a(x) for name, x in [
      ("attn_norm", lay["attn_norm"]["scale"]), ("mlp_norm", lay["mlp_norm"]["scale"]),
      ("q", lay["attn"]["q"]["kernel"]), ("k", lay["attn"]["k"]["kernel"]),
      ("v", lay["attn"]["v"]["kernel"]), ("o", lay["attn"]["o"]["kernel"]),
      ("gate", lay["mlp"]["gate"]["kernel"]), ("up", lay["mlp"]["up"]["kernel"]),
      ("down", lay["mlp"]["down"]["kernel"])]}
  for i in range(c.num_layers):
    nm = _layer_names(i)
    out[nm["attn_norm"]] = stacked["attn_norm"][i]
    out[nm["mlp_norm"]] = stacked["mlp_norm"][i]
    out[nm["q"]] = stacked["q"][i].reshape(d, h * e).T
    out[nm["k"]] = stacked["k"][i].reshape(d, k * e).T
    out[nm["v"]] = stacked["v"][i].reshape(d, k * e).T
    out[nm["o"]] = stacked["o"][i].reshape(h * e, d).T
    for name in ("gate", "up", "down"):
      out[nm[name]] = stacked[name][i].T
  if not c.tie_embeddings:
    out["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


# ----------------------------------------------------------------------------- HF directories


def config_from_hf_dict(hf: dict, source: str) -> LlamaConfig:
  """LlamaConfig from a transformers config.json dict; refuses other architectures and features."""
  archs = hf.get("architectures") or []
  if hf.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
    raise UserError(f"{source}: model_type={hf.get('model_type')!r} architectures={archs}; "
                    "only Llama (LlamaForCausalLM) checkpoints are supported")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise UserError(f"{source}: rope type {rope_type!r} is not supported (only plain rotary)")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise UserError(f"{source}: attention_bias/mlp_bias are not supported")
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"{source}: hidden_act={hf.get('hidden_act')!r}; only silu is supported")
  try:
    heads = int(hf["num_attention_heads"])
    d = int(hf["hidden_size"])
    eos = hf.get("eos_token_id", 2)
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=d,
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or d // heads),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1),
        eos_token_id=int((eos[0] if isinstance(eos, list) else eos) if eos is not None else 2))
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{source}: not a usable Llama config ({type(e).__name__}: {e})") from None


def read_hf_config(folder: str) -> LlamaConfig:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"hf:{folder}: no config.json in {folder}" if os.path.isdir(folder)
                    else f"hf:{folder}: no such directory")
  try:
    with open(path) as fh:
      hf = json.load(fh)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable JSON ({e})") from None
  if not isinstance(hf, dict):
    raise UserError(f"{path}: expected a JSON object")
  return config_from_hf_dict(hf, path)


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_safetensors_index(path: str) -> dict[str, Callable[[], np.ndarray]]:
  """name -> loader for one .safetensors file (memory-mapped; bfloat16 via ml_dtypes).

  Parsed by hand (8-byte header length, JSON header, raw bytes) because safetensors' numpy
  backend cannot return bfloat16, the dtype most HF checkpoints ship in.
  """
  import ml_dtypes
  dtypes = dict(_ST_DTYPES, BF16=ml_dtypes.bfloat16)
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      n = int.from_bytes(fh.read(8), "little")
      if n <= 0 or 8 + n > size:
        raise ValueError("bad header length")
      header = json.loads(fh.read(n))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable safetensors file ({e})") from None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    if info["dtype"] not in dtypes or end > data.size:
      raise UserError(f"{path}: tensor {name} has dtype {info['dtype']} or lies past the end of the file")
    dtype, shape = dtypes[info["dtype"]], tuple(info["shape"])
    out[name] = lambda s=start, e=end, dt=dtype, sh=shape: data[s:e].view(dt).reshape(sh)
  return out


def hf_getter(folder: str) -> Getter:
  """Tensor getter over a HF dir: model.safetensors, or the shards of model.safetensors.index.json."""
  index_path = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    try:
      with open(index_path) as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise UserError(f"{index_path}: unreadable safetensors index ({e})") from None
  else:
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  if not files:
    raise UserError(f"hf:{folder}: no *.safetensors weights in {folder}")
  loaders = {}
  for name in files:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise UserError(f"{index_path}: lists {name}, which is missing")
    loaders.update(_read_safetensors_index(path))

  def get(name: str) -> np.ndarray:
    if name not in loaders:
      raise UserError(f"hf:{folder}: tensor {name} is missing from the safetensors files")
    return loaders[name]()

  return get


def load_hf(folder: str) -> tuple[LlamaConfig, dict]:
  """(config, params) from a transformers Llama directory (config.json + *.safetensors)."""
  config = read_hf_config(folder)
  return config, _params_from_hf_tensors(config, hf_getter(folder), f"hf:{folder}")


def hf_config_dict(config: LlamaConfig) -> dict:
  """config.json for transformers' LlamaForCausalLM (both the v4 and v5 spellings of rope)."""
  c = config
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu",
      "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "rope_scaling": None,
      "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
      "eos_token_id": c.eos_token_id, "torch_dtype": "float32", "dtype": "float32",
      "use_cache": True,
  }


def save_hf(config: LlamaConfig, params, folder: str, tokenizer=None) -> None:
  """Write config.json + model.safetensors (float32) that transformers' LlamaForCausalLM loads.

  With a transformers `tokenizer`, also saves it there, so `hf:folder` is self-contained.
  """
  from safetensors.numpy import save_file
  os.makedirs(folder, exist_ok=True)
  tensors = _hf_tensors_from_params(config, params)
  path = os.path.join(folder, "model.safetensors")
  tmp = path + ".tmp"
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, path)  # readers never see half a file
  atomic_write_json(os.path.join(folder, "config.json"), hf_config_dict(config))
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- GGUF


def open_gguf(path: str):
  """A gguf.GGUFReader, with any failure (missing, truncated, not GGUF) as a UserError naming path."""
  import gguf
  if not os.path.isfile(path):
    raise UserError(f"gguf:{path}: no such file")
  try:
    return gguf.GGUFReader(path)
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
  (2i, 2i + 1) that ggml's interleaved rope rotates together. Our rotary (kdjax.llm.model.rotary)
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


def gguf_getter(reader, config: LlamaConfig, path: str) -> Getter:
  """HF-named, HF-layout float32 tensors from a GGUF (dequantized with gguf.quants, q/k unpermuted)."""
  from gguf import quants
  tensors = {t.name: t for t in reader.tensors}
  to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
  for i in range(config.num_layers):
    for ours, hf_name in _layer_names(i).items():
      to_gguf[hf_name] = f"blk.{i}.{_GGUF_NAMES[ours]}.weight"

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
