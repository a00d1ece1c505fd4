"""Token-level KD losses: against independent float64 numpy/scipy references, finite differences,
-inf logits, temperature 0.05, padding masks, jit and vmap over a leading student axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kdjax.cli import UserError
from kdjax.objectives import tokens

NAMES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")
NEG_INF = -np.inf


# ---------------------------------------------------------------- float64 reference (numpy/scipy)
# Written independently of the library: cross-entropy minus entropy for the KLs, entropy of the
# mixture minus mixed entropies for the JSD, scipy's xlogy / entr for the 0 log 0 = 0 convention.

def _entropy(p):
  return special.entr(p).sum(-1)


def _cross_entropy(p, q):
  return -special.xlogy(p, q).sum(-1)


def ref_token_losses(name, student, teacher, temperature=1.0, beta=0.5, alpha=0.1,
                     teacher_temperature=None):
  teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
  ps = np.exp(special.log_softmax(np.asarray(student, np.float64) / temperature, axis=-1))
  pt = np.exp(special.log_softmax(np.asarray(teacher, np.float64) / teacher_temperature, axis=-1))
  if name == "fkl":
    return _cross_entropy(pt, ps) - _entropy(pt)
  if name == "rkl":
    return _cross_entropy(ps, pt) - _entropy(ps)
  if name == "jsd":
    m = beta * pt + (1 - beta) * ps
    return _entropy(m) - beta * _entropy(pt) - (1 - beta) * _entropy(ps)
  if name == "skl":
    return _cross_entropy(pt, alpha * pt + (1 - alpha) * ps) - _entropy(pt)
  if name == "srkl":  # DistiLLM's skewed_reverse_kl: mixed = (1 - lam) teacher + lam student
    return _cross_entropy(ps, (1 - alpha) * pt + alpha * ps) - _entropy(ps)
  if name == "tvd":
    return 0.5 * np.abs(pt - ps).sum(-1)
  raise AssertionError(name)


def ref_loss(name, student, teacher, mask=None, **kw):
  per_token = ref_token_losses(name, student, teacher, **kw)
  if mask is None:
    return per_token.mean()
  mask = np.asarray(mask, bool)
  return np.where(mask, per_token, 0.0).sum() / max(mask.sum(), 1)


def call(name, student, teacher, mask=None, temperature=1.0, beta=0.5, alpha=0.1):
  fn = tokens.by_name(name)
  extra = {"jsd": {"beta": beta}, "skl": {"alpha": alpha}, "srkl": {"alpha": alpha}}.get(name, {})
  return fn(student, teacher, mask, temperature=temperature, **extra)


def _logits(seed, shape=(2, 3, 7), scale=2.0):
  return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


MASK = np.array([[1, 1, 0], [1, 0, 0]], bool)


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("name", NAMES)
def test_positive_and_zero_iff_equal(name):
  s, t = _logits(0), _logits(1)
  assert float(call(name, s, t)) > 1e-3
  assert abs(float(call(name, t, t))) < 1e-6
  # equal distributions from different logits (a shift per row) also give 0
  shifted = t + np.arange(t.shape[1], dtype=np.float32)[None, :, None]
  assert abs(float(call(name, shifted, t))) < 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_matches_float64_reference(name, temperature):
  s, t = _logits(2), _logits(3)
  kw = dict(temperature=temperature, beta=0.3, alpha=0.2)
  got = float(call(name, s, t, MASK, **kw))
  want = ref_loss(name, s, t, MASK, **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  with jax.enable_x64(True):  # the same code in float64 agrees to float64 precision
    got64 = call(name, s.astype(np.float64), t.astype(np.float64), MASK, **kw)
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(float(got64), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_default_hyperparameters_and_no_mask(name):
  s, t = _logits(4), _logits(5)
  np.testing.assert_allclose(float(tokens.by_name(name)(s, t)), ref_loss(name, s, t), rtol=1e-5, atol=1e-7)


def test_bounds():
  # disjoint-ish distributions: JSD(0.5) approaches log 2 from below, skew KL approaches -log(alpha), TVD 1
  s = np.array([[[30.0, -30.0, -30.0]]], np.float32)
  t = np.array([[[-30.0, 30.0, -30.0]]], np.float32)
  js = float(tokens.jsd(s, t))
  assert np.log(2) - 1e-5 < js <= np.log(2) + 1e-6
  for skew in (tokens.skew_kl, tokens.skew_reverse_kl):
    sk = float(skew(s, t, alpha=0.1))
    assert -np.log(0.1) - 1e-5 < sk <= -np.log(0.1) + 1e-5
  assert 1 - 1e-6 < float(tokens.tvd(s, t)) <= 1 + 1e-6


def test_jsd_limits_and_skew_kl_endpoints():
  s, t = _logits(6), _logits(7)
  for beta in (0.0, 1.0):
    assert abs(float(tokens.jsd(s, t, MASK, beta=beta))) < 1e-6
  with jax.enable_x64(True):  # jsd / beta -> forward KL as beta -> 0, jsd / (1 - beta) -> reverse KL as beta -> 1
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    fkl, rkl = float(tokens.forward_kl(s64, t64, MASK)), float(tokens.reverse_kl(s64, t64, MASK))
    eps = 1e-6
    np.testing.assert_allclose(float(tokens.jsd(s64, t64, MASK, beta=eps)) / eps, fkl, rtol=1e-4)
    np.testing.assert_allclose(float(tokens.jsd(s64, t64, MASK, beta=1 - eps)) / eps, rkl, rtol=1e-4)
  np.testing.assert_allclose(float(tokens.skew_kl(s, t, MASK, alpha=0.0)), float(tokens.forward_kl(s, t, MASK)),
                             rtol=1e-6)
  assert abs(float(tokens.skew_kl(s, t, MASK, alpha=1.0))) < 1e-6
  np.testing.assert_allclose(float(tokens.skew_reverse_kl(s, t, MASK, alpha=0.0)),
                             float(tokens.reverse_kl(s, t, MASK)), rtol=1e-6)
  assert abs(float(tokens.skew_reverse_kl(s, t, MASK, alpha=1.0))) < 1e-6


def test_bf16_inputs_are_upcast():
  s = jnp.asarray(_logits(8), jnp.bfloat16)
  t = jnp.asarray(_logits(9), jnp.bfloat16)
  for name in NAMES:
    got = call(name, s, t, MASK, temperature=0.5)
    assert got.dtype == jnp.float32
    want = call(name, s.astype(jnp.float32), t.astype(jnp.float32), MASK, temperature=0.5)
    assert float(got) == float(want)


# ---------------------------------------------------------------- -inf logits and low temperature

def _with_neg_inf(x, idx):
  x = np.array(x)
  x[..., list(idx)] = NEG_INF
  return x


# which vocabulary entries are -inf in (student, teacher): entry 1 in both, 0 teacher only, 2 student only
PATTERNS = {
    "fkl": ((1,), (0, 1)),       # supp(teacher) within supp(student): finite
    "rkl": ((1, 2), (1,)),       # supp(student) within supp(teacher): finite
    "jsd": ((1, 2), (0, 1)),
    "skl": ((1, 2), (0, 1)),
    "srkl": ((1, 2), (0, 1)),
    "tvd": ((1, 2), (0, 1)),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.05])
def test_neg_inf_logits_finite_values_and_gradients(name, temperature):
  s_inf, t_inf = PATTERNS[name]
  s = _with_neg_inf(_logits(10), s_inf)
  t = _with_neg_inf(_logits(11), t_inf)
  kw = dict(temperature=temperature, beta=0.3, alpha=0.2)
  value, (gs, gt) = jax.value_and_grad(lambda a, b: call(name, a, b, MASK, **kw), argnums=(0, 1))(s, t)
  assert np.isfinite(float(value)) and float(value) > 0
  np.testing.assert_allclose(float(value), ref_loss(name, s, t, MASK, **kw), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  both = sorted(set(s_inf) & set(t_inf))
  # a token neither model can emit gets no gradient; nor does a -inf student logit, except for
  # forward KL (whose student gradient p_S - p_T is -p_T there; none in its pattern)
  np.testing.assert_array_equal(np.asarray(gs)[..., list(s_inf)], 0.0)
  np.testing.assert_array_equal(np.asarray(gt)[..., both], 0.0)


def test_all_patterns_finite_for_bounded_losses():
  # jsd (any beta in [0, 1]), skew KL (alpha > 0) and TVD are finite whichever model cuts which
  # token, and so are their gradients (skew KL at alpha = 0 is forward KL, infinite here)
  s = _with_neg_inf(_logits(12), (1, 2, 3))
  t = _with_neg_inf(_logits(13), (0, 1, 4))
  cases = [("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("skl", 1e-3), ("skl", 0.5), ("skl", 1.0),
           ("srkl", 1e-3), ("srkl", 0.5), ("srkl", 1.0), ("tvd", 0.5)]
  for name, h in cases:
    value, grads = jax.value_and_grad(lambda a, b: call(name, a, b, MASK, 0.05, h, h), argnums=(0, 1))(s, t)
    assert np.isfinite(float(value)), (name, h)
    assert all(np.all(np.isfinite(g)) for g in grads), (name, h)
    np.testing.assert_allclose(float(value), ref_loss(name, s, t, MASK, temperature=0.05, beta=h, alpha=h),
                               rtol=1e-5, atol=1e-5)


def test_forward_kl_support_violation_is_inf_not_nan():
  # the teacher puts mass on a token the student cut: KL is +inf, honestly; the student's gradient
  # (p_S - p_T) / T stays finite and pushes the cut logit up
  s = _with_neg_inf(_logits(14, (1, 1, 5)), (2,))
  t = _logits(15, (1, 1, 5))
  value, g = jax.value_and_grad(tokens.forward_kl)(s, t)
  assert float(value) == np.inf
  assert np.all(np.isfinite(g)) and float(g[0, 0, 2]) < 0
  assert float(tokens.reverse_kl(t, s)) == np.inf


@pytest.mark.parametrize("name", NAMES)
def test_low_temperature_huge_logit_ratios(name):
  s, t = _logits(16, scale=5.0), _logits(17, scale=5.0)   # logits / 0.05 span hundreds of nats
  kw = dict(temperature=0.05, beta=0.3, alpha=0.2)
  value, (gs, gt) = jax.value_and_grad(lambda a, b: call(name, a, b, MASK, **kw), argnums=(0, 1))(s, t)
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  # float32 carries ~1e-7 relative error on log-probs of a few hundred nats: 1e-5 relative on a loss of
  # order 10 (fkl, rkl), absolute on the bounded ones
  np.testing.assert_allclose(float(value), ref_loss(name, s, t, MASK, **kw), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradients vs finite differences

def _central_differences(f, x, eps):
  grad = np.zeros_like(x)
  for i in zip(*np.nonzero(np.isfinite(x))):
    hi, lo = x.copy(), x.copy()
    hi[i] += eps
    lo[i] -= eps
    grad[i] = (f(hi) - f(lo)) / (2 * eps)
  return grad


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_inf", [False, True])
def test_gradients_match_finite_differences(name, with_inf):
  s = _logits(18, (1, 2, 5)).astype(np.float64)
  t = _logits(19, (1, 2, 5)).astype(np.float64)
  if with_inf:
    s_inf, t_inf = PATTERNS[name]
    s, t = _with_neg_inf(s, s_inf), _with_neg_inf(t, t_inf)
  mask = np.array([[True, True]])
  kw = dict(temperature=0.8, beta=0.3, alpha=0.2)
  with jax.enable_x64(True):
    loss = jax.jit(lambda a, b: call(name, a, b, mask, **kw))
    gs, gt = jax.grad(loss, argnums=(0, 1))(s, t)
    fs = _central_differences(lambda a: float(loss(a, t)), s, 1e-6)
    ft = _central_differences(lambda b: float(loss(s, b)), t, 1e-6)
  np.testing.assert_allclose(np.asarray(gs), fs, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(np.asarray(gt), ft, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_sgd_step_on_student_lowers_loss(name):
  s, t = _logits(20), _logits(21)
  for temperature in (1.0, 0.5):
    loss = lambda a: call(name, a, t, MASK, temperature=temperature, beta=0.3, alpha=0.2)
    before, g = jax.value_and_grad(loss)(s)
    assert float(loss(s - 0.05 * g)) < float(before)


# ---------------------------------------------------------------- masking

@pytest.mark.parametrize("name", NAMES)
def test_padded_positions_do_not_matter(name):
  s, t = _logits(22), _logits(23)
  loss = lambda a, b, m: call(name, a, b, m, temperature=0.7, beta=0.3, alpha=0.2)
  base = float(loss(s, t, MASK))
  pad = ~MASK
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[pad] = np.nan                 # garbage in the student's padded rows
  t_bad[pad] = NEG_INF                # whole rows of -inf in the teacher's
  t_bad[0, 2, 3] = 1e30
  value, (gs, gt) = jax.value_and_grad(loss, argnums=(0, 1))(s_bad, t_bad, MASK)
  assert float(value) == base
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gt))
  np.testing.assert_array_equal(np.asarray(gs)[pad], 0.0)
  np.testing.assert_array_equal(np.asarray(gt)[pad], 0.0)
  assert np.any(np.asarray(gs)[MASK] != 0)
  # an integer / float 0-1 mask means the same
  assert float(loss(s, t, MASK.astype(np.int32))) == base
  assert float(loss(s, t, MASK.astype(np.float32))) == base


@pytest.mark.parametrize("name", NAMES)
def test_empty_mask_gives_zero(name):
  s, t = _logits(24), _logits(25)
  s[0, 0] = np.nan
  empty = np.zeros(MASK.shape, bool)
  value, g = jax.value_and_grad(lambda a: call(name, a, t, empty))(s)
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------- jit, vmap over students, sweeps

@pytest.mark.parametrize("name", NAMES)
def test_jit_and_vmap_over_students(name):
  n = 3
  s_N = np.stack([_logits(30 + i) for i in range(n)])
  t = _logits(29)
  temps = np.array([0.8, 0.95, 1.0], np.float32)      # swept values are array arguments
  hyper = np.array([0.1, 0.5, 0.9], np.float32)

  def one(s, temperature, h):
    return call(name, s, t, MASK, temperature=temperature, beta=h, alpha=h)

  values, grads = jax.jit(jax.vmap(jax.value_and_grad(one)))(s_N, temps, hyper)
  for i in range(n):
    v, g = jax.value_and_grad(one)(s_N[i], float(temps[i]), float(hyper[i]))
    np.testing.assert_allclose(float(values[i]), float(v), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[i]), np.asarray(g), rtol=1e-5, atol=1e-7)
    kw = dict(temperature=float(temps[i]), beta=float(hyper[i]), alpha=float(hyper[i]))
    np.testing.assert_allclose(float(values[i]), ref_loss(name, s_N[i], t, MASK, **kw), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("teacher_temperature", [0.5, 0.8, 2.0])
def test_teacher_only_temperature_matches_reference(name, teacher_temperature):
  """teacher_temperature tempers the teacher alone: the target is softmax(z_T / T), the student
  untempered; None keeps the both-tempered convention."""
  s, t = _logits(50), _logits(51)
  fn, extra = tokens.by_name(name), {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2},
                    "srkl": {"alpha": 0.2}}.get(name, {})
  got = float(fn(s, t, MASK, teacher_temperature=teacher_temperature, **extra))
  ref_kw = dict(beta=0.3, alpha=0.2)
  want = ref_loss(name, s, t, MASK, teacher_temperature=teacher_temperature, **ref_kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # the same as tempering the teacher's logits by hand, and not the both-tempered loss
  np.testing.assert_allclose(got, ref_loss(name, s, t / teacher_temperature, MASK, **ref_kw),
                             rtol=1e-5, atol=1e-7)
  both = ref_loss(name, s, t, MASK, temperature=teacher_temperature, **ref_kw)
  assert abs(got - both) > 1e-4
  assert float(fn(s, t, MASK, temperature=0.7, teacher_temperature=None, **extra)) == float(
      fn(s, t, MASK, temperature=0.7, **extra))
  # traced per-student temperatures under vmap (one compiled program for the sweep)
  temps = jnp.asarray([teacher_temperature, 1.0], jnp.float32)
  vals = jax.jit(jax.vmap(lambda tt: fn(s, t, MASK, teacher_temperature=tt, **extra)))(temps)
  np.testing.assert_allclose(float(vals[0]), want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(vals[1]), ref_loss(name, s, t, MASK, **ref_kw), rtol=1e-5,
                             atol=1e-7)


# ---------------------------------------------------------------- names and bad input

def test_by_name():
  assert tokens.by_name("fkl") is tokens.forward_kl
  assert tokens.by_name("rkl") is tokens.reverse_kl
  assert tokens.by_name("jsd") is tokens.jsd
  assert tokens.by_name("skl") is tokens.skew_kl
  assert tokens.by_name("srkl") is tokens.skew_reverse_kl
  assert tokens.by_name("tvd") is tokens.tvd
  with pytest.raises(UserError) as e:
    tokens.by_name("kl")
  message = str(e.value)
  assert "\n" not in message and "'kl'" in message
  assert all(n in message for n in NAMES)


def test_bad_arguments():
  s, t = _logits(40), _logits(41)
  with pytest.raises(UserError, match="temperature"):
    tokens.forward_kl(s, t, temperature=0.0)
  with pytest.raises(UserError, match="teacher_temperature"):
    tokens.reverse_kl(s, t, teacher_temperature=-1.0)
  with pytest.raises(UserError, match="beta"):
    tokens.jsd(s, t, beta=1.5)
  with pytest.raises(UserError, match="alpha"):
    tokens.skew_kl(s, t, alpha=-0.1)
  with pytest.raises(UserError, match="alpha"):
    tokens.skew_reverse_kl(s, t, alpha=1.5)
  with pytest.raises(ValueError, match="shape"):
    tokens.tvd(s, t[:, :2])
  with pytest.raises(ValueError, match="mask"):
    tokens.tvd(s, t, MASK[:, :2])


# ---------------------------------------------------------------- srkl: DistiLLM's skew reverse KL

def _srkl_reference_jnp(student, teacher, mask, alpha):
  """sum_v q (log q - log((1 - alpha) p + alpha q)) averaged over the mask, written out directly
  (q = the student, p = the teacher; DistiLLM's distillm/losses.py skewed_reverse_kl)."""
  q, p = jax.nn.softmax(student, axis=-1), jax.nn.softmax(teacher, axis=-1)
  per_token = jnp.sum(q * (jnp.log(q) - jnp.log((1 - alpha) * p + alpha * q)), axis=-1)
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.sum(mask)


def test_srkl_is_distillms_skew_reverse_kl_at_alpha_0_1():
  s, t = _logits(60, (3, 4, 11)), _logits(61, (3, 4, 11))
  mask = np.random.default_rng(62).random((3, 4)) < 0.7
  got = float(tokens.by_name("srkl")(s, t, mask))  # default alpha: DistiLLM's 0.1
  np.testing.assert_allclose(got, ref_loss("srkl", s, t, mask, alpha=0.1), rtol=1e-5)
  # the wrong alpha, the other mixture (alpha on the teacher) and the forward skew all differ
  for wrong in (ref_loss("srkl", s, t, mask, alpha=0.2), ref_loss("srkl", s, t, mask, alpha=0.9),
                ref_loss("skl", s, t, mask, alpha=0.1), ref_loss("rkl", s, t, mask)):
    assert abs(got - wrong) > 1e-3 * abs(wrong), wrong
  with jax.enable_x64(True):
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    for alpha in (0.1, 0.35):
      ours = lambda a: tokens.skew_reverse_kl(a, t64, mask, alpha=alpha)  # noqa: E731
      ref = lambda a: _srkl_reference_jnp(a, t64, mask, alpha)  # noqa: E731
      np.testing.assert_allclose(float(ours(s64)), float(ref(s64)), rtol=1e-12)
      np.testing.assert_allclose(np.asarray(jax.grad(ours)(s64)), np.asarray(jax.grad(ref)(s64)),
                                 rtol=1e-9, atol=1e-14)
