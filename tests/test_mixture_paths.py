"""mixture.log_prob's three diagonal paths (unrolled K x D chains, static loop over D, one
reduction over D) and the full-covariance path agree with scipy and with each other, values and
gradients: the unroll limits that keep compile time down change no result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import mixture as mx
from tests.test_mixture import _scipy_log_prob


# (K, D): 3 x 2 unrolled chains; 1 x 3 static loop over D; 1 x 8, 3 x 8 and 20 x 6 one reduction
# over D (K x D above mixture._UNROLL_MAX_TERMS, D above mixture._UNROLL_MAX_DIMS); 5 x 3 the
# component axis with the loop over D when the unrolled chains are limited below K x D; 2 x 1 a
# one-dimensional p* (1 x 1 covariances, as a 1-D json ground truth with --covariance=full)
@pytest.mark.parametrize("k,d", [(3, 2), (1, 3), (1, 8), (3, 8), (20, 6), (5, 3), (2, 1)])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_log_prob_paths_match_scipy(covariance, k, d):
  m = mx.random_mixture(jax.random.PRNGKey(k * 100 + d), k, d, covariance)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (64, d)))
  want = _scipy_log_prob(m, x)
  for limit in (None, 0):  # the default limit, and every mixture on the vectorized path
    got = np.asarray(mx.log_prob(m, jnp.asarray(x), max_unrolled=limit))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,d", [(4, 2), (2, 8)])
def test_unrolled_and_vectorized_log_prob_agree_with_gradients(k, d):
  m = mx.random_mixture(jax.random.PRNGKey(3), k, d)
  x = jax.random.normal(jax.random.PRNGKey(4), (256, d))
  f = lambda m, limit: jnp.mean(mx.log_prob(m, x, max_unrolled=limit))
  np.testing.assert_allclose(np.asarray(mx.log_prob(m, x, max_unrolled=64)),
                             np.asarray(mx.log_prob(m, x, max_unrolled=0)), rtol=1e-6, atol=1e-5)
  g_unrolled, g_vector = jax.grad(f)(m, 64), jax.grad(f)(m, 0)
  for a, b in zip(jax.tree.leaves(g_unrolled), jax.tree.leaves(g_vector)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
