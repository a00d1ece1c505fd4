"""Issue 22, GMM half: the teacher truncated by top-p / top-k against a direct numpy computation
(boundaries and ties), its Monte Carlo entropy against the closed form of well-separated
components, the knob sweep equal to one-by-one runs (and its beta part bit for bit the beta-only
sweep), and the slopes per nat of entropy with their t-intervals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import mixture as mx
from kdjax.gmm import knobs, study
from tests.helpers import gmm_compiled


def _mixture(w, d=2, sep=0.0, full=False):
  w = np.asarray(w, np.float32)
  k = len(w)
  means = np.zeros((k, d), np.float32)
  means[:, 0] = sep * np.arange(k)
  var = np.stack([np.full(d, 0.5 + 0.25 * i, np.float32) for i in range(k)])
  if full:
    cov = np.stack([np.diag(v) for v in var]).astype(np.float32)
    cov[:, 0, 1] = cov[:, 1, 0] = 0.3
    return mx.from_moments(jnp.asarray(w / w.sum()), jnp.asarray(means), jnp.asarray(cov))
  return mx.from_moments(jnp.asarray(w / w.sum()), jnp.asarray(means), jnp.asarray(var))


def _kept_numpy(w, p, k):
  """Components kept: rank by weight, heaviest first, ties by index; top-k the first k; top-p
  every component whose heavier-ranked ones hold mass < p (p >= 1: all)."""
  w = np.asarray(w, np.float64)
  order = np.argsort(-w, kind="stable")
  before = np.concatenate([[0.0], np.cumsum(w[order])[:-1]])
  keep_sorted = (np.arange(len(w)) < k) & ((before < p) | (p >= 1))
  keep = np.zeros(len(w), bool)
  keep[order] = keep_sorted
  return keep


CASES = [  # (weights, top_p, top_k): boundaries where the exclusive mass equals p, and ties
    ([0.5, 0.25, 0.125, 0.125], 0.75, 4),  # mass before the third is exactly 0.75: two kept
    ([0.5, 0.25, 0.125, 0.125], 0.7500001, 4),  # just above: three
    ([0.125, 0.5, 0.125, 0.25], 0.875, 4),  # tie at the boundary: the lower index first
    ([0.25, 0.25, 0.25, 0.25], 0.5, 4),  # all tied: indices 0 and 1
    ([0.25, 0.25, 0.25, 0.25], 1.0, 2),  # top_k among ties: indices 0 and 1
    ([0.25, 0.25, 0.25, 0.25], 1.0, 7),  # k > K: all
    ([0.1, 0.2, 0.3, 0.4], 1e-6, 4),  # tiny p: the heaviest alone
    ([0.1, 0.2, 0.3, 0.4], 0.4, 4),  # exactly the heaviest's mass: it alone
    ([0.1, 0.2, 0.3, 0.4], 1.0, 1),
    ([1 - 3e-30, 1e-30, 1e-30, 1e-30], 1.0, 4),  # p = 1 keeps all despite rounding
    ([0.3, 0.3, 0.2, 0.2], 0.6, 3),  # both knobs at once
]


@pytest.mark.parametrize("w, p, k", CASES)
def test_truncation_keeps_what_numpy_keeps(w, p, k):
  m = _mixture(w)
  got = np.isfinite(np.asarray(mx.truncate(m, p, k).logits))
  want = _kept_numpy(np.asarray(mx.weights(m)), p, k)
  np.testing.assert_array_equal(got, want)
  kept_w = np.asarray(mx.weights(mx.truncate(m, p, k)))
  ref = np.where(want, np.asarray(mx.weights(m)), 0.0)
  np.testing.assert_allclose(kept_w, ref / ref.sum(), rtol=1e-6)  # renormalised


def test_truncation_matches_numpy_on_random_weights_with_ties():
  rng = np.random.default_rng(0)
  fn = jax.jit(jax.vmap(lambda logits, p, k: jnp.isfinite(
      mx.truncate(mx.Mixture(logits, jnp.zeros((5, 1)), jnp.zeros((5, 1))), p, k).logits)))
  w_NxK = rng.integers(1, 4, (400, 5)).astype(np.float32)  # small integers: many ties
  w_NxK /= w_NxK.sum(1, keepdims=True)
  p_N = rng.choice([0.2, 0.4, 0.5, 0.6, 0.8, 1.0], 400).astype(np.float32)
  k_N = rng.integers(1, 7, 400).astype(np.int32)
  got = np.asarray(fn(jnp.log(w_NxK), p_N, k_N))
  w32 = np.asarray(jax.nn.softmax(jnp.log(w_NxK), axis=-1))  # the weights truncate sees
  for i in range(400):
    np.testing.assert_array_equal(got[i], _kept_numpy(w32[i], p_N[i], k_N[i]), err_msg=str(i))


def test_keeping_everything_returns_the_logits_bit_for_bit_and_samples_skip_dropped():
  m = mx.sharpen(_mixture([0.1, 0.2, 0.3, 0.4]), 3.7)
  np.testing.assert_array_equal(np.asarray(mx.truncate(m, 1.0, 4).logits), np.asarray(m.logits))
  t = mx.truncate(_mixture([0.1, 0.2, 0.3, 0.4], sep=100.0), 1.0, 2)  # components 2 and 3
  x = np.asarray(mx.sample(t, jax.random.PRNGKey(0), 4000))
  comp = np.rint(x[:, 0] / 100.0)
  assert set(comp.tolist()) == {2.0, 3.0}
  assert np.mean(comp == 3.0) == pytest.approx(0.4 / 0.7, abs=0.03)
  assert np.all(np.isfinite(np.asarray(mx.log_prob(t, jnp.asarray(x)))))


def _closed_form(m):
  """H(weights) + sum_k w_k H(N_k): the entropy of components too far apart to overlap."""
  w = np.asarray(mx.weights(m), np.float64)
  cov = np.asarray(mx.covariances(m), np.float64)
  d = cov.shape[-1]
  h_k = 0.5 * (d * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1])
  nz = w > 0
  return float(-np.sum(w[nz] * np.log(w[nz])) + np.sum(w * h_k))


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("p, k", [(1.0, 4), (1.0, 1), (0.7, 4), (1.0, 2)])
def test_entropy_matches_the_closed_form_of_well_separated_components(full, p, k):
  m = mx.truncate(_mixture([0.1, 0.2, 0.3, 0.4], sep=100.0, full=full), p, k)
  h = float(jax.jit(mx.entropy, static_argnums=2)(m, jax.random.PRNGKey(1), 40000))
  # -log N(x) = const + 0.5 chi2_2 per component: sd 1, so the standard error is ~0.005
  assert h == pytest.approx(_closed_form(m), abs=0.03)


SMALL = study.StudyConfig(n_train=60, teacher_components=4, n_teacher_samples=200, n_eval=400,
                          objectives=("seqkd", "fkl"), steps=20, batch_size=32)


@pytest.fixture(scope="module")
def sweep():
  labels, betas_B, truncation = knobs.grid(("beta", "top_p", "top_k"), [1.0, 8.0], [0.3, 0.9],
                                           [1, 3], SMALL.teacher_components)
  seeds = jnp.arange(2, dtype=jnp.int32)
  # compiled as the entry point compiles the grid (study.compiler_options: less compile time)
  both, _ = study.compile_and_run(SMALL, mx.grid8(), seeds, betas_B, truncation)
  beta_only, _ = study.compile_and_run(SMALL, mx.grid8(), seeds, betas_B)
  return labels, betas_B, truncation, both, beta_only


def test_grid_lays_out_every_knob_at_the_others_identity(sweep):
  labels, betas_B, (beta_T, top_p_T, top_k_T), _, _ = sweep
  assert labels == [("beta", 1.0), ("beta", 8.0), ("top_p", pytest.approx(0.3)),
                    ("top_p", pytest.approx(0.9)), ("top_k", 1), ("top_k", 3)]
  np.testing.assert_array_equal(betas_B, [1, 8])
  np.testing.assert_array_equal(beta_T, [1, 1, 1, 1])
  np.testing.assert_allclose(top_p_T, [0.3, 0.9, 1, 1])
  np.testing.assert_array_equal(top_k_T, [4, 4, 1, 3])


def test_beta_configurations_of_the_knob_sweep_equal_the_beta_only_sweep(sweep):
  *_, both, beta_only = sweep
  for key in ("precision", "recall", "final_objective"):
    for m in SMALL.methods:
      np.testing.assert_array_equal(np.asarray(both[key][m])[:, :2],
                                    np.asarray(beta_only[key][m]), err_msg=f"{key} {m}")
  for key in ("teacher_entropy", "teacher_density_entropy"):
    np.testing.assert_array_equal(np.asarray(both[key])[:, :2], np.asarray(beta_only[key]))


def test_knob_sweep_equals_one_by_one_runs(sweep):
  _, _, (beta_T, top_p_T, top_k_T), both, _ = sweep
  knob = lambda t: (jnp.float32(beta_T[t]), jnp.float32(top_p_T[t]), jnp.int32(top_k_T[t]))
  one = gmm_compiled(study.run_config, SMALL, mx.grid8(), 1, *knob(0), static_argnums=0)
  for t in range(4):
    single = one(mx.grid8(), 1, *knob(t))
    for key in ("precision", "recall"):
      for m in SMALL.methods:
        np.testing.assert_allclose(float(single[key][m]), float(both[key][m][1, 2 + t]),
                                   rtol=1e-4, atol=1e-4, err_msg=f"{key} {m} config {t}")
    for key in ("teacher_entropy", "teacher_density_entropy"):
      np.testing.assert_allclose(float(single[key]), float(both[key][1, 2 + t]), rtol=1e-5)
  # truncation lowers the entropy; top_k = 1 is the heaviest component alone (weight entropy 0)
  h = np.asarray(both["teacher_density_entropy"])
  assert np.all(h[:, 4] < h[:, 0]) and np.all(h[:, 5] <= h[:, 0] + 1e-6)
  np.testing.assert_allclose(np.asarray(both["teacher_entropy"])[:, 4], 0.0, atol=1e-6)


def test_t_quantile_and_slope_intervals():
  from scipy import stats
  for df in (1, 2, 5, 15, 60):
    assert knobs.t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-5)
  rows = []
  for seed, (a, b) in enumerate([(2.0, -1.0), (3.0, -2.0), (4.0, -3.0)]):
    for knob, xs in (("beta", [0.5, 1.0, 2.0]), ("top_k", [0.5, 1.5])):
      for x in xs:
        y = (a if knob == "beta" else 2 * a) * x + seed
        rows.append({"objective": "seqkd", "knob": knob, "seed": seed, "status": "ok",
                     "teacher_density_entropy": x, "precision": y, "recall": b * x})
  rows.append(dict(rows[0], status="not_converged", precision=1e6))  # left out
  out = knobs.slopes(rows)["seqkd"]
  ci = out["beta"]["precision"]
  assert ci["mean"] == pytest.approx(3.0) and ci["n"] == 3
  half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
  assert (ci["lo"], ci["hi"]) == pytest.approx((3.0 - half, 3.0 + half))
  assert out["top_k"]["precision"]["mean"] == pytest.approx(6.0)
  assert out["top_k"]["minus_beta"]["precision"]["mean"] == pytest.approx(3.0)
  assert out["top_k"]["minus_beta"]["recall"]["mean"] == pytest.approx(0.0, abs=1e-12)
  assert out["beta"]["entropy_range"] == [0.5, 2.0]
