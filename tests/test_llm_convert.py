"""Round trip: tiny random transformers Llama -> ours (hf:) -> logits match -> save_hf -> transformers.

Several kv-head counts (MHA, GQA, MQA), tied and untied, a non-default rope theta, randomised norm
scales (so a swapped or mis-transposed tensor cannot hide behind a near-identity weight), and
sharded safetensors. float32 throughout, eager attention on the torch side.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdjax.llm import forward, load_model, save_hf  # noqa: E402
from kdjax.llm.weights import convert  # noqa: E402
from kdjax.llm.weights import gguf_io
from kdjax.llm.weights.loading import validate_spec  # noqa: E402

TOL = 1e-4


def _random_hf_llama(num_kv_heads: int, tied: bool, seed: int):
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=12,
      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
      bos_token_id=1, eos_token_id=2, pad_token_id=None)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def _ids(vocab: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, size=(2, 11)).astype(np.int32)


@pytest.mark.parametrize("num_kv_heads,tied", [(4, False), (2, True), (1, False), (2, False), (4, True)])
def test_round_trip(tmp_path, num_kv_heads, tied):
  model = _random_hf_llama(num_kv_heads, tied, seed=num_kv_heads * 10 + tied)
  src = tmp_path / "hf_in"
  model.save_pretrained(src, safe_serialization=True)
  ids = _ids(96, seed=num_kv_heads)
  ref = _torch_logits(model, ids)

  config, params = load_model(f"hf:{src}")
  assert (config.num_kv_heads, config.tie_embeddings, config.rope_theta, config.head_dim) == (
      num_kv_heads, tied, 500.0, 12)
  assert validate_spec(f"hf:{src}") == config  # the pre-flight check accepts what loads
  assert ("lm_head" in params) == (not tied)
  ours = np.asarray(forward(config, params, jnp.asarray(ids)))
  assert np.abs(ours - ref).max() < TOL
  assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero logits

  out = tmp_path / "hf_out"
  save_hf(config, params, str(out))
  back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                       dtype=torch.float32).eval()
  assert back.config.tie_word_embeddings == tied
  assert np.abs(_torch_logits(back, ids) - ref).max() < TOL
  # and ours reads its own export back exactly
  config2, params2 = load_model(f"hf:{out}")
  assert config2 == config == validate_spec(f"hf:{out}")
  np.testing.assert_array_equal(np.asarray(params2["layers"]["attn"]["k"]["kernel"]),
                                np.asarray(params["layers"]["attn"]["k"]["kernel"]))


def test_sharded_safetensors(tmp_path):
  model = _random_hf_llama(2, False, seed=7)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  config, params = load_model(f"hf:{tmp_path}")
  assert validate_spec(f"hf:{tmp_path}") == config
  ids = _ids(96, seed=3)
  assert np.abs(np.asarray(forward(config, params, jnp.asarray(ids)))
                - _torch_logits(model, ids)).max() < TOL


def test_bfloat16_safetensors(tmp_path):
  """HF checkpoints usually ship bfloat16, which safetensors' numpy backend cannot read."""
  model = _random_hf_llama(1, True, seed=5)
  model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
  config, params = load_model(f"hf:{tmp_path}")
  want = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["down"]["kernel"][1]), want)


def test_save_hf_config_json(tmp_path):
  model = _random_hf_llama(2, True, seed=1)
  model.save_pretrained(tmp_path / "a", safe_serialization=True)
  config, params = load_model(f"hf:{tmp_path / 'a'}")
  save_hf(config, params, str(tmp_path / "b"))
  written = json.loads((tmp_path / "b" / "config.json").read_text())
  assert written["architectures"] == ["LlamaForCausalLM"]
  assert written["torch_dtype"] == "float32" and written["tie_word_embeddings"] is True
  assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "model.safetensors"]
  # tied: the export carries no lm_head tensor, transformers ties it
  names = convert._read_safetensors_index(str(tmp_path / "b" / "model.safetensors"))
  assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_unpermute_inverts_llama_cpp_permutation():
  """llama.cpp's convert_hf_to_gguf permute(), written out here, then our inverse."""
  rng = np.random.default_rng(0)
  n_heads, e, d = 3, 8, 5
  w_hf = rng.normal(size=(n_heads * e, d)).astype(np.float32)
  w_gguf = w_hf.reshape(n_heads, 2, e // 2, d).swapaxes(1, 2).reshape(n_heads * e, d)
  assert not np.array_equal(w_gguf, w_hf)
  np.testing.assert_array_equal(gguf_io.unpermute_qk(w_gguf, n_heads), w_hf)
  # the interleaved pair (2i, 2i+1) of a GGUF head is HF's (i, i + E/2)
  np.testing.assert_array_equal(w_gguf[2], w_hf[1])
  np.testing.assert_array_equal(w_gguf[3], w_hf[1 + e // 2])


def test_ckpt_spec(tmp_path):
  """ckpt:DIR goes through kdjax.checkpoint; describe_spec reads only model_config.json + meta.json."""
  from kdjax import checkpoint
  from kdjax.cli import UserError
  from kdjax.llm import describe_spec, load_tokenizer
  config, params = load_model("preset:test-tiny-untied@3")
  missing_tok = str(tmp_path / "no-tokenizer-here")
  checkpoint.export_model(str(tmp_path / "ck"), config, params, meta={"tokenizer": f"hf:{missing_tok}"})
  described, info = describe_spec(f"ckpt:{tmp_path / 'ck'}")
  assert described == config and info["tokenizer"] == f"hf:{missing_tok}"
  config2, params2 = load_model(f"ckpt:{tmp_path / 'ck'}")
  assert config2 == config == validate_spec(f"ckpt:{tmp_path / 'ck'}")
  np.testing.assert_array_equal(np.asarray(params2["lm_head"]["kernel"]),
                                np.asarray(params["lm_head"]["kernel"]))
  with pytest.raises(UserError, match="no-tokenizer-here"):  # the recorded tokenizer is the one used
    load_tokenizer(f"ckpt:{tmp_path / 'ck'}")
  with pytest.raises(UserError, match="model_config.json"):
    describe_spec(f"ckpt:{tmp_path}")
