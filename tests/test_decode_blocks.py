"""kdjax.llm.model.decode's KV cache in blocks: a step reads only the blocks filled so far, any
block size gives the model's logits and the same samples, and decode_cost counts what a call runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.llm import forward, get_preset, init_params
from kdjax.llm.model import decode
from kdjax.llm.model.sampling import decode_cost, decode_logits, sample

CONFIG = get_preset("test-tiny")


@pytest.fixture(scope="module")
def params():
  p = init_params(CONFIG, jax.random.key(0))
  return {**p, "embed": {"embedding": p["embed"]["embedding"] * 4.0}}  # a peaked distribution


@pytest.mark.parametrize("kv_block", [3, 4, 128])
def test_decoding_in_blocks_equals_the_full_forward(params, kv_block):
  ids = jax.random.randint(jax.random.key(1), (3, 12), 0, CONFIG.vocab_size)
  mask = jnp.ones((3, 12), bool).at[0, :2].set(False).at[2, :4].set(False)  # left-padded prompts
  want = forward(CONFIG, params, ids, mask)[:, 4:]
  got = decode_logits(CONFIG, params, ids[:, :5], mask[:, :5], ids[:, 5:], kv_block=kv_block)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_a_step_reads_only_the_blocks_filled_so_far(params):
  """NaN in the blocks after the step's own: a step that read them (even masked) would be NaN."""
  ids = jax.random.randint(jax.random.key(2), (2, 3), 0, CONFIG.vocab_size)
  mask = jnp.ones((2, 3), bool)
  dp = decode.decode_params(CONFIG, params)
  _, caches = decode.prefill(CONFIG, dp, ids, mask, 12, kv_block=4)
  assert [len(blocks) for blocks in caches] == [3, 3]
  poisoned = lambda after: [[kv if j <= after else jax.tree.map(lambda a: a * jnp.nan, kv)
                             for j, kv in enumerate(blocks)] for blocks in caches]
  tok, pos = jnp.array([5, 6]), jnp.array([3, 3])
  for slot, block in ((3, 0), (4, 1)):  # slot 3 closes block 0, slot 4 opens block 1
    key_mask = jnp.zeros((2, 12), bool).at[:, :slot + 1].set(True)
    step = lambda c: decode.decode_step(CONFIG, dp, tok, pos, jnp.int32(slot), c, key_mask, block)
    want, _ = step(caches)
    got, _ = step(poisoned(block))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_array_equal(got, want)
    bad, _ = step(poisoned(block - 1))  # the check has teeth: a poisoned block that is read
    assert np.isnan(np.asarray(bad)).any()


def test_samples_do_not_depend_on_the_block_size(params):
  """Step i still draws from fold_in(key, i): the tokens of one block (the whole cache, as before
  blocks) and of many blocks agree, EOS stops included; log-probs to rounding."""
  prompt = jax.random.randint(jax.random.key(3), (16, 3), 0, CONFIG.vocab_size)
  mask = jnp.ones((16, 3), bool).at[:4, :2].set(False)
  free = sample(CONFIG, params, prompt, mask, jax.random.key(4), max_new_tokens=12, eos_id=-1)
  eos = int(np.bincount(np.asarray(free.tokens_BxN).ravel()).argmax())  # some rows stop early
  kw = dict(max_new_tokens=12, temperature=1.0, eos_id=eos, pad_id=999)
  one = sample(CONFIG, params, prompt, mask, jax.random.key(4), kv_block=128, **kw)
  assert 1 < int(one.lengths_B.min()) and int(one.lengths_B.min()) < 12  # rows end in mid-blocks
  for kv_block in (4, 5):
    many = sample(CONFIG, params, prompt, mask, jax.random.key(4), kv_block=kv_block, **kw)
    np.testing.assert_array_equal(many.tokens_BxN, one.tokens_BxN)
    np.testing.assert_array_equal(many.lengths_B, one.lengths_B)
    np.testing.assert_allclose(many.logprobs_BxN, one.logprobs_BxN, atol=1e-5)


def test_decode_cost_by_hand():
  """test-tiny (D 64, F 128, L 2, H 4, K 2, E 16, V 256, tied, float32), batch 2, prompt 3,
  6 new tokens, blocks of 4: the cache holds 3 + 6 - 1 = 8 slots, 2 blocks; steps 1..5 write slots
  3..7 and read 4, 8, 8, 8, 8 slots."""
  layer = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 128        # 36864 weights per layer
  token = 2 * (2 * layer + 64 * 256)                                 # 180224 FLOPs, head included
  prefill = 2 * (3 * 2 * 2 * layer + 2 * 64 * 256) + 4 * 2 * 2 * 4 * 16 * 3 * 3
  step = lambda read: 2 * (token + 4 * 2 * 4 * 16 * read)            # scores + values, 2 layers
  assert decode_cost(CONFIG, 2, 3, 6, kv_block=4)[0] == prefill + step(4) + 4 * step(8)
  assert decode_cost(CONFIG, 2, 3, 6, steps=3, kv_block=4)[0] == prefill + step(4) + step(8)
  weights = (2 * layer + 256 * 64) * 4 + (2 * 2 + 1) * 64 * 4        # norms in float32 too
  slot = 2 * 2 * 2 * 2 * 16 * 4                                      # K+V, layers, rows, heads
  logits = 2 * 256 * 4
  prefill_bytes = weights + 2 * 3 * 64 * 4 + 8 * slot + logits
  step_bytes = lambda read: weights + 2 * 64 * 4 + (read + 1) * slot + logits
  assert decode_cost(CONFIG, 2, 3, 6, kv_block=4)[1] == (prefill_bytes + step_bytes(4)
                                                         + 4 * step_bytes(8))
  # one block of 128: every step reads all 128 slots (the cost before blocks, rounded to a block)
  assert decode_cost(CONFIG, 2, 3, 6)[0] == prefill + 5 * step(128)


def test_step_i_draws_from_fold_in_key_i_by_inverse_cdf(params):
  """The random stream, pinned without the sampler's code: token i of row r is where the uniform
  uniform(fold_in(key, i), (B,))[r] falls in the CDF of softmax(logits / T) (the model's logits
  after the row's tokens so far), in many KV blocks; only a uniform within rounding of a CDF
  boundary may pick its neighbour."""
  prompt = jax.random.randint(jax.random.key(5), (8, 3), 0, CONFIG.vocab_size)
  mask = jnp.ones((8, 3), bool)
  key, t, n = jax.random.key(6), 0.9, 10
  out = sample(CONFIG, params, prompt, mask, key, max_new_tokens=n, temperature=t, eos_id=-1,
               kv_block=4)
  tokens = np.asarray(out.tokens_BxN)
  logits = np.asarray(forward(CONFIG, params, jnp.concatenate([prompt, out.tokens_BxN], 1)),
                      np.float64)[:, 2:-1] / t
  cdf = np.cumsum(np.exp(logits - logits.max(-1, keepdims=True)), -1)
  cdf /= cdf[..., -1:]
  for i in range(n):
    u = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), (8,)), np.float64)
    want = (cdf[:, i] <= u[:, None]).sum(-1)
    near = np.abs(cdf[:, i] - u[:, None]).min(-1) < 1e-5
    assert ((tokens[:, i] == want) | near).all(), i
    assert (tokens[:, i] == want).mean() >= 7 / 8
