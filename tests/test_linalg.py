"""kdjax.linalg against numpy: Cholesky factors and forward substitution, batched, every D the GMM
study uses (the unrolled and the looped programs), gradients as jnp.linalg's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import linalg


@pytest.mark.parametrize("d", [1, 2, 8, 9, 16, 32])
def test_cholesky_and_solve_match_numpy(d):
  rng = np.random.default_rng(d)
  a = rng.standard_normal((3, d, d))
  a = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(d)
  ref = np.linalg.cholesky(a)
  tril = np.asarray(linalg.cholesky(jnp.asarray(a, jnp.float32)))
  np.testing.assert_allclose(tril, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  b = rng.standard_normal((3, d, 4))
  x = np.asarray(linalg.solve_lower(jnp.asarray(ref + np.triu(np.ones((d, d)), 1), jnp.float32),
                                    jnp.asarray(b, jnp.float32)))  # upper triangle is not read
  np.testing.assert_allclose(x, np.linalg.solve(ref, b), rtol=1e-4, atol=1e-4)


def test_not_positive_definite_gives_nan_and_gradients_match_jnp():
  assert np.isnan(np.asarray(linalg.cholesky(jnp.asarray([[1.0, 2.0], [2.0, 1.0]])))).any()
  f = lambda chol: lambda a: jnp.sum(jnp.sin(chol(a @ a.T + jnp.eye(4))))
  a = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)), jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.grad(f(linalg.cholesky))(a)),
                             np.asarray(jax.grad(f(jnp.linalg.cholesky))(a)), atol=1e-4)
