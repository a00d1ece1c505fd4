"""The LM heads and a teacher-tempered token-level KD loss fused, for training (kdjax.llm.train.head_nll's
counterpart for the study's token-level and on-policy students).

  kd_sum = sum_t w_t * D_name(softmax(tx_t Wt / T) || softmax(x_t W))   (D: objectives.fused_tokens)
  nll_sum = sum_t w_t * -log softmax(x_t W)[y_t]                         (a metric: no gradient)

Formed chunk by chunk of positions, as head_nll does: a chunk's student and teacher logits, both
softmaxes, the loss, its analytic logits gradient, the input gradient dx and the chunk's share of
dW are made while the chunk is close to the cache, so no [B, T, V] array is ever written. On this
project's 2-core CPU the step of a 49k-vocabulary student is bound by memory traffic over such
arrays (about 6.5 GB/s: one pass over [32, 33, 49152] float32 costs ~32 ms), so this matters more
than any arithmetic. The gradients are formed in the forward pass for a unit cotangent and scaled
in the backward pass (kd_sum is a sum). The teacher's hidden states and head get no gradient.

N students share a batch: per chunk the teacher's logits are formed once, then each student's
loss and gradients in turn (lax.map over the students: on this CPU a vmap over them, which
batches every [rows, V] array N-fold, was 2x slower than one student after another). Single
students (on-policy batches, one per student) pass N = 1. tests/test_head_kd.py checks values
and gradients against the generic losses and autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kdjax.llm.model import truncation
from kdjax.llm.train import head_nll
from kdjax.llm.train.head_nll import _logits, _split, _target_rows, _unsplit
from kdjax.objectives import fused_tokens

# Rows (batch x positions) per chunk: each chunk holds about six [rows, V] float32 arrays (two
# logits, two softmaxes, the loss's g, the logits gradient): 64 rows x 49152 x 4 bytes = 12.6 MB
# each. Measured on the 2-core CPU (nano-49k student, micro-49k teacher, batch 32 x 33): see
# experiments/bench_train.py --kd_temperatures.
CHUNK_ROWS = 128


def chunk_rows(platform: str, hidden: int) -> int:
  """head_nll.chunk_rows with this module's CPU figure."""
  return head_nll.chunk_rows(platform, hidden, CHUNK_ROWS)


def _chunk_len(b: int, t: int, rows: int = CHUNK_ROWS) -> int:
  """Positions per chunk: the largest divisor of t with b x positions <= rows."""
  return head_nll._chunk_len(b, t, rows)


def _student_chunk(name, x, w, pt, lt, y, wt, layout, with_grads):
  """One student's (kd sum, nll sum, weighted d kd / d logits, dx) on a chunk, given the
  teacher's softmax parts there."""
  zs = _logits(x, w, layout)
  ps, ls, lse = fused_tokens._softmax_parts(zs)
  loss, g = fused_tokens._loss_and_g(name, ps, ls, pt, lt)
  picked = jnp.einsum("bcd,bcd->bc", x, _target_rows(w, y, layout),
                      preferred_element_type=jnp.float32)
  kd, nll = jnp.sum(wt * loss), jnp.sum(wt * (lse - picked))
  if not with_grads:
    return kd, nll, None, None
  dz = ps - g if name == "fkl" else ps * (g - jnp.sum(ps * g, axis=-1, keepdims=True))
  dz = (dz * wt[..., None]).astype(x.dtype)
  spec = "bcv,vd->bcd" if layout == "vd" else "bcv,dv->bcd"
  dx = jnp.einsum(spec, dz, w, preferred_element_type=jnp.float32).astype(x.dtype)
  return kd, nll, dz, dx


def _target_parts(zt, inv_t, knob_value, knob):
  """(p, log p) of the teacher's target on a chunk: softmax(zt * inv_t) (the temperature knob,
  exactly as before knobs existed), or the truncation `knob` at `knob_value` (kdjax.llm.model.
  truncation, the sampler's rule; inv_t is then 1) renormalised, the cut tokens' log p set to 0
  (their p is 0: every loss's terms in them vanish, none forms 0 x -inf)."""
  if knob == "temperature":
    pt, lt, _ = fused_tokens._softmax_parts(zt * inv_t)
    return pt, lt
  z, kept = truncation.knob_target(zt * inv_t, knob, knob_value)
  pt, lt, _ = fused_tokens._softmax_parts(z)
  return pt, jnp.where(kept, lt, 0.0)


def _scan(name, x_N, w_N, tx, tw, inv_t_N, knob_N, y, wt, layouts, knob, with_grads, rows):
  """Over chunks of positions: the teacher's logits once per chunk, then each student in turn
  (lax.map over the student axis: one student's [rows, V] arrays at a time)."""
  b, t = y.shape
  c = _chunk_len(b, t, rows)

  def body(dw_N, xs):
    x_c_N, tx_c, y_c, wt_c = xs
    zt = _logits(tx_c, tw, layouts[1])

    def student(args):
      x_c, w, inv_t, knob_value, dw = args
      pt, lt = _target_parts(zt, inv_t, knob_value, knob)
      kd, nll, dz, dx = _student_chunk(name, x_c, w, pt, lt, y_c, wt_c, layouts[0], with_grads)
      if with_grads:
        dw = dw + jnp.einsum("bcd,bcv->dv", x_c, dz, preferred_element_type=jnp.float32)
      return kd, nll, dx, dw

    kd_N, nll_N, dx_N, dw_N = jax.lax.map(student, (x_c_N, w_N, inv_t_N, knob_N, dw_N))
    return dw_N, (kd_N, nll_N, dx_N)

  n = x_N.shape[0]
  d, v = (w_N.shape[2], w_N.shape[1]) if layouts[0] == "vd" else w_N.shape[1:]
  # a placeholder without gradients (lax.map needs one)
  dw0 = head_nll.varying_like(jnp.zeros((n, d, v), jnp.float32), x_N)
  split_N = jax.vmap(lambda a: _split(a, c))
  dw_N, (kd_CxN, nll_CxN, dx_CxN) = jax.lax.scan(
      body, dw0, (split_N(x_N).swapaxes(0, 1), _split(tx, c), _split(y, c), _split(wt, c)))
  return jnp.sum(kd_CxN, axis=0), jnp.sum(nll_CxN, axis=0), dw_N, dx_CxN


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 9, 10, 11))
def head_kd_sums(name, x_NxBxTxD, w_N, teacher_x_BxTxE, teacher_w, inv_temperature_N, knob_N,
                 targets_BxT, weights_BxT, layouts=("vd", "vd"), knob="temperature",
                 rows=CHUNK_ROWS):
  """(kd_sum [N], nll_sum [N]) of N students on one batch, over positions weighted by weights_BxT
  (the target mask), float32. Student i: hidden states x[i], head weight w[i] ([V, D] "vd" or
  [D, V] "dv"), target softmax(teacher logits * inv_temperature[i]), or with `knob` a
  truncation (top_p, min_p, top_k) the teacher's logits truncated at knob_N[i] and renormalised
  (knob_N is ignored under the default knob "temperature"); teacher_x / teacher_w: the
  teacher's hidden states and head weight, shared; layouts: (students', teacher's). kd_sum[i] is
  differentiable in x[i] and w[i]; nll_sum is a metric (its cotangent is ignored). rows: batch x
  positions per chunk (chunk_rows).
  """
  return _scan(name, x_NxBxTxD, w_N, teacher_x_BxTxE, teacher_w, inv_temperature_N, knob_N,
               targets_BxT, weights_BxT.astype(jnp.float32), layouts, knob, False, rows)[:2]


def _fwd(name, x_N, w_N, tx, tw, inv_t_N, knob_N, y, wt, layouts, knob, rows):
  b, t = y.shape
  kd, nll, dw_NxDxV, dx_CxN = _scan(name, x_N, w_N, tx, tw, inv_t_N, knob_N, y,
                                    wt.astype(jnp.float32), layouts, knob, True, rows)
  dx_N = jax.vmap(lambda a: _unsplit(a, b, t))(dx_CxN.swapaxes(0, 1))
  # the barrier keeps XLA from folding the transpose into the dot (head_nll's note)
  dw_N = (jax.lax.optimization_barrier(dw_NxDxV).swapaxes(1, 2) if layouts[0] == "vd"
          else dw_NxDxV)
  return (kd, nll), (dx_N, dw_N.astype(w_N.dtype), tx, tw, inv_t_N, knob_N, y, wt)


def _bwd(name, layouts, knob, rows, residuals, cotangents):
  dx_N, dw_N, tx, tw, inv_t_N, knob_N, y, wt = residuals
  g_kd_N, _ = cotangents  # nll_sum is a metric
  zero = lambda a: (jnp.zeros(a.shape, jax.dtypes.float0)
                    if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a))
  scale = lambda g, a: (g.reshape((-1,) + (1,) * (a.ndim - 1)) * a).astype(a.dtype)
  return (scale(g_kd_N, dx_N), scale(g_kd_N, dw_N), zero(tx), zero(tw), zero(inv_t_N),
          zero(knob_N), zero(y), zero(wt))


head_kd_sums.defvjp(_fwd, _bwd)
