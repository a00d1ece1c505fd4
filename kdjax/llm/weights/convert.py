"""Weights in and out: HF (config.json + safetensors) <-> (LlamaConfig, params); GGUF files are read
into the same HF layout by kdjax.llm.weights.gguf_io.

Every reader first builds a function `get(hf_name) -> np.ndarray` that returns a tensor in
transformers' LlamaForCausalLM layout ([out, in] matrices, HF's rotate-half rotary convention);
`_params_from_hf_tensors` then fills the canonical stacked tree of kdjax.llm.model.llama (one layer at a
time into preallocated [L, ...] arrays, so peak memory is about one copy of the model).
Params come back as float32 numpy arrays; `kdjax.llm.weights.loading.load_model` puts them on device.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from kdjax.cli import UserError, atomic_write_json
from kdjax.llm.model.config import LlamaConfig

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


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple]:
  """Every HF-named tensor a Llama of `config` is read from, with its HF shape ([out, in])."""
  c = config
  d, f, v, h, k, e = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                      c.num_kv_heads, c.head_dim)
  layer = {"attn_norm": (d,), "mlp_norm": (d,), "q": (h * e, d), "k": (k * e, d),
           "v": (k * e, d), "o": (d, h * e), "gate": (f, d), "up": (f, d), "down": (d, f)}
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(c.num_layers):
    shapes.update({name: layer[ours] for ours, name in _layer_names(i).items()})
  if not c.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


def check_tensor_shapes(config: LlamaConfig, shapes: dict[str, tuple], source: str) -> None:
  """Refuse a checkpoint whose tensor table (HF name -> shape) lacks a tensor `config` needs or
  holds it in another shape: what loading it would find, found without reading the weights."""
  for name, want in hf_tensor_shapes(config).items():
    if name not in shapes:
      raise UserError(f"{source}: tensor {name} is missing")
    if tuple(shapes[name]) != want:
      raise UserError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, the config "
                      f"implies {want}")


def _params_from_hf_tensors(config: LlamaConfig, get: Getter, source: str) -> dict:
  """The canonical parameter tree from HF-layout tensors, converted one layer at a time."""
  c = config
  d, f, v, h, k, e, n = (c.hidden_size, c.intermediate_size, c.vocab_size, c.num_heads,
                         c.num_kv_heads, c.head_dim, c.num_layers)
  shapes = hf_tensor_shapes(config)
  f32 = lambda name: _check_shape(name, np.asarray(get(name), np.float32), shapes[name], source)
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
    layers["attn_norm"]["scale"][i] = f32(nm["attn_norm"])
    layers["mlp_norm"]["scale"][i] = f32(nm["mlp_norm"])
    # HF Linear weights are [out, in]; our kernels are [in, out] with the head axes split out.
    layers["attn"]["q"]["kernel"][i] = f32(nm["q"]).T.reshape(d, h, e)
    layers["attn"]["k"]["kernel"][i] = f32(nm["k"]).T.reshape(d, k, e)
    layers["attn"]["v"]["kernel"][i] = f32(nm["v"]).T.reshape(d, k, e)
    layers["attn"]["o"]["kernel"][i] = f32(nm["o"]).T.reshape(h, e, d)
    layers["mlp"]["gate"]["kernel"][i] = f32(nm["gate"]).T
    layers["mlp"]["up"]["kernel"][i] = f32(nm["up"]).T
    layers["mlp"]["down"]["kernel"][i] = f32(nm["down"]).T
  params = {
      "embed": {"embedding": f32("model.embed_tokens.weight")},
      "layers": layers,
      "final_norm": {"scale": f32("model.norm.weight")},
  }
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(f32("lm_head.weight").T)}
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


def _read_safetensors_index(path: str) -> dict[str, tuple[tuple, Callable[[], np.ndarray]]]:
  """name -> (shape, loader) for one .safetensors file (memory-mapped; bfloat16 via ml_dtypes).

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
    out[name] = (shape, lambda s=start, e=end, dt=dtype, sh=shape: data[s:e].view(dt).reshape(sh))
  return out


def hf_tensor_table(folder: str) -> dict[str, tuple[tuple, Callable[[], np.ndarray]]]:
  """name -> (shape, loader) over a HF dir: model.safetensors, or the shards of
  model.safetensors.index.json (headers only: no weights are read)."""
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
  return loaders


def hf_getter(folder: str) -> Getter:
  """Tensor getter over a HF dir (hf_tensor_table)."""
  loaders = hf_tensor_table(folder)

  def get(name: str) -> np.ndarray:
    if name not in loaders:
      raise UserError(f"hf:{folder}: tensor {name} is missing from the safetensors files")
    return loaders[name][1]()

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
