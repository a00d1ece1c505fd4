"""kdjax.llm.model.sampling: right distribution, truncation, EOS, determinism, fast path == model, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from kdjax.llm import forward, get_preset, init_params
from kdjax.llm.model.sampling import decode_logits, sample

CONFIG = get_preset("test-tiny")
PROMPT = jnp.array([[1, 17, 42]], jnp.int32)
N = 8  # new tokens: one shape (B=16, P=3, N=8) for most tests keeps compiles few


def _prompts(seed):
  return jax.random.randint(jax.random.key(seed), (16, 3), 0, CONFIG.vocab_size), jnp.ones((16, 3), bool)


@pytest.fixture(scope="module")
def params():
  """test-tiny with its embedding scaled up: a peaked, far-from-uniform next-token distribution."""
  p = init_params(CONFIG, jax.random.key(0))
  return {**p, "embed": {"embedding": p["embed"]["embedding"] * 4.0}}


def _gof_pvalue(counts, probs, min_expected=5.0):
  """Chi-square goodness of fit, bins with expected count < min_expected pooled into one."""
  expected = probs / probs.sum() * counts.sum()
  rare = expected < min_expected
  obs, exp = counts[~rare], expected[~rare]
  if rare.any():
    obs, exp = np.append(obs, counts[rare].sum()), np.append(exp, expected[rare].sum())
  return stats.chisquare(obs, exp).pvalue


def test_first_token_frequencies_match_softmax_over_temperature(params):
  logits = np.asarray(forward(CONFIG, params, PROMPT)[0, -1], np.float64)
  rows = 10000  # per temperature; both temperatures in one call, one per half of the batch
  ids = jnp.broadcast_to(PROMPT, (2 * rows, PROMPT.shape[1]))
  temps = np.repeat([1.0, 0.7], rows)
  out = sample(CONFIG, params, ids, jnp.ones(ids.shape, bool), jax.random.key(1), max_new_tokens=1,
               temperature=temps, eos_id=-1)
  first = np.asarray(out.tokens_BxN[:, 0])
  counts = {t: np.bincount(first[temps == t], minlength=CONFIG.vocab_size) for t in (1.0, 0.7)}
  tempered = lambda t: np.exp((logits - logits.max()) / t)
  for t in (1.0, 0.7):
    assert _gof_pvalue(counts[t], tempered(t)) > 1e-3, t
    assert (tempered(t) / tempered(t).sum()).max() < 0.5  # not degenerate: the test has power
  # The same test rejects the wrong temperature: it can fail.
  for t, wrong in ((1.0, 0.7), (0.7, 1.0)):
    assert _gof_pvalue(counts[t], tempered(wrong)) < 1e-6
  # A scalar temperature is the same as that value in every row.
  scalar = sample(CONFIG, params, ids, jnp.ones(ids.shape, bool), jax.random.key(1),
                  max_new_tokens=1, temperature=0.7, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(scalar.tokens_BxN[rows:, 0]), first[rows:])


def _recomputed_logits(params, prompt, out, mask=None):
  """The model's own logits before each new token: [B, N, V]."""
  full = jnp.concatenate([prompt, out.tokens_BxN], axis=1)
  full_mask = None if mask is None else jnp.concatenate([mask, jnp.ones(out.tokens_BxN.shape, bool)], 1)
  return np.asarray(forward(CONFIG, params, full, full_mask)[:, prompt.shape[1] - 1:-1], np.float64)


def _outside_nucleus(logits, tokens, temperature, top_p):
  """True where a token's more likely rivals already hold >= top_p of the tempered mass."""
  z = logits / temperature
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p_tok = np.take_along_axis(p, tokens[..., None], -1)
  mass_before = np.where(p > p_tok, p, 0.0).sum(-1)
  return mass_before >= top_p + 1e-5


def test_top_k_and_top_p_never_emit_excluded_tokens(params):
  prompt, mask = _prompts(3)
  kw = dict(max_new_tokens=N, temperature=1.3, eos_id=-1)
  out = sample(CONFIG, params, prompt, mask, jax.random.key(4), top_k=3, **kw)
  logits = _recomputed_logits(params, prompt, out)
  rank = (logits > np.take_along_axis(logits, np.asarray(out.tokens_BxN)[..., None], -1)).sum(-1)
  assert rank.max() < 3
  assert len(np.unique(rank)) > 1  # not just greedy

  for top_k in (0, 20):
    out = sample(CONFIG, params, prompt, mask, jax.random.key(5), top_p=0.5, top_k=top_k, **kw)
    logits = _recomputed_logits(params, prompt, out)
    assert not _outside_nucleus(logits, np.asarray(out.tokens_BxN), 1.3, 0.5).any()
  # The check has teeth: without top-p the same draws leave the nucleus.
  out = sample(CONFIG, params, prompt, mask, jax.random.key(5), **kw)
  logits = _recomputed_logits(params, prompt, out)
  assert _outside_nucleus(logits, np.asarray(out.tokens_BxN), 1.3, 0.5).any()


def test_top_p_keeps_the_boundary_token_at_its_renormalised_frequency(params):
  """The nucleus is the most likely tokens up to and including the one whose cumulative mass
  crosses top_p; each is drawn with its probability divided by the nucleus's mass."""
  logits = np.asarray(forward(CONFIG, params, PROMPT)[0, -1], np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  cum = np.cumsum(probs[order])
  top_p = (cum[2] + cum[3]) / 2  # the 4th most likely token crosses it: the nucleus is 4 tokens
  nucleus, boundary = order[:4], order[3]
  rows = 20000
  ids = jnp.broadcast_to(PROMPT, (rows, PROMPT.shape[1]))
  out = sample(CONFIG, params, ids, jnp.ones(ids.shape, bool), jax.random.key(15),
               max_new_tokens=1, top_p=top_p, eos_id=-1)
  first = np.asarray(out.tokens_BxN[:, 0])
  counts = np.bincount(first, minlength=CONFIG.vocab_size)
  assert counts.sum() == counts[nucleus].sum()  # nothing outside the nucleus
  want = probs[nucleus] / cum[3]
  assert _gof_pvalue(counts[nucleus], want) > 1e-3
  n_boundary, p_boundary = counts[boundary], want[3]
  assert abs(n_boundary - rows * p_boundary) < 4 * np.sqrt(rows * p_boundary * (1 - p_boundary))
  # each token's log-prob is under the renormalised nucleus
  picked = np.asarray(out.logprobs_BxN[:, 0])
  np.testing.assert_allclose(picked[first == boundary], np.log(p_boundary), atol=1e-4)


def test_decode_loop_follows_the_model(params):
  """Greedy tokens are the model's argmax and logprobs its log_softmax(logits / T), left-padded rows too."""
  prompt, mask = _prompts(13)
  mask = mask.at[:5, :2].set(False)
  for t in (0.0, 1.3):
    out = sample(CONFIG, params, prompt, mask, jax.random.key(14), max_new_tokens=N, temperature=t,
                 eos_id=-1)
    logits, tokens = _recomputed_logits(params, prompt, out, mask), np.asarray(out.tokens_BxN)
    if t == 0.0:
      np.testing.assert_array_equal(tokens, logits.argmax(-1))
    else:
      want = np.take_along_axis(jax.nn.log_softmax(logits / t), tokens[..., None], -1)[..., 0]
      np.testing.assert_allclose(out.logprobs_BxN, want, atol=1e-4)


def test_eos_stops_rows_pads_and_counts(params):
  prompt, mask = _prompts(6)
  key, n, pad = jax.random.key(7), N, 999
  free = sample(CONFIG, params, prompt, mask, key, max_new_tokens=n, eos_id=-1)
  free_tokens = np.asarray(free.tokens_BxN)
  np.testing.assert_array_equal(free.lengths_B, n)
  eos = int(np.bincount(free_tokens.ravel()).argmax())  # the most frequent token: some rows stop
  out = sample(CONFIG, params, prompt, mask, key, max_new_tokens=n, eos_id=eos, pad_id=pad)
  tokens, lengths, logps = (np.asarray(x) for x in out)
  stopped = 0
  for row in range(16):
    hits = np.flatnonzero(free_tokens[row] == eos)
    length = hits[0] + 1 if len(hits) else n
    stopped += length < n
    assert lengths[row] == length
    np.testing.assert_array_equal(tokens[row, :length], free_tokens[row, :length])
    assert (tokens[row, length:] == pad).all() and (logps[row, length:] == 0).all()
    assert (logps[row, :length] < 0).all()
  assert 0 < stopped < 16
  # Greedy, every row stops at once: the loop ends early and the rest is padding.
  first = int(jnp.argmax(forward(CONFIG, params, PROMPT)[0, -1]))
  out = sample(CONFIG, params, jnp.tile(PROMPT, (16, 1)), mask, key,
               max_new_tokens=n, temperature=0.0, eos_id=first, pad_id=pad)
  np.testing.assert_array_equal(out.lengths_B, 1)
  np.testing.assert_array_equal(out.tokens_BxN[:, 0], first)
  assert (np.asarray(out.tokens_BxN[:, 1:]) == pad).all()


def test_reproducible_from_the_key(params):
  prompt, mask = _prompts(8)
  a = sample(CONFIG, params, prompt, mask, jax.random.key(9), max_new_tokens=N, eos_id=-1)
  b = sample(CONFIG, params, prompt, mask, jax.random.key(9), max_new_tokens=N, eos_id=-1)
  c = sample(CONFIG, params, prompt, mask, jax.random.key(10), max_new_tokens=N, eos_id=-1)
  np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
  np.testing.assert_array_equal(a.logprobs_BxN, b.logprobs_BxN)
  assert (np.asarray(a.tokens_BxN) != np.asarray(c.tokens_BxN)).mean() > 0.5


@pytest.mark.parametrize("name", ["test-tiny", "test-tiny-untied"])
def test_fast_decode_path_matches_model_forward(name):
  config = get_preset(name)
  params = init_params(config, jax.random.key(1))
  ids = jax.random.randint(jax.random.key(2), (3, 9), 0, config.vocab_size)
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  full_mask = jnp.concatenate([mask, jnp.ones((3, 4), bool)], axis=1)
  want = forward(config, params, ids, full_mask)[:, 4:]
  got = decode_logits(config, params, ids[:, :5], mask, ids[:, 5:])
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _first_difference(a_N, b_N):
  """The first position where two token rows differ, or None."""
  diff = np.flatnonzero(np.asarray(a_N) != np.asarray(b_N))
  return int(diff[0]) if diff.size else None


def test_batch_sharded_over_data_agrees_with_unsharded_up_to_rounding(params):
  """What the README claims of a sharded batch: each row draws the same uniforms, its log-probs
  agree to rounding, greedy tokens are the same, and a sampled row keeps the unsharded row's tokens
  until a draw lands within rounding of a boundary of the inverse CDF."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  prompt, mask = _prompts(11)
  mask = mask.at[:4, :2].set(False)  # some rows left-padded
  rows, key = NamedSharding(mesh, P("data")), jax.random.key(12)
  sharded = (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(prompt, rows),
             jax.device_put(mask, rows))
  for t in (0.0, 1.0):  # temperature is traced: one compile each way serves both
    kw = dict(max_new_tokens=N, temperature=t, eos_id=5)
    want = sample(CONFIG, params, prompt, mask, key, **kw)
    with jax.set_mesh(mesh):
      got = sample(CONFIG, *sharded, key, **kw)
    assert len(got.tokens_BxN.sharding.device_set) == 8  # the work really was spread
    if t == 0.0:
      np.testing.assert_array_equal(got.tokens_BxN, want.tokens_BxN)
      continue
    for r in range(prompt.shape[0]):
      j = _first_difference(got.tokens_BxN[r], want.tokens_BxN[r])  # None: the whole row agrees
      np.testing.assert_allclose(got.logprobs_BxN[r, :j], want.logprobs_BxN[r, :j], atol=1e-5)
      if j is not None:  # that draw's uniform sits on a boundary of the CDF, to rounding
        logits = decode_logits(CONFIG, params, prompt[r:r + 1], mask[r:r + 1],
                               want.tokens_BxN[r:r + 1, :j])[0, -1]
        cdf = np.cumsum(np.asarray(jax.nn.softmax(logits), np.float64))
        u = float(jax.random.uniform(jax.random.fold_in(key, j), (prompt.shape[0],))[r])
        assert np.min(np.abs(cdf - u)) < 1e-4, (r, j)
