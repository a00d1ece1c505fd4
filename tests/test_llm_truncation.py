"""The teacher's truncations (kdjax.llm.model.truncation) against numpy: the token sets top-k, top-p
and min-p keep at their boundaries, ties included; the sampler and the token-level target
truncating alike; the fused head's truncated target against the generic losses; a knob sweep of
students against one-by-one runs; the entropy against closed forms (issue 22, item 4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.llm.model import sampling, truncation
from kdjax.llm.train import head_kd
from kdjax.objectives import tokens


def _kept_numpy(z, top_k=0, top_p=None, min_p=None):
  """The module's rule written out on one row in float64: top-k (ties with the k-th kept), top-p
  on the renormalised top-k set (the smallest sorted prefix reaching p; ties with its last kept),
  min-p (p_i >= min_p p_max)."""
  z = np.asarray(z, np.float64)
  keep = np.ones(z.shape, bool)
  if 0 < top_k < len(z):
    keep &= z >= np.sort(z)[::-1][top_k - 1]
  if top_p is not None:
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    last = order[np.sum(before < top_p) - 1]
    keep &= z >= z[last]
  if min_p is not None:
    keep &= np.exp(z - z.max()) >= min_p
  return keep


def _kept(z, **kw):
  return np.asarray(truncation.truncate(jnp.asarray(z, jnp.float32)[None], **kw)[1][0])


LOG = np.log  # logits from probabilities: z = log p
CASES = [  # (probabilities or logits, kwargs, the kept indices the rule gives)
    # top-k: the k-th value tied with the (k+1)-th keeps both
    (LOG([0.4, 0.2, 0.2, 0.1, 0.1]), {"top_k": 2}, [0, 1, 2]),
    (LOG([0.4, 0.3, 0.2, 0.1]), {"top_k": 2}, [0, 1]),
    (LOG([0.25, 0.25, 0.25, 0.25]), {"top_k": 1}, [0, 1, 2, 3]),
    # top-p: mass before 0.2-token is 0.4 + 0.3 = 0.7 < 0.75 -> kept; before 0.1 is 0.9 >= 0.75
    (LOG([0.4, 0.3, 0.2, 0.1]), {"top_p": 0.75}, [0, 1, 2]),
    (LOG([0.4, 0.3, 0.2, 0.1]), {"top_p": 0.65}, [0, 1]),
    (LOG([0.4, 0.3, 0.2, 0.1]), {"top_p": 0.35}, [0]),  # the top token always
    # top-p ending inside a tie group: every tied token kept
    (LOG([0.4, 0.2, 0.2, 0.2]), {"top_p": 0.5}, [0, 1, 2, 3]),
    (LOG([0.5, 0.2, 0.2, 0.1]), {"top_p": 0.6}, [0, 1, 2]),
    # min-p: p_i >= min_p * 0.4
    (LOG([0.4, 0.3, 0.2, 0.1]), {"min_p": 0.6}, [0, 1]),
    (LOG([0.4, 0.3, 0.2, 0.1]), {"min_p": 0.4}, [0, 1, 2]),
    (LOG([0.4, 0.2, 0.2, 0.2]), {"min_p": 0.5}, [0, 1, 2, 3]),  # ties at once
    # top-p on the renormalised top-k set: top-2 = {0.4, 0.3} -> 0.57, 0.43; p 0.5 keeps one
    (LOG([0.4, 0.3, 0.2, 0.1]), {"top_k": 2, "top_p": 0.5}, [0]),
    (LOG([0.4, 0.3, 0.2, 0.1]), {"top_k": 3, "top_p": 0.7}, [0, 1]),
]


@pytest.mark.parametrize("z, kw, want", CASES)
def test_kept_sets_at_boundaries_and_ties(z, kw, want):
  got = np.flatnonzero(_kept(z, **kw)).tolist()
  assert got == want
  assert np.flatnonzero(_kept_numpy(z, **kw)).tolist() == want
  # the same set listed in another order (the rule reads values, not positions)
  perm = np.random.default_rng(0).permutation(len(z))
  assert np.flatnonzero(_kept(np.asarray(z)[perm], **kw)).tolist() == sorted(
      np.flatnonzero(np.isin(perm, want)).tolist())


def test_kept_sets_match_numpy_on_random_rows():
  """Random rows with many ties (logits on a coarse grid): all rows in one call with per-row
  values (traced k), and a few rows with k static."""
  rng = np.random.default_rng(1)
  n = 200
  z = rng.integers(-4, 4, size=(n, 23)).astype(np.float64) * 0.5
  k, p, m = rng.integers(1, 25, size=n), rng.uniform(0.05, 1.0, n), rng.uniform(0.01, 0.9, n)
  rows = {"top_k": jnp.asarray(k, jnp.int32), "top_p": jnp.asarray(p, jnp.float32),
          "min_p": jnp.asarray(m, jnp.float32)}
  per_row = {"top_k": lambda i: int(k[i]), "top_p": lambda i: float(p[i]),
             "min_p": lambda i: float(m[i])}
  zj = jnp.asarray(z, jnp.float32)
  for names in (("top_k",), ("top_p",), ("min_p",), ("top_k", "top_p")):
    got = np.asarray(truncation.truncate(zj, **{nm: rows[nm] for nm in names})[1])
    for i in range(n):
      kw = {nm: per_row[nm](i) for nm in names}
      np.testing.assert_array_equal(got[i], _kept_numpy(z[i], **kw), err_msg=f"row {i} {kw}")
  for i in range(8):  # k static (a Python int: the sampler's case)
    np.testing.assert_array_equal(_kept(z[i], top_k=int(k[i])), _kept_numpy(z[i], top_k=int(k[i])))


def test_the_sampler_draws_from_the_target_the_loss_reads():
  """draw()'s tokens lie in the kept set, and the log-probability it reports for each is the
  truncated target's (knob_target, renormalised): the sampler and the loss share one rule."""
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.integers(-6, 3, size=(1, 300)).astype(np.float32) * 0.7)  # ties
  for knob, value, kw in (("top_p", 0.6, {"top_p": 0.6, "use_top_p": True}),
                          ("min_p", 0.3, {"min_p": 0.3, "use_min_p": True}),
                          ("top_k", 7, {"top_k": 7})):
    target, kept = truncation.knob_target(z, knob, value)
    logp_target = np.asarray(jax.nn.log_softmax(target, axis=-1))[0]
    u = jnp.asarray(rng.uniform(size=512), jnp.float32)
    zz = jnp.broadcast_to(z, (512, 300))
    tok, logp = sampling.draw(zz, u, 1.0, kw.get("top_p", 1.0), kw.get("top_k", 0),
                              kw.get("use_top_p", False), kw.get("min_p", 0.0),
                              kw.get("use_min_p", False))
    tok, logp = np.asarray(tok), np.asarray(logp)
    assert np.all(np.asarray(kept)[0][tok]), knob
    np.testing.assert_allclose(logp, logp_target[tok], rtol=1e-5, atol=1e-5)
    assert len(set(tok.tolist())) > 1  # it samples, not argmax


def _head_kd_case(knob, values):
  n, b, t, d, e, v = len(values), 4, 10, 6, 5, 41
  k = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(k[0], (n, b, t, d))
  w = jax.random.normal(k[1], (n, v, d))
  tx, tw = jax.random.normal(k[2], (b, t, e)), 2 * jax.random.normal(k[3], (v, e))
  y = jax.random.randint(k[4], (b, t), 0, v)
  mask = jnp.ones((b, t), bool).at[0, :3].set(False)
  vals = jnp.asarray(values, jnp.float32)
  fused = head_kd.head_kd_sums("fkl", x, w, tx, tw, jnp.ones_like(vals), vals, y,
                               mask.astype(jnp.float32), ("vd", "vd"), knob)[0]
  return (x, w, tx, tw, y, mask, vals), fused


@pytest.mark.parametrize("name", ["fkl", "jsd", "skl", "srkl", "tvd"])
@pytest.mark.parametrize("knob, values", [("top_p", [0.5, 0.9]), ("min_p", [0.05, 0.4]),
                                          ("top_k", [1, 5])])
def test_head_kd_truncated_target_matches_the_generic_loss(name, knob, values):
  """The fused head's target under a truncation knob equals the generic loss (kdjax.objectives.
  tokens, which takes -inf logits) against the teacher's logits cut by knob_target."""
  (x, w, tx, tw, y, mask, vals), _ = _head_kd_case(knob, values)
  fused = head_kd.head_kd_sums(name, x, w, tx, tw, jnp.ones_like(vals), vals, y,
                               mask.astype(jnp.float32), ("vd", "vd"), knob)[0]
  zt = tx @ tw.T
  for i, value in enumerate(values):
    target = truncation.knob_target(zt, knob, value)[0]
    ref = tokens.by_name(name)(x[i] @ w[i].T, target, mask) * jnp.sum(mask)
    np.testing.assert_allclose(fused[i], ref, rtol=2e-5)
  # the truncation moved the loss: the untruncated target gives another value
  plain = tokens.by_name(name)(x[0] @ w[0].T, zt, mask) * jnp.sum(mask)
  assert abs(float(fused[0]) - float(plain)) > 1e-3 * abs(float(plain))


def test_head_kd_knob_sweep_equals_one_by_one_runs():
  values = [0.3, 0.7, 0.95]
  (x, w, tx, tw, y, mask, vals), swept = _head_kd_case("top_p", values)
  for i in range(len(values)):
    one = head_kd.head_kd_sums("fkl", x[i:i + 1], w[i:i + 1], tx, tw, jnp.ones((1,)), vals[i:i + 1],
                               y, mask.astype(jnp.float32), ("vd", "vd"), "top_p")[0]
    np.testing.assert_allclose(swept[i], one[0], rtol=1e-6)
  grads = jax.grad(lambda x: jnp.sum(head_kd.head_kd_sums(
      "fkl", x, w, tx, tw, jnp.ones_like(vals), vals, y, mask.astype(jnp.float32),
      ("vd", "vd"), "top_p")[0]))(x)
  assert np.all(np.isfinite(np.asarray(grads)))


def test_temperature_knob_ignores_knob_values():
  """The default knob's path reads no knob value: garbage there changes no bit."""
  (x, w, tx, tw, y, mask, _), _ = _head_kd_case("top_p", [0.5, 0.9])
  inv_t = jnp.asarray([1 / 0.8, 1.0])
  a = head_kd.head_kd_sums("fkl", x, w, tx, tw, inv_t, jnp.asarray([0.8, 1.0]), y,
                           mask.astype(jnp.float32))
  b = head_kd.head_kd_sums("fkl", x, w, tx, tw, inv_t, jnp.asarray([np.nan, -3.0]), y,
                           mask.astype(jnp.float32), ("vd", "vd"), "temperature")
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_entropy_against_closed_forms():
  v = 50
  mask = jnp.ones((1,), bool)
  h = lambda z, knob, value: float(truncation.entropy_sums(jnp.asarray(z, jnp.float32)[None],
                                                           mask, knob, value)[0])
  assert h(np.zeros(v), "temperature", 1.0) == pytest.approx(math.log(v), rel=1e-6)
  # 5 tokens tied on top, the rest far lower: top_k 3 keeps the 5 tied (uniform over 5)
  z = np.concatenate([np.full(5, 2.0), np.zeros(v - 5)])
  assert h(z, "top_k", 3) == pytest.approx(math.log(5), rel=1e-6)
  # min-p 0.5 cuts the e^-2 tail
  assert h(z, "min_p", 0.5) == pytest.approx(math.log(5), rel=1e-6)
  # top_p 0.95 on two levels: mass of the top 5 is 5e^2 / (5e^2 + 45) = 0.451 < 0.95: all kept
  p_top = math.exp(2) / (5 * math.exp(2) + 45)
  p_low = 1 / (5 * math.exp(2) + 45)
  full = -(5 * p_top * math.log(p_top) + 45 * p_low * math.log(p_low))
  assert h(z, "top_p", 0.95) == pytest.approx(full, rel=1e-5)
  assert h(z, "top_p", 0.4) == pytest.approx(math.log(5), rel=1e-6)
  # temperature T on the two levels: softmax(z / T)
  t = 0.5
  a, b = math.exp(2 / t), 1.0
  zsum = 5 * a + 45 * b
  closed = -(5 * (a / zsum) * math.log(a / zsum) + 45 * (b / zsum) * math.log(b / zsum))
  assert h(z, "temperature", t) == pytest.approx(closed, rel=1e-5)
  # masked rows count for nothing
  s, c = truncation.entropy_sums(jnp.zeros((3, v)), jnp.asarray([True, False, True]),
                                 "temperature", 1.0)
  assert float(c) == 2 and float(s) / 2 == pytest.approx(math.log(v), rel=1e-6)


def test_top_p_boundary_is_strict():
  """At the knife edge (the mass before a token equals p exactly: binary fractions, exact in any
  summation order) the token is out: in the nucleus iff the mass before it is < p, i.e. the
  threshold is the largest logit whose tokens at or above hold >= p."""
  z = jnp.asarray([[3.0, 2.0, 1.0, 0.0]])
  w = jnp.asarray([[0.5, 0.25, 0.125, 0.125]])
  tau = lambda need: float(truncation._largest_reaching(z, w, jnp.asarray([need], jnp.float32))[0])
  assert tau(0.75) == 2.0  # mass before z = 1 is exactly 0.75: out
  assert tau(np.nextafter(np.float32(0.75), np.float32(1))) == 1.0
  assert tau(0.5) == 3.0 and tau(1.0) == 0.0
  ones = jnp.ones((1, 4))
  assert [float(truncation._largest_reaching(z, ones, jnp.asarray([k], jnp.float32))[0])
          for k in (1, 2, 3, 4)] == [3.0, 2.0, 1.0, 0.0]
