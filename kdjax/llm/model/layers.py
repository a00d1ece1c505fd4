"""The Llama layer math, once: pure functions over arrays that the Flax model (kdjax.llm.model.llama,
training and scoring) and the sampler's decode layout (kdjax.llm.model.sampling) both call.

  rms_norm        x / rms(x) * scale, in float32, returned in the compute dtype
  rope_tables     cos, sin of rotary's angles for some positions (computed once, shared by layers)
  rotate, rotary  HF Llama's rotary embedding (rotate the two halves of head_dim)
  attend_grouped  grouped-query softmax(q k^T / sqrt(E)) v over keys that may come in blocks along
                  the key axis (the sampler's KV cache): one softmax over all blocks' scores
  attend          the model's layout [B, T, H, E] and its choice of implementation (einsum through
                  attend_grouped, or jax.nn.dot_product_attention)
  swiglu, glu     the SwiGLU MLP (silu(x Wg) * (x Wu)) Wd, hand-written backward pass
  lm_head         the LM head, float32 logits from either weight layout; tied_lm_head its tied
                  form with a hand-written backward pass

The projections (x @ W) are plain dots that each caller lays out its own way: the model keeps the
canonical per-matrix kernels, the decode layout fuses q|k|v and gate|up per layer. What the
projections feed is computed here and nowhere else.

Shapes in names: B batch, T query length, S key length, D hidden, H heads, K kv heads, G = H // K
query heads per kv head, E head_dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

MASKED = -1e30  # finite, and every query may see itself: no softmax row is empty


def rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float, dtype) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in `dtype`."""
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * scale_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin [*positions.shape, 1, E/2] of rotary's angles (the 1 broadcasts over heads)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
  return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def rotate(x_xNxE: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotary with precomputed tables (rope_tables of x's positions): HF Llama's rotate-half
  convention, dims (i, i + E/2) rotated together, in float32, returned in x's dtype."""
  e = x_xNxE.shape[-1]
  x = x_xNxE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_xNxE.dtype)


def rotary(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of x at its positions (HF Llama's convention)."""
  return rotate(x_BxTxNxE, *rope_tables(positions_BxT, x_BxTxNxE.shape[-1], theta))


def _scores(q_BxKxGxTxE: jax.Array, k_BxKxSxE: jax.Array) -> jax.Array:
  """q k^T per kv head in float32 -> [B, K, G, T, S]. A single query (decoding, T = 1) is
  computed as k q^T, the keys the dot's left operand, then transposed: XLA:CPU runs these many
  tiny dots (G rows each) about 1.6x faster that way round (30 layers x 16 rows x 512 keys of
  SmolLM2-135M: 11.4 vs 18 ms here); longer queries keep the plain form."""
  if q_BxKxGxTxE.shape[3] != 1:
    return jnp.einsum("bkgte,bkse->bkgts", q_BxKxGxTxE, k_BxKxSxE, preferred_element_type=jnp.float32)
  s_BxKxSxG = jnp.einsum("bkse,bkge->bksg", k_BxKxSxE, q_BxKxGxTxE[:, :, :, 0],
                         preferred_element_type=jnp.float32)
  return s_BxKxSxG.transpose(0, 1, 3, 2)[:, :, :, None, :]


def attend_grouped(q_BxKxGxTxE: jax.Array, k_blocks: Sequence[jax.Array],
                   v_blocks: Sequence[jax.Array], allowed_BxTxS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(E), keys not allowed masked) v -> [B, K, G, T, E] in q's dtype.

  Keys and values come as blocks [B, K, S_j, E] along the key axis (S = sum S_j; one block is a
  plain attention): each block's scores are its own dot, read where the block lies (no copy of a
  cache prefix), the softmax runs once over all of them (float32), and the output sums each block's
  share. Every query must be allowed at least one key, so a masked score's weight is exactly 0.
  """
  e = q_BxKxGxTxE.shape[-1]
  scores = [_scores(q_BxKxGxTxE, kb.astype(q_BxKxGxTxE.dtype)) for kb in k_blocks]
  scores = (scores[0] if len(scores) == 1 else jnp.concatenate(scores, axis=-1)) * (e ** -0.5)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxKxGxTxE.dtype)
  out, start = None, 0
  for vb in v_blocks:
    s = vb.shape[2]
    part = jnp.einsum("bkgts,bkse->bkgte", probs[..., start:start + s], vb.astype(probs.dtype))
    out, start = part if out is None else out + part, start + s
  return out


def attend(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, allowed_BxTxS, impl: str = "einsum"):
  """Grouped-query attention in the model's layout: [B, T, H, E] in q's dtype; query head j reads
  kv head j // G (G = H // K). Every query must be allowed at least one key (the model lets each
  see itself), so a masked score's weight is exactly 0 whatever the fill (MASKED here; -0.7 x
  float32 max inside jax.nn.dot_product_attention).

  impl (LlamaConfig.attention): "einsum" the explicit float32 scores of attend_grouped; "dot_product"
  jax.nn.dot_product_attention with jax's default implementation (XLA); "cudnn" its cuDNN flash
  attention (NVIDIA GPUs, bfloat16 / float16; jax raises elsewhere).
  """
  b, t, h, e = q_BxTxHxE.shape
  k = k_BxSxKxE.shape[2]
  kk, v = k_BxSxKxE.astype(q_BxTxHxE.dtype), v_BxSxKxE.astype(q_BxTxHxE.dtype)
  if impl != "einsum":
    return jax.nn.dot_product_attention(q_BxTxHxE, kk, v, mask=allowed_BxTxS[:, None],
                                        scale=e ** -0.5,
                                        implementation="cudnn" if impl == "cudnn" else None)
  q_BxKxGxTxE = q_BxTxHxE.reshape(b, t, k, h // k, e).transpose(0, 2, 3, 1, 4)
  out = attend_grouped(q_BxKxGxTxE, [kk.transpose(0, 2, 1, 3)], [v.transpose(0, 2, 1, 3)],
                       allowed_BxTxS)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def _t(a_2d):
  """A transposed dot operand XLA must materialize: without the barrier its simplifier folds the
  transpose into the consuming dot, choosing a transposed-operand form that runs slower on CPU."""
  return jax.lax.optimization_barrier(a_2d.T)


def glu(g_xF: jax.Array, u_xF: jax.Array) -> jax.Array:
  """SwiGLU's gated activation silu(g) * u of the gate and up projections."""
  return jax.nn.silu(g_xF) * u_xF


@jax.custom_vjp
def swiglu(x_BxTxD, gate_DxF, up_DxF, down_FxD):
  """The SwiGLU MLP glu(x Wg, x Wu) Wd, with a hand-written backward pass.

  Autodiff is correct too; it let XLA write the [tokens, F] activation gradients transposed (a
  slow strided write) to feed the weight-gradient dots. Here every dot takes its operands in the
  fast layout: the transposes are of the small [tokens, D] arrays and of the weights.
  """
  return _swiglu_fwd(x_BxTxD, gate_DxF, up_DxF, down_FxD)[0]


def _swiglu_fwd(x_BxTxD, gate_DxF, up_DxF, down_FxD):
  g = jnp.einsum("btd,df->btf", x_BxTxD, gate_DxF)
  u = jnp.einsum("btd,df->btf", x_BxTxD, up_DxF)
  y = jnp.einsum("btf,fd->btd", glu(g, u), down_FxD)
  return y, (x_BxTxD, gate_DxF, up_DxF, down_FxD, g, u)


def _swiglu_bwd(res, dy_BxTxD):
  x_BxTxD, gate_DxF, up_DxF, down_FxD, g, u = res
  b, t, d = x_BxTxD.shape
  x_NxD, dy_NxD = x_BxTxD.reshape(b * t, d), dy_BxTxD.reshape(b * t, d).astype(x_BxTxD.dtype)
  g_NxF, u_NxF = g.reshape(b * t, -1), u.reshape(b * t, -1)
  sig_NxF = jax.nn.sigmoid(g_NxF)
  silu_NxF = g_NxF * sig_NxF
  dh_NxF = dy_NxD @ _t(down_FxD)
  du_NxF = dh_NxF * silu_NxF
  dg_NxF = dh_NxF * u_NxF * sig_NxF * (1 + g_NxF * (1 - sig_NxF))
  x_DxN, dy_DxN = _t(x_NxD), _t(dy_NxD)
  d_gate = x_DxN @ dg_NxF
  d_up = x_DxN @ du_NxF
  # [D, F] is the dot's fast output layout; the barrier keeps the transpose after it
  d_down = jax.lax.optimization_barrier(dy_DxN @ (silu_NxF * u_NxF)).T
  dx_NxD = dg_NxF @ _t(gate_DxF) + du_NxF @ _t(up_DxF)
  return (dx_NxD.reshape(b, t, d), d_gate.astype(gate_DxF.dtype), d_up.astype(up_DxF.dtype),
          d_down.astype(down_FxD.dtype))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def lm_head(x_xD: jax.Array, weight: jax.Array, layout: str) -> jax.Array:
  """Logits x @ W in float32 (float32 accumulation whatever the compute dtype): W the tied
  embedding table [V, D] (layout "vd") or an lm_head kernel [D, V] ("dv")."""
  spec = "...d,vd->...v" if layout == "vd" else "...d,dv->...v"
  return jnp.einsum(spec, x_xD, weight, preferred_element_type=jnp.float32)


@jax.custom_vjp
def tied_lm_head(x_BxTxD: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
  """lm_head(x, embedding, "vd") (float32 logits), with a hand-written backward pass.

  Autodiff would form the embedding gradient as g_(BT)xV^T @ x_(BT)xD, a dot over a transposed
  400 MB operand at tiny-49k scale that XLA:CPU runs at about half its matmul speed; here it is
  x^T @ g -> [D, V] (a fast layout) followed by a cheap [D, V] -> [V, D] transpose. Same values.
  """
  return lm_head(x_BxTxD, embedding_VxD, "vd")


def _tied_lm_head_fwd(x_BxTxD, embedding_VxD):
  return tied_lm_head(x_BxTxD, embedding_VxD), (x_BxTxD, embedding_VxD)


def _tied_lm_head_bwd(residuals, g_BxTxV):
  x_BxTxD, embedding_VxD = residuals
  g_BxTxV = g_BxTxV.astype(x_BxTxD.dtype)
  dx_BxTxD = jnp.einsum("btv,vd->btd", g_BxTxV, embedding_VxD)
  de_DxV = jnp.einsum("btv,btd->dv", g_BxTxV, x_BxTxD)
  # the barrier keeps XLA's simplifier from folding the transpose back into the dot (which would
  # make it the slow transposed-operand form again)
  de_DxV = jax.lax.optimization_barrier(de_DxV)
  return dx_BxTxD, de_DxV.T.astype(embedding_VxD.dtype)


tied_lm_head.defvjp(_tied_lm_head_fwd, _tied_lm_head_bwd)
