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
         tied with it is kept too. With top-k as well, top-p is formed on the renormalised top-k
         set (top-k first, as Hugging Face's and this sampler's order).
  min-p  keep p_i >= min_p x max_j p_j, i.e. z_i >= max z + log(min_p) (0: no truncation). The
         ratio does not change under renormalisation, so min-p after top-k / top-p is the same
         as min-p alone intersected with them.

Masses are formed in float32 from exp(z - max z): at a boundary that holds exactly (mass before a
token == p, p_i == min_p p_max) rounding decides; tests/test_llm_truncation.py checks the rule
against numpy away from such knife edges and at ties exactly.

`top_k` is a Python int (static: lax.top_k of k, the sampler's case) or an array (traced: read off
the sorted logits, for a vmapped sweep of k); `top_p` and `min_p` are arrays or scalars, or None
(off, static). Logits of shape [..., V]; per-row values broadcast against [...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KNOBS = ("temperature", "top_p", "min_p", "top_k")


def _rows(x, shape, dtype):
  return jnp.broadcast_to(jnp.asarray(x, dtype), shape)


def keep_threshold(z_xV, top_k=0, top_p=None, min_p=None):
  """The per-row threshold [...] of the module's rule (-inf: keep everything)."""
  v = z_xV.shape[-1]
  lead = z_xV.shape[:-1]
  thr = jnp.full(lead, -jnp.inf, z_xV.dtype)
  static_k = isinstance(top_k, (int, np.integer))
  if static_k and not 0 < top_k < v:
    top_k = 0
  vals = None
  if top_p is not None or not static_k:
    vals = -jnp.sort(-z_xV, axis=-1)  # descending
  if static_k and top_k:
    thr = jax.lax.top_k(z_xV, top_k)[0][..., top_k - 1]
  elif not static_k:
    k = _rows(top_k, lead, jnp.int32)
    kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, v - 1)[..., None], axis=-1)[..., 0]
    thr = jnp.where((k > 0) & (k < v), kth, thr)
  if top_p is not None:
    w = jnp.where(vals >= thr[..., None], jnp.exp(vals - vals[..., :1]), 0.0)
    cum = jnp.cumsum(w, axis=-1)
    before = (cum - w) / cum[..., -1:]
    p = _rows(top_p, lead, z_xV.dtype)
    n = jnp.sum(before < p[..., None], axis=-1)  # >= 1: before[0] == 0
    last = jnp.take_along_axis(vals, jnp.maximum(n - 1, 0)[..., None], axis=-1)[..., 0]
    thr = jnp.maximum(thr, last)
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
