"""The teacher's truncations (top-k, top-p, min-p) as ONE rule, shared by the sampler
(kdjax.llm.model.sampling.draw) and the token-level distillation targets
(kdjax.llm.train.head_kd), so that a teacher sampled with a truncation and a target truncated
the same way cannot drift apart; the study's teacher entropy (kdjax.llm.study.entropy) reads it too.

A truncation is a per-row logit threshold: a token is kept iff its (tempered) logit z >= the
threshold, so the kept set does not depend on the order tokens are listed in (the sampler and the
loss see the vocabulary in the same order anyway), and TIES AT THE BOUNDARY ARE ALL KEPT:

  top-k  threshold = the k-th largest logit: every token tied with the k-th is kept (more than k
         tokens when the k-th has equals); k <= 0 or k >= V is no truncation.
  top-p  on the probabilities sorted in descending order, the nucleus is the smallest prefix whose
         mass reaches p (a token is in it iff the mass of the tokens before it is < p: the top
         token always is); the threshold is the logit of the prefix's last token, so every token
         tied with it is kept too. Equivalently (as computed, without a sort): the threshold is
         the largest logit tau with mass(z >= tau) >= p. With top-k as well, top-p is formed on
         the renormalised top-k set (top-k first, as Hugging Face's and this sampler's order).
  min-p  keep p_i >= min_p x max_j p_j, i.e. z_i >= max z + log(min_p) (0: no truncation). The
         ratio does not change under renormalisation, so min-p after top-k / top-p is the same
         as min-p alone intersected with them.

Masses are formed in float32 from exp(z - max z) (mass(z >= tau) = a masked sum, compared with
p x the total): at a boundary that holds exactly (mass before a token == p, p_i == min_p p_max)
rounding decides; tests/test_llm_truncation.py checks the rule
against numpy away from such knife edges and at ties exactly.

`top_k` is a Python int (static: whether it is on at all, the sampler's case) or an array (traced:
for a vmapped sweep of k); either way the threshold is the largest logit with >= k logits at or
above it, by the same bisection as top-p's; `top_p` and `min_p` are arrays or scalars, or None
(off, static). Logits of shape [..., V]; per-row values broadcast against [...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KNOBS = ("temperature", "top_p", "min_p", "top_k")


def _rows(x, shape, dtype):
  return jnp.broadcast_to(jnp.asarray(x, dtype), shape)


def _key(x_f32):
  """float32 -> uint32 in the same order (the sign bit flipped, negatives' bits inverted)."""
  i = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
  return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _unkey(k_u32):
  i = jnp.where(k_u32 >> 31 == 1, k_u32 & jnp.uint32(0x7FFFFFFF), ~k_u32)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


def _largest_reaching(z_xV, w_xV, need_x):
  """Per row, the largest logit value tau with sum(w[z >= tau]) >= need (need <= sum(w)): by
  bisection on tau's float32 bit pattern (32 halvings of [min z, max z], each one masked sum over
  the vocabulary). The sum only changes at logit values, so tau is one of the row's logits, and
  every logit tied with it is >= tau. (A sort of the vocabulary per row and step, the obvious
  way, was ~3 s a decode step of 64 rows x 49152 on this CPU.)"""
  z = z_xV.astype(jnp.float32)
  lo = _key(jnp.min(jnp.where(jnp.isfinite(z), z, jnp.inf), axis=-1))  # reaches: sum(w) >= need
  hi = _key(jnp.max(z, axis=-1)) + jnp.uint32(1)                        # z >= hi: none

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    mass = jnp.sum(jnp.where(z >= _unkey(mid)[..., None], w_xV, 0.0), axis=-1)
    ok = (mass >= need_x) & (hi - lo > 1)
    return jnp.where(ok, mid, lo), jnp.where(ok | (hi - lo <= 1), hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  # the logit itself (XLA:CPU compares a subnormal tau as 0: the bisection may end on one)
  tau = _unkey(lo)
  return jnp.min(jnp.where(z >= tau[..., None], z, jnp.inf), axis=-1).astype(z_xV.dtype)


def keep_threshold(z_xV, top_k=0, top_p=None, min_p=None):
  """The per-row threshold [...] of the module's rule (-inf: keep everything)."""
  v = z_xV.shape[-1]
  lead = z_xV.shape[:-1]
  thr = jnp.full(lead, -jnp.inf, z_xV.dtype)
  static_k = isinstance(top_k, (int, np.integer))
  if static_k and not 0 < top_k < v:
    top_k = 0
  if not static_k or top_k:  # the largest value with >= k logits at or above it (lax.top_k:
    k = _rows(top_k, lead, jnp.int32)  # 1.3 s for k = 20 of 64 x 49152 on this CPU, this 0.1 s)
    kth = _largest_reaching(z_xV, jnp.ones(z_xV.shape, jnp.float32),
                            jnp.clip(k, 1, v).astype(jnp.float32))
    thr = jnp.where((k > 0) & (k < v), kth, thr)
  if top_p is not None:  # on the top-k set: the largest value whose tokens at or above hold >= p
    m = jnp.max(z_xV, axis=-1, keepdims=True)
    w = jnp.where(z_xV >= thr[..., None], jnp.exp(z_xV - m), 0.0).astype(jnp.float32)
    p = _rows(top_p, lead, jnp.float32)
    thr = jnp.maximum(thr, _largest_reaching(z_xV, w, p * jnp.sum(w, axis=-1)))
  if min_p is not None:
    m = _rows(min_p, lead, z_xV.dtype)
    thr = jnp.maximum(thr, jnp.max(z_xV, axis=-1) + jnp.log(m))  # log 0 = -inf: off
  return thr


def truncate(z_xV, top_k=0, top_p=None, min_p=None):
  """(z with the cut tokens at -inf, kept mask) under keep_threshold's rule."""
  kept = z_xV >= keep_threshold(z_xV, top_k, top_p, min_p)[..., None]
  return jnp.where(kept, z_xV, -jnp.inf), kept


def knob_target(z_xV, knob: str, value):
  """(logits of the teacher's target under `knob` at `value`, kept mask or None): temperature
  divides (value = T), a truncation cuts at temperature 1 (value: p, min-p, or k as a number)."""
  if knob == "temperature":
    return z_xV / jnp.asarray(value, z_xV.dtype), None
  if knob == "top_p":
    return truncate(z_xV, top_p=value)
  if knob == "min_p":
    return truncate(z_xV, min_p=value)
  if knob == "top_k":
    return truncate(z_xV, top_k=jnp.round(jnp.asarray(value)).astype(jnp.int32))
  raise ValueError(f"unknown teacher knob {knob!r}; known: {', '.join(KNOBS)}")


def sampler_kwargs(knob: str, value) -> dict:
  """The sampler's arguments (kdjax.llm.model.sampling.sample) of a knob at a value."""
  if knob == "temperature":
    return {"temperature": float(value)}
  if knob == "top_k":
    return {"temperature": 1.0, "top_k": int(round(value))}
  return {"temperature": 1.0, knob: float(value)}


def entropy_sums(z_xV, mask_x, knob: str, value):
  """(sum over masked-in rows of the entropy in nats of softmax of knob_target's logits, their
  count): the tokens cut contribute 0 (0 log 0 = 0)."""
  z, _ = knob_target(z_xV.astype(jnp.float32), knob, value)
  logp = jax.nn.log_softmax(z, axis=-1)
  p = jnp.exp(logp)
  h = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  mask = mask_x.astype(jnp.float32)
  return jnp.sum(h * mask), jnp.sum(mask)
