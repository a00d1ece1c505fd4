"""The fused tempered-teacher KD losses (kdjax.objectives.fused_tokens, kdjax.llm.train.head_kd) against
the generic losses of kdjax.objectives.tokens and autodiff: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.llm.train import head_kd
from kdjax.objectives import fused_tokens, tokens

NAMES = fused_tokens.NAMES


def _reference_mean(name, zs, zt, mask, t):
  return tokens.by_name(name)(zs, zt, mask, 1.0, teacher_temperature=t)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t", [0.5, 2.0])
def test_fused_rows_match_the_generic_losses(name, t):
  k = jax.random.split(jax.random.key(0), 3)
  zs, zt = 3 * jax.random.normal(k[0], (2, 5, 37)), 3 * jax.random.normal(k[1], (2, 5, 37))
  mask = jax.random.bernoulli(k[2], 0.7, (2, 5))
  count = jnp.sum(mask)

  def fused(z):
    rows, lse = fused_tokens.tempered_rows(name, z, zt, 1.0 / t, mask)
    return jnp.sum(rows) / count + 0.1 * jnp.sum(jnp.where(mask, lse, 0.0))

  def reference(z):
    lse = jax.nn.logsumexp(z, axis=-1)
    return _reference_mean(name, z, zt, mask, t) + 0.1 * jnp.sum(jnp.where(mask, lse, 0.0))

  v1, g1 = jax.value_and_grad(fused)(zs)
  v2, g2 = jax.value_and_grad(reference)(zs)
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)
  rows, _ = fused_tokens.tempered_rows(name, zs, zt, 1.0 / t, mask)
  assert np.all(np.asarray(rows)[~np.asarray(mask)] == 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_head_kd_matches_the_unfused_heads_and_loss(name, layout):
  """N = 2 students on one batch split into 4 chunks of positions (b = 8, t = 40): kd and nll
  sums per student, and the gradients of their kd sums in hidden states and head weights."""
  n, b, t, d, e, v = 2, 8, 40, 6, 5, 33
  k = jax.random.split(jax.random.key(1), 6)
  x = jax.random.normal(k[0], (n, b, t, d))
  w = jax.random.normal(k[1], (n, v, d) if layout == "vd" else (n, d, v))
  tx, tw = jax.random.normal(k[2], (b, t, e)), jax.random.normal(k[3], (v, e))
  y = jax.random.randint(k[4], (b, t), 0, v)
  mask = jax.random.bernoulli(k[5], 0.8, (b, t))
  inv_t = jnp.asarray([1 / 0.7, 1 / 1.3], jnp.float32)
  assert head_kd._chunk_len(b, t) == 10  # several chunks

  def logits(x_i, w_i):
    return x_i @ (w_i.T if layout == "vd" else w_i)

  def reference(x, w):
    zt = tx @ tw.T
    kd = jnp.stack([_reference_mean(name, logits(x[i], w[i]), zt, mask, 1 / inv_t[i])
                    * jnp.sum(mask) for i in range(n)])
    nll = jnp.stack([jnp.sum(jnp.where(mask, -jnp.take_along_axis(
        jax.nn.log_softmax(logits(x[i], w[i])), y[..., None], -1)[..., 0], 0.0))
        for i in range(n)])
    return kd, nll

  def fused(x, w):
    return head_kd.head_kd_sums(name, x, w, tx, tw, inv_t, 1 / inv_t, y, mask.astype(jnp.float32),
                                (layout, "vd"))

  (kd1, nll1), (kd2, nll2) = fused(x, w), reference(x, w)
  np.testing.assert_allclose(kd1, kd2, rtol=1e-4)
  np.testing.assert_allclose(nll1, nll2, rtol=1e-4)
  weights = jnp.asarray([0.3, -1.7])  # distinct cotangents per student
  g1 = jax.grad(lambda x, w: jnp.sum(weights * fused(x, w)[0]), argnums=(0, 1))(x, w)
  g2 = jax.grad(lambda x, w: jnp.sum(weights * reference(x, w)[0]), argnums=(0, 1))(x, w)
  for a, r in zip(g1, g2):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
