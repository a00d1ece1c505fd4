"""Teacher-tempered token-level KD losses with hand-written gradients: the training fast path.

`tempered_rows(name, student_logits_BxTxV, teacher_logits_BxTxV, inv_temperature, mask_BxT)`
returns (loss_BxT, student_lse_BxT): per position the divergence `name` (kdjax.objectives.tokens'
fkl, rkl, jsd (beta 0.5), skl and srkl (alpha 0.1), tvd) between the target p_T = softmax(z_teacher *
inv_temperature) and the untempered student p_S = softmax(z_student), and the student's
log-normaliser (so the next-token NLL costs no further pass: nll = lse - z[target]).

Why: on a CPU, the vocabulary-sized passes of a 49k-vocabulary loss are bound by exp and log
(about 1.5 ns an element per core here, against 0.1 for a sum), and autodiff of the generic losses
(kdjax.objectives.tokens, kept as the reference) recomputes them several times over. Here each
distribution costs one exp per element (the normaliser and the probabilities from the same
exp(z - max)), jsd, skl and srkl one log more, and the backward pass none: every loss has
d loss / d z_S = p_S * (g - <p_S, g>) with g = d loss / d p_S saved from the forward pass
(fkl: p_S - p_T directly). The teacher's logits get no gradient (the caller freezes the teacher).

Numerics, for the finite logits training produces: masked rows are replaced by zeros before any
arithmetic (their loss is 0 and their gradient exactly 0); probabilities that underflow to 0 give
0 terms (their log-probabilities are formed from logits, never from log 0); mixtures are clamped
at the smallest normal float before their log. Checked against the generic losses (value and
gradient) in tests/test_objectives_tokens.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdjax.cli import require

JSD_BETA = 0.5    # tokens.jsd's default
SKL_ALPHA = 0.1   # tokens.skew_kl's and tokens.skew_reverse_kl's default
NAMES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def _softmax_parts(x_BxTxV):
  """(p, log p, log normaliser) of softmax(x) from one exp pass."""
  m_BxT = jax.lax.stop_gradient(jnp.max(x_BxTxV, axis=-1))
  e_BxTxV = jnp.exp(x_BxTxV - m_BxT[..., None])
  s_BxT = jnp.sum(e_BxTxV, axis=-1)
  lse_BxT = m_BxT + jnp.log(s_BxT)
  return e_BxTxV / s_BxT[..., None], x_BxTxV - lse_BxT[..., None], lse_BxT


def _log_mix(w, pt_BxTxV, ps_BxTxV):
  mix_BxTxV = w * pt_BxTxV + (1.0 - w) * ps_BxTxV
  tiny = jnp.finfo(mix_BxTxV.dtype).tiny
  return mix_BxTxV, jnp.log(jnp.maximum(mix_BxTxV, tiny))


def _loss_and_g(name, ps, ls, pt, lt):
  """(loss_BxT, g_BxTxV = d loss / d p_S), or for fkl (loss, p_T) (its gradient is p_S - p_T)."""
  if name == "fkl":
    return jnp.sum(pt * (lt - ls), axis=-1), pt
  if name == "rkl":
    return jnp.sum(ps * (ls - lt), axis=-1), ls - lt  # + 1, which the projection removes
  if name == "jsd":
    b = JSD_BETA
    _, lm = _log_mix(b, pt, ps)
    loss = b * jnp.sum(pt * (lt - lm), axis=-1) + (1 - b) * jnp.sum(ps * (ls - lm), axis=-1)
    return loss, (1 - b) * (ls - lm)
  if name == "skl":
    a = SKL_ALPHA
    mix, lm = _log_mix(a, pt, ps)
    ratio = pt / jnp.maximum(mix, jnp.finfo(mix.dtype).tiny)
    return jnp.sum(pt * (lt - lm), axis=-1), -(1 - a) * ratio
  if name == "srkl":  # KL(p_S || m), m = a p_S + (1 - a) p_T: g = log p_S - log m - a p_S / m (+ 1)
    a = SKL_ALPHA
    mix, lm = _log_mix(1.0 - a, pt, ps)
    ratio = ps / jnp.maximum(mix, jnp.finfo(mix.dtype).tiny)
    return jnp.sum(ps * (ls - lm), axis=-1), ls - lm - a * ratio
  if name == "tvd":
    return 0.5 * jnp.sum(jnp.abs(pt - ps), axis=-1), -0.5 * jnp.sign(pt - ps)
  raise ValueError(f"unknown objective {name!r}")


def _forward(name, zs_BxTxV, zt_BxTxV, inv_t, mask_BxT):
  dtype = jnp.promote_types(zs_BxTxV.dtype, jnp.float32)
  zero = jnp.zeros((), dtype)
  keep = mask_BxT[..., None]
  zs = jnp.where(keep, zs_BxTxV.astype(dtype), zero)
  zt = jnp.where(keep, zt_BxTxV.astype(dtype), zero) * jnp.asarray(inv_t, dtype)
  ps, ls, lse_s = _softmax_parts(zs)
  pt, lt, _ = _softmax_parts(zt)
  loss, g = _loss_and_g(name, ps, ls, pt, lt)
  loss = jnp.where(mask_BxT, loss, zero)
  return (loss, lse_s), (ps, g, mask_BxT, jnp.zeros((0,), zs_BxTxV.dtype))  # dtype carrier


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows(name, zs_BxTxV, zt_BxTxV, inv_t, mask_BxT):
  return _forward(name, zs_BxTxV, zt_BxTxV, inv_t, mask_BxT)[0]


def _rows_fwd(name, zs_BxTxV, zt_BxTxV, inv_t, mask_BxT):
  out, res = _forward(name, zs_BxTxV, zt_BxTxV, inv_t, mask_BxT)
  return out, (res, zt_BxTxV, inv_t)


def _rows_bwd(name, residuals, cotangents):
  (ps, g, mask_BxT, carrier), zt_BxTxV, inv_t = residuals
  d_loss_BxT, d_lse_BxT = cotangents
  if name == "fkl":
    grad = ps - g
  else:
    grad = ps * (g - jnp.sum(ps * g, axis=-1, keepdims=True))
  grad = grad * d_loss_BxT[..., None] + ps * d_lse_BxT[..., None]  # d lse / d z = p_S
  grad = jnp.where(mask_BxT[..., None], grad, jnp.zeros((), grad.dtype)).astype(carrier.dtype)
  return grad, jnp.zeros_like(zt_BxTxV), jnp.zeros_like(inv_t), None


_rows.defvjp(_rows_fwd, _rows_bwd)


def tempered_rows(name: str, student_logits_BxTxV, teacher_logits_BxTxV, inv_temperature,
                  mask_BxT):
  """(loss_BxT, student_lse_BxT): the divergence `name` per position between softmax(teacher *
  inv_temperature) and softmax(student), 0 where mask_BxT is False; gradients flow to the
  student's logits only. inv_temperature: 1 / T, a float or a traced scalar."""
  require(name in NAMES, f"unknown distillation objective {name!r}; known: {', '.join(NAMES)}")
  inv_t = jnp.asarray(inv_temperature, jnp.float32)
  return _rows(name, student_logits_BxTxV, teacher_logits_BxTxV, inv_t,
               jnp.asarray(mask_BxT).astype(bool))
