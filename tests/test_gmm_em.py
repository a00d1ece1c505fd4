"""EM against scikit-learn from the same initialisation; jit / vmap; initialisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from kdjax.gmm import em
from kdjax import mixture as mx


def _data(n=300, seed=0):
  return mx.sample(mx.grid8(), jax.random.PRNGKey(seed), n)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_em_matches_sklearn_from_same_init(covariance):
  x = _data()
  diag = covariance == "diag"
  start = em.init_mixture(jax.random.PRNGKey(1), x, 4, diag=diag, init="kmeans++")
  fitted, info = jax.jit(lambda x, s: em.fit_from(x, s, max_iter=25, tol=1e-5))(x, start)
  cov = np.asarray(mx.variances(start) if diag else mx.covariances(start), np.float64)
  precisions = 1.0 / cov if diag else np.linalg.inv(cov)
  w = np.asarray(mx.weights(start), np.float64)
  ref = GaussianMixture(4, covariance_type=covariance, max_iter=25, tol=1e-5, reg_covar=1e-6,
                        weights_init=w / w.sum(),
                        means_init=np.asarray(start.means, np.float64),
                        precisions_init=precisions).fit(np.asarray(x, np.float64))
  x64 = np.asarray(x, np.float64)
  ours = float(jnp.mean(mx.log_prob(fitted, x)))
  assert abs(ours - ref.score(x64)) < 1e-4, (ours, ref.score(x64))
  assert abs(float(info.lower_bound) - ref.lower_bound_) < 1e-4
  assert int(info.n_iter) == ref.n_iter_
  assert bool(info.converged) == ref.converged_
  np.testing.assert_allclose(np.asarray(fitted.means), ref.means_, atol=1e-4)
  np.testing.assert_allclose(np.asarray(mx.weights(fitted)), ref.weights_, atol=1e-4)
  ref_cov = ref.covariances_
  np.testing.assert_allclose(np.asarray(mx.variances(fitted) if diag else mx.covariances(fitted)),
                             ref_cov, rtol=1e-3, atol=1e-5)


def test_em_increases_likelihood_and_beats_the_start():
  x = _data(seed=3)
  for init in em.INITS:
    start = em.init_mixture(jax.random.PRNGKey(2), x, 4, init=init)
    fitted, info = em.fit_from(x, start, max_iter=100, tol=1e-6)
    assert float(jnp.mean(mx.log_prob(fitted, x))) > float(jnp.mean(mx.log_prob(start, x)))
    assert bool(info.converged)


def test_em_vmaps_with_a_convergence_mask():
  """A batch of fits under vmap equals the fits one by one (each stops at its own iteration)."""
  xs = jnp.stack([_data(200, s) for s in range(3)])
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  fit = lambda k, x: em.fit(k, x, 4, init="kmeans", max_iter=100, tol=1e-3)
  batched, info = jax.jit(jax.vmap(fit))(keys, xs)
  iters = []
  for i in range(3):
    single, single_info = jax.jit(fit)(keys[i], xs[i])
    np.testing.assert_allclose(np.asarray(batched.means[i]), np.asarray(single.means), atol=1e-5)
    assert int(info.n_iter[i]) == int(single_info.n_iter)
    iters.append(int(single_info.n_iter))
  assert len(set(iters)) > 1, iters  # the fits really stopped at different iterations


def test_kmeans_plusplus_picks_distinct_data_points():
  x = _data(100)
  centres = np.asarray(em.kmeans_plusplus(jax.random.PRNGKey(0), x, 6))
  xs = np.asarray(x)
  for c in centres:
    assert np.min(np.abs(xs - c).sum(-1)) == 0.0
  assert len({tuple(c) for c in centres}) == 6


def test_one_component_fit_is_the_sample_moments():
  x = _data(500)
  fitted, _ = em.fit(jax.random.PRNGKey(0), x, 1, diag=False, reg_covar=0.0)
  np.testing.assert_allclose(np.asarray(fitted.means[0]), np.asarray(x).mean(0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(mx.covariances(fitted)[0]),
                             np.cov(np.asarray(x, np.float64).T, bias=True), atol=1e-5)


@pytest.mark.parametrize("diag", [True, False])
def test_one_component_fit_from_any_start_is_the_maximum_likelihood_gaussian(diag):
  """K = 1 skips the EM loop (one M-step is the optimum): check it against running EM steps."""
  x = _data(300, seed=4)
  start = mx.random_mixture(jax.random.PRNGKey(9), 1, 2, "diag" if diag else "full")
  fitted, info = em.fit_from(x, start, max_iter=50, tol=1e-6)
  assert bool(info.converged) and int(info.n_iter) == 1
  resp = jnp.ones((x.shape[0], 1))
  stepped = em.m_step(x, resp, diag, 1e-6)
  for _ in range(3):  # EM iterations from the M-step's result change nothing
    _, resp = em.e_step(stepped, x)
    stepped = em.m_step(x, resp, diag, 1e-6)
  np.testing.assert_allclose(np.asarray(fitted.means), np.asarray(stepped.means), atol=1e-6)
  np.testing.assert_allclose(np.asarray(mx.covariances(fitted)),
                             np.asarray(mx.covariances(stepped)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(info.lower_bound), float(jnp.mean(mx.log_prob(stepped, x))),
                             rtol=1e-6)


@pytest.mark.parametrize("diag", [True, False])
def test_a_component_collapsing_onto_one_point_keeps_reg_covar(diag):
  """Duplicated points pull a component onto a single point: its variance must stay >= reg_covar
  (scikit-learn's guard) and every log-density finite."""
  reg = 1e-3
  x = jnp.concatenate([jnp.full((40, 2), 5.0), mx.sample(mx.grid8(), jax.random.PRNGKey(0), 60)])
  start = em.init_mixture(jax.random.PRNGKey(1), x, 3, diag=diag, init="kmeans", reg_covar=reg)
  fitted, _ = em.fit_from(x, start, max_iter=50, tol=1e-8, reg_covar=reg)
  var = np.asarray(mx.variances(fitted))
  collapsed = np.argmin(np.linalg.norm(np.asarray(fitted.means) - 5.0, axis=-1))
  np.testing.assert_allclose(var[collapsed], reg, rtol=1e-2)  # it did collapse, onto reg_covar
  assert np.all(var >= reg * (1 - 1e-4)), var
  assert np.all(np.isfinite(np.asarray(mx.log_prob(fitted, x))))
  one = em.one_gaussian(jnp.full((10, 2), 3.0), diag, reg)
  np.testing.assert_allclose(np.asarray(mx.variances(one)), reg, rtol=1e-4)
