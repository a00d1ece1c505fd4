"""Token-level distillation objectives on teacher and student logits (the LLM study).

Every loss takes `student_logits_BxTxV`, `teacher_logits_BxTxV` (any float dtype; bf16 is upcast to
f32, f64 stays f64), an optional padding `mask_BxT` (True / nonzero = a real token), a
`temperature` and an optional keyword `teacher_temperature`, and returns one scalar: the mean over
unmasked tokens of a per-token divergence between the next-token distributions p_T (teacher) and
p_S (student).

  fkl   forward_kl       KL(p_T || p_S)                                mode covering
  rkl   reverse_kl       KL(p_S || p_T)                                mode seeking
  jsd   jsd              beta KL(p_T || m) + (1 - beta) KL(p_S || m),  m = beta p_T + (1 - beta) p_S
  skl   skew_kl          KL(p_T || alpha p_T + (1 - alpha) p_S)        DistiLLM's skew forward KL
  srkl  skew_reverse_kl  KL(p_S || alpha p_S + (1 - alpha) p_T)        DistiLLM's skew reverse KL
  tvd   tvd              0.5 sum_v |p_T - p_S|

Conventions (chosen once, here):
- `temperature` divides both models' logits before the softmax (train_lm's --kd_temperature).
  The losses are NOT multiplied by T^2 (Hinton et al.'s gradient-scale correction): a loss is the
  plain divergence between the two tempered distributions, so its value means the same thing at
  every temperature.
- `teacher_temperature` (None: the same as `temperature`) divides the teacher's logits only: with
  temperature=1 the target is softmax(z_teacher / T) and the student is untempered, the
  teacher-only tempered token-level KD of the LLM study (kdjax.llm.train.loop's teacher_temperatures).
  Both temperatures may be traced arrays (one compiled program for a vmapped sweep).
- `jsd` is the generalized JSD of GKD (Agarwal et al. 2024), with P = teacher and Q = student, the
  form TRL's and Liger's generalized JSD losses compute. Both limits vanish: beta -> 0 and beta -> 1
  give 0, while jsd / beta -> forward KL as beta -> 0 and jsd / (1 - beta) -> reverse KL as
  beta -> 1 (the sense in which JSD(beta) interpolates between the two). beta = 0.5 is the
  symmetric Jensen-Shannon divergence (at most log 2).
- `skew_kl` and `skew_reverse_kl` follow DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined
  Distillation for Large Language Models", ICML; the authors' distillm/losses.py
  skewed_forward_kl / skewed_reverse_kl, lam = 0.1): in both, alpha is the weight of the KL's
  FIRST argument in the mixture, so the reverse one mixes alpha p_S + (1 - alpha) p_T (90% teacher
  at the default 0.1; NOT alpha p_T + (1 - alpha) p_S). alpha = 0 is forward / reverse KL, alpha = 1
  gives 0; for alpha > 0 each is bounded by -log(alpha) whatever the student does.
- The teacher's logits are not stop_gradient'ed here: the caller decides what is trained.
- Mean over unmasked tokens; a mask with no real token gives 0.

Numerics: everything is computed in log space (log_softmax; mixtures as a guarded log-add-exp of
log(w) + log p), with 0 log 0 = 0 by the "double where" (the inputs of a term outside the support
are replaced before the term is formed, so neither the value nor the gradient ever sees 0 * inf).
Logits of -inf (tokens cut by top-k / top-p in either model, or in both) are fine for every loss
and give finite values and gradients, except where the divergence itself is infinite: forward KL
is +inf when the teacher puts mass on a token the student gives -inf, reverse KL the other way
round (jsd, the skew KLs with alpha > 0 and tvd are always finite). Padded positions may hold anything
(NaN, all -inf): they are replaced before any arithmetic, so they get exactly zero gradient.
Every unmasked row needs at least one finite logit in each model; +inf logits are not supported.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from kdjax.cli import UserError, require


def _check_args(student, teacher, mask, temperature, teacher_temperature=None):
  if student.shape != teacher.shape:
    raise ValueError(f"student logits {student.shape} and teacher logits {teacher.shape} differ in shape")
  if mask is not None and mask.shape != student.shape[:-1]:
    raise ValueError(f"mask {mask.shape} does not match logits {student.shape} (expected {student.shape[:-1]})")
  if isinstance(temperature, (int, float)):  # traced / array temperatures (sweeps) are the caller's to check
    require(temperature > 0, f"temperature must be > 0, got {temperature}")
  if isinstance(teacher_temperature, (int, float)):
    require(teacher_temperature > 0, f"teacher_temperature must be > 0, got {teacher_temperature}")


def _log_probs(logits_BxTxV, mask_BxT, temperature):
  """Tempered log-softmax in at least f32; padded rows become zeros first (no NaN in, no grad out)."""
  dtype = jnp.promote_types(logits_BxTxV.dtype, jnp.float32)
  x_BxTxV = logits_BxTxV.astype(dtype)
  if mask_BxT is not None:
    x_BxTxV = jnp.where(mask_BxT[..., None], x_BxTxV, jnp.zeros((), dtype))
  return jax.nn.log_softmax(x_BxTxV / jnp.asarray(temperature, dtype), axis=-1)


def _weighted_kl_BxT(weight, logp_BxTxV, logq_BxTxV):
  """sum_v weight * p (log p - log q), with 0 log 0 = 0 in value and gradient (double where).

  Terms where weight * p is 0 (p = 0 from a -inf logit, p underflowed, or weight = 0) are dropped;
  their log-probs are replaced by 0 before the term is formed, so no cotangent reaches them.
  """
  p_BxTxV = jnp.exp(logp_BxTxV)
  support = weight * p_BxTxV > 0
  zero = jnp.zeros((), logp_BxTxV.dtype)
  logp_BxTxV = jnp.where(support, logp_BxTxV, zero)
  logq_BxTxV = jnp.where(support, logq_BxTxV, zero)
  term_BxTxV = weight * jnp.exp(logp_BxTxV) * (logp_BxTxV - logq_BxTxV)
  return jnp.sum(jnp.where(support, term_BxTxV, zero), axis=-1)


def _log_add_exp(a, b):
  """log(exp(a) + exp(b)) with zero gradient to a -inf argument and no NaN when both are -inf.

  (jnp.logaddexp's derivative rule replaces -inf by 0 and gives a -inf argument a nonzero
  cotangent, which log_softmax would then spread over the whole row.)
  """
  m = jax.lax.stop_gradient(jnp.maximum(a, b))
  m = jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))
  s = jnp.exp(a - m) + jnp.exp(b - m)
  pos = s > 0
  return jnp.where(pos, m + jnp.log(jnp.where(pos, s, jnp.ones((), s.dtype))), -jnp.inf)


def _log_mixture(w, logp_BxTxV, logq_BxTxV):
  """log(w p + (1 - w) q) for w in [0, 1]; w = 0 or 1 give exactly log q or log p."""
  w = jnp.asarray(w, logp_BxTxV.dtype)
  return _log_add_exp(jnp.log(w) + logp_BxTxV, jnp.log1p(-w) + logq_BxTxV)


def _mean(loss_BxT, mask_BxT):
  if mask_BxT is None:
    return jnp.mean(loss_BxT)
  zero = jnp.zeros((), loss_BxT.dtype)
  total = jnp.sum(jnp.where(mask_BxT, loss_BxT, zero))
  count = jnp.sum(mask_BxT.astype(loss_BxT.dtype))
  return total / jnp.maximum(count, jnp.ones((), loss_BxT.dtype))


def _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
             teacher_temperature=None):
  """(student log-probs at `temperature`, teacher log-probs at `teacher_temperature` (None: at
  `temperature`), bool mask or None)."""
  student_logits_BxTxV = jnp.asarray(student_logits_BxTxV)
  teacher_logits_BxTxV = jnp.asarray(teacher_logits_BxTxV)
  if mask_BxT is not None:
    mask_BxT = jnp.asarray(mask_BxT)
    mask_BxT = mask_BxT if mask_BxT.dtype == jnp.bool_ else mask_BxT != 0
  _check_args(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
              teacher_temperature)
  if teacher_temperature is None:
    teacher_temperature = temperature
  logs_BxTxV = _log_probs(student_logits_BxTxV, mask_BxT, temperature)
  logt_BxTxV = _log_probs(teacher_logits_BxTxV, mask_BxT, teacher_temperature)
  return logs_BxTxV, logt_BxTxV, mask_BxT


def _check_unit(name, value):
  if isinstance(value, (int, float)):
    require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")


def forward_kl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, temperature=1.0, *,
               teacher_temperature=None):
  """Mean over unmasked tokens of KL(p_T || p_S) (the usual KD loss; no T^2 factor)."""
  logs, logt, mask = _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
                              teacher_temperature)
  return _mean(_weighted_kl_BxT(1.0, logt, logs), mask)


def reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, temperature=1.0, *,
               teacher_temperature=None):
  """Mean over unmasked tokens of KL(p_S || p_T)."""
  logs, logt, mask = _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
                              teacher_temperature)
  return _mean(_weighted_kl_BxT(1.0, logs, logt), mask)


def jsd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, temperature=1.0, beta=0.5, *,
        teacher_temperature=None):
  """Generalized JSD of GKD: beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S.

  beta in [0, 1] (a float or a traced scalar, for sweeps); 0 at beta = 0 and 1.
  """
  _check_unit("beta", beta)
  logs, logt, mask = _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
                              teacher_temperature)
  beta = jnp.asarray(beta, logs.dtype)
  logm = _log_mixture(beta, logt, logs)
  loss_BxT = _weighted_kl_BxT(beta, logt, logm) + _weighted_kl_BxT(1.0 - beta, logs, logm)
  return _mean(loss_BxT, mask)


def skew_kl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, temperature=1.0,
            alpha=0.1, *, teacher_temperature=None):
  """Skew forward KL of DistiLLM: KL(p_T || alpha p_T + (1 - alpha) p_S); alpha in [0, 1]."""
  _check_unit("alpha", alpha)
  logs, logt, mask = _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
                              teacher_temperature)
  logm = _log_mixture(alpha, logt, logs)
  return _mean(_weighted_kl_BxT(1.0, logt, logm), mask)


def skew_reverse_kl(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, temperature=1.0,
                    alpha=0.1, *, teacher_temperature=None):
  """Skew reverse KL of DistiLLM: KL(p_S || alpha p_S + (1 - alpha) p_T); alpha in [0, 1]."""
  _check_unit("alpha", alpha)
  logs, logt, mask = _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
                              teacher_temperature)
  logm = _log_mixture(alpha, logs, logt)
  return _mean(_weighted_kl_BxT(1.0, logs, logm), mask)


def tvd(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT=None, temperature=1.0, *,
        teacher_temperature=None):
  """Mean over unmasked tokens of the total variation 0.5 sum_v |p_T - p_S| (in [0, 1])."""
  logs, logt, mask = _prepare(student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, temperature,
                              teacher_temperature)
  loss_BxT = 0.5 * jnp.sum(jnp.abs(jnp.exp(logt) - jnp.exp(logs)), axis=-1)
  return _mean(loss_BxT, mask)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "fkl": forward_kl, "rkl": reverse_kl, "jsd": jsd, "skl": skew_kl, "srkl": skew_reverse_kl,
    "tvd": tvd}


def by_name(name: str) -> Callable[..., jax.Array]:
  """The loss called `name` (one of LOSSES); a one-line UserError listing the known names otherwise."""
  if name not in LOSSES:
    raise UserError(f"unknown distillation objective {name!r}; known: {', '.join(LOSSES)}")
  return LOSSES[name]
