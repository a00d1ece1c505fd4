"""kdjax.llm.model.layers, the one definition of the layer math: each function against its formula
written out in numpy, and attention over keys in blocks (the sampler's KV cache) against one block."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm.model import layers


def test_rms_norm_matches_formula_and_returns_the_compute_dtype():
  rng = np.random.default_rng(0)
  x, scale = rng.normal(size=(2, 3, 8)), rng.normal(size=8)
  want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale
  got = layers.rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), 1e-5,
                        jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-2, atol=1e-2)
  got32 = layers.rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), 1e-5,
                          jnp.float32)
  np.testing.assert_allclose(np.asarray(got32), want, rtol=1e-5, atol=1e-6)


def _attention_reference(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, allowed_BxTxS):
  b, t, h, e = q_BxTxHxE.shape
  g = h // k_BxSxKxE.shape[2]
  out = np.zeros((b, t, h, e))
  for bi in range(b):
    for hi in range(h):
      s = q_BxTxHxE[bi, :, hi] @ k_BxSxKxE[bi, :, hi // g].T / np.sqrt(e)
      s = np.where(allowed_BxTxS[bi], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v_BxSxKxE[bi, :, hi // g]
  return out


def test_attend_matches_formula_and_blocks_match_one_block():
  rng = np.random.default_rng(1)
  b, t, s, h, k, e = 2, 3, 10, 4, 2, 8
  q, kk, v = (rng.normal(size=shape) for shape in ((b, t, h, e), (b, s, k, e), (b, s, k, e)))
  allowed = rng.random((b, t, s)) < 0.6
  allowed[:, :, 0] = True
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  got = layers.attend(f32(q), f32(kk), f32(v), jnp.asarray(allowed))
  np.testing.assert_allclose(np.asarray(got), _attention_reference(q, kk, v, allowed), atol=1e-5)
  # the sampler's form: kv heads leading, keys in blocks of 4, 4 and 2
  q_g = f32(q).reshape(b, t, k, h // k, e).transpose(0, 2, 3, 1, 4)
  k_t, v_t = f32(kk).transpose(0, 2, 1, 3), f32(v).transpose(0, 2, 1, 3)
  cuts = [(0, 4), (4, 8), (8, 10)]
  blocked = layers.attend_grouped(q_g, [k_t[:, :, i:j] for i, j in cuts],
                                  [v_t[:, :, i:j] for i, j in cuts], jnp.asarray(allowed))
  np.testing.assert_allclose(np.asarray(blocked.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)),
                             np.asarray(got), atol=1e-6)


def test_swiglu_and_lm_head_match_formulas():
  rng = np.random.default_rng(2)
  x, wg, wu, wd = (rng.normal(size=sh) for sh in ((2, 3, 4), (4, 6), (4, 6), (6, 4)))
  g, u = x @ wg, x @ wu
  want = (g / (1 + np.exp(-g)) * u) @ wd
  got = layers.swiglu(*(jnp.asarray(a, jnp.float32) for a in (x, wg, wu, wd)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  w_vd = rng.normal(size=(7, 4))
  for w, layout in ((w_vd, "vd"), (w_vd.T, "dv")):
    logits = layers.lm_head(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), layout)
    assert logits.dtype == jnp.float32  # float32 accumulation whatever the compute dtype
    np.testing.assert_allclose(np.asarray(logits), x @ w_vd.T, rtol=2e-2, atol=5e-2)
  tied = layers.tied_lm_head(jnp.asarray(x, jnp.float32), jnp.asarray(w_vd, jnp.float32))
  np.testing.assert_allclose(np.asarray(tied), x @ w_vd.T, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda w: jnp.sum(layers.tied_lm_head(jnp.asarray(x, jnp.float32), w) ** 2))
  want_grad = np.einsum("btv,btd->vd", 2 * (x @ w_vd.T), x)
  np.testing.assert_allclose(np.asarray(grad(jnp.asarray(w_vd, jnp.float32))), want_grad,
                             rtol=1e-4, atol=1e-4)
