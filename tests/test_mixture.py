"""Mixture pytree: density against scipy, sample moments, sharpening, moment matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from kdjax import mixture as mx


def _scipy_log_prob(m, x):
  w = np.asarray(mx.weights(m), np.float64)
  mu = np.asarray(m.means, np.float64)
  cov = np.asarray(mx.covariances(m), np.float64)
  comps = np.stack([stats.multivariate_normal(mu[k], cov[k]).logpdf(x) for k in range(len(w))], -1)
  return logsumexp(comps + np.log(w), axis=-1)


# K = 1 (the single-term shortcut), 5 (the unrolled diagonal path), 20 (the component-axis path,
# above mixture._UNROLL_MAX_COMPONENTS)
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_prob_matches_scipy(covariance, k):
  m = mx.random_mixture(jax.random.PRNGKey(1), k, 3, covariance)
  assert mx.is_diag(m) == (covariance == "diag")
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (64, 3)))
  np.testing.assert_allclose(np.asarray(mx.log_prob(m, jnp.asarray(x))), _scipy_log_prob(m, x),
                             rtol=1e-4, atol=1e-4)


def test_grid8_is_the_papers_ground_truth():
  m = mx.grid8()
  assert m.means.shape == (8, 2)
  assert not np.any(np.all(np.asarray(m.means) == 0.0, axis=-1))  # no centre component
  np.testing.assert_allclose(np.asarray(mx.weights(m)), np.full(8, 1 / 8), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mx.covariances(m)),
                             np.broadcast_to(0.025 * np.eye(2), (8, 2, 2)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_sample_moments(covariance):
  m = mx.random_mixture(jax.random.PRNGKey(3), 3, 2, covariance)
  n = 200_000
  x = np.asarray(mx.sample(m, jax.random.PRNGKey(4), n), np.float64)
  mm = mx.moment_match(m, diag=False)
  mean, cov = np.asarray(mm.means[0]), np.asarray(mx.covariances(mm)[0])
  sd = np.sqrt(np.diag(cov))
  # 5 standard errors: the mean's SE is sd / sqrt(n), a variance's SE is about sd^2 sqrt(2 / n)
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * sd / np.sqrt(n))
  np.testing.assert_allclose(np.cov(x.T), cov, atol=5 * np.outer(sd, sd).max() * np.sqrt(2 / n) * 2)
  # per-component draws share the component's moments
  xc = np.asarray(mx.sample_components(m, jax.random.PRNGKey(5), 50_000))
  np.testing.assert_allclose(xc.mean(1), np.asarray(m.means), atol=0.01)


def test_sample_component_frequencies_follow_weights():
  m = mx.Mixture(jnp.log(jnp.array([0.7, 0.2, 0.1])), jnp.array([[-10.0], [0.0], [10.0]]),
                 jnp.full((3, 1), jnp.log(0.1)))
  x = np.asarray(mx.sample(m, jax.random.PRNGKey(0), 100_000))[:, 0]
  freq = np.array([(x < -5).mean(), (np.abs(x) < 5).mean(), (x > 5).mean()])
  np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=5 * np.sqrt(0.25 / 100_000))


def test_sharpen():
  m = mx.random_mixture(jax.random.PRNGKey(6), 6, 2)
  np.testing.assert_allclose(np.asarray(mx.weights(mx.sharpen(m, 1.0))), np.asarray(mx.weights(m)),
                             rtol=1e-5)
  betas = [0.5, 1.0, 2.0, 5.0, 20.0]
  entropies = [float(mx.weight_entropy(mx.sharpen(m, b))) for b in betas]
  assert all(a > b for a, b in zip(entropies, entropies[1:])), entropies
  w = np.asarray(mx.weights(m))
  sharp = np.asarray(mx.weights(mx.sharpen(m, 1000.0)))
  np.testing.assert_allclose(sharp, np.eye(6)[np.argmax(w)], atol=1e-6)
  assert float(mx.weight_entropy(mx.sharpen(m, 1000.0))) < 1e-5
  # sharpening changes weights only
  np.testing.assert_array_equal(np.asarray(mx.sharpen(m, 3.0).means), np.asarray(m.means))
  # weights^beta renormalised
  np.testing.assert_allclose(np.asarray(mx.weights(mx.sharpen(m, 2.0))), w**2 / np.sum(w**2),
                             rtol=1e-5)


def test_from_moments_round_trip_full():
  m = mx.random_mixture(jax.random.PRNGKey(7), 3, 4, "full")
  m2 = mx.from_moments(mx.weights(m), m.means, mx.covariances(m))
  np.testing.assert_allclose(np.asarray(mx.covariances(m2)), np.asarray(mx.covariances(m)),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_select_chain_and_gather_draw_the_same_samples(covariance, monkeypatch):
  """`sample` picks component parameters by a chain of selects for few components and by a gather
  for many; both must give the same draws bit for bit."""
  m = mx.random_mixture(jax.random.PRNGKey(7), 6, 2, covariance)
  chain = np.asarray(mx.sample(m, jax.random.PRNGKey(8), 4096))
  monkeypatch.setattr(mx, "_UNROLL_MAX_COMPONENTS", 0)
  gather = np.asarray(mx.sample(m, jax.random.PRNGKey(8), 4096))
  np.testing.assert_array_equal(chain, gather)


def test_sample_with_reuses_draws_across_mixtures():
  """Common random numbers: the same standard draws, turned into samples of two mixtures."""
  dr = mx.draws(jax.random.PRNGKey(0), 1000, 2)
  m = mx.random_mixture(jax.random.PRNGKey(1), 4, 2)
  np.testing.assert_array_equal(np.asarray(mx.sample_with(m, dr)),
                                np.asarray(mx.sample(m, jax.random.PRNGKey(0), 1000)))
  one = mx.moment_match(m, diag=True)
  x = np.asarray(mx.sample_with(one, dr))
  mean, sd = np.asarray(one.means[0]), np.exp(np.asarray(one.scales[0]))
  np.testing.assert_allclose(x, mean[None] + sd[None] * np.asarray(dr.eps),
                             rtol=1e-6)
