"""Gradient-trained GMM students (fkl, rkl, jsd): Adam in whitened coordinates, a decaying
learning rate, and a convergence report for every student.

Coordinates. Each student component k is optimised relative to a reference Gaussian
N(m0_k, L0_k L0_k^T), its start. Its mean is m0_k + L0_k a_k and its covariance's Cholesky factor
is L0_k T(b_k), T(b) = tril(b, -1) + diag(exp(diag b)) (diagonal: std = s0_k exp(b_k)).
In these coordinates the problem looks the same whatever the data's scale, orientation or
dimension, so one learning rate suits 2-D and 16-D alike, and every parameter value is a valid
covariance. The product of two lower-triangular factors is lower triangular with diagonal
diag(L0) exp(diag b), so the student's log-scales are a sum, never a log of a computed value.

Start (`start`): fkl at k teacher samples with the teacher's moment-matched covariance; rkl and jsd
at k teacher components drawn by weight.

Schedule. Adam with a linear warm-up (5% of the steps) and a cosine decay to 1% of the peak: the
decay averages out the Monte Carlo noise of the per-step gradients, which a fixed rate does not.
Gradients are clipped to a global norm of 10 (only an exploding step is touched).

Gradient estimator (`gradient_loss_fn`). rkl and jsd differentiate E_student[f] with f, the
objective's functional derivative, held fixed at the current student (for rkl: Roeder et al.'s
"sticking the landing"): unbiased, and without the score-term noise of the objective's own
estimator, which does not vanish at the optimum. That noise had kept 16-D full-covariance rkl
students wandering at the end of training, and made the convergence check's gap itself noisy
(0.02 - 0.04 nats for a student at the optimum). fkl's own estimator is already exact in the
student for one Gaussian.

Convergence. At the end the objective and its gradient (the same estimator as in training) are
estimated on EVAL_REPEATS independent sets of 2 * batch_size draws. `gap` = 0.5 |E grad|^2
(|E grad|^2 estimated without the Monte Carlo noise's bias) is the decrease a unit Newton step
would still buy, in nats: the curvature is about 1 in the whitened coordinates. A student is
`converged` when everything is finite and gap <= tol. `change` (reported, not judged) is the
objective's relative change over the last quarter of the steps, on the same draws
(|L_end - L_3/4| / max(|L_end|, 1)). Unconverged students stay in the results, flagged, and out
of the summary's means. A limit: the jsd's curvature is only about pi (1 - pi) of the KL's near
its optimum and near 0 where it saturates, so its gap understates what is left; a jsd student
still crossing a flat stretch between two teacher modes (2-D grid, low beta) can pass the check
with a `change` of a percent.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kdjax import mixture as mx
from kdjax.mixture import Mixture
from kdjax.objectives import density

WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.01
CLIP_NORM = 10.0
EVAL_REPEATS = 8
CHECK_FRACTION = 0.75  # the objective is compared between this fraction of the steps and the end


class TrainInfo(NamedTuple):
  converged: jax.Array  # bool
  objective: jax.Array  # the objective at the end, on the fixed evaluation draws
  change: jax.Array  # relative change of that objective over the last quarter of the steps
  gap: jax.Array  # decrease still to be had (nats), estimated from the gradient at the end


def _tril_factor(b_KxDxD: jax.Array) -> jax.Array:
  diag = jnp.diagonal(b_KxDxD, axis1=-2, axis2=-1)
  return jnp.tril(b_KxDxD, -1) + mx.diag_embed(jnp.exp(diag))


class Whitening(NamedTuple):
  """Per-component reference Gaussians of the coordinates: means m0 [K, D] and Cholesky factors
  L0 [K, D, D] (full) or log-stds [K, D] (diagonal). Component k of the student is
  N(m0_k + L0_k a_k, (L0_k T(b_k)) (L0_k T(b_k))^T): its start is a = 0, b = 0."""
  mean: jax.Array
  scale: jax.Array

  def to_mixture(self, p: Mixture) -> Mixture:
    """Whitened parameters (logits, a, b) -> the student Mixture."""
    if self.scale.ndim == 2:
      return Mixture(p.logits, self.mean + jnp.exp(self.scale) * p.means, self.scale + p.scales)
    means = self.mean + jnp.einsum("kde,ke->kd", self.scale, p.means)
    tril = jnp.einsum("kde,kef->kdf", self.scale, _tril_factor(p.scales))
    log_diag = (jnp.log(jnp.diagonal(self.scale, axis1=-2, axis2=-1))
                + jnp.diagonal(p.scales, axis1=-2, axis2=-1))
    return Mixture(p.logits, means, jnp.tril(tril, -1) + mx.diag_embed(log_diag))

  def origin(self) -> Mixture:
    """The whitened parameters of the start: equal weights, a = 0, b = 0."""
    k = self.mean.shape[0]
    return Mixture(jnp.zeros((k,), self.mean.dtype), jnp.zeros_like(self.mean),
                   jnp.zeros_like(self.scale))


def start(objective: str, teacher: Mixture, key: jax.Array, k: int) -> Whitening:
  """Where a student starts (and the coordinates it is trained in).

  fkl (mass-covering): means at k i.i.d. teacher samples, every covariance the teacher's moment
  match. rkl, jsd (mode-seeking): k teacher components drawn by the teacher's weights, as they are;
  a mode-seeking student ends near a mode, and this start is at one (the one a start at a teacher
  sample would most likely have slid to).
  """
  diag = mx.is_diag(teacher)
  if objective == "fkl":
    ref = mx.moment_match(teacher, diag)
    means = mx.sample(teacher, key, k)
    scale = ref.scales if diag else mx.scale_tril(ref)
    return Whitening(means, jnp.broadcast_to(scale, (k,) + scale.shape[1:]))
  comp_K = jax.random.categorical(key, teacher.logits, shape=(k,))
  scale = teacher.scales if diag else mx.scale_tril(teacher)
  return Whitening(teacher.means[comp_K], scale[comp_K])


def schedule(learning_rate: float, steps: int) -> optax.Schedule:
  warmup = max(1, int(WARMUP_FRACTION * steps))
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup, max(steps, warmup + 1), learning_rate * FINAL_LR_FRACTION)


def loss_fn(objective: str, jsd_mix: float):
  loss = density.LOSSES[objective]
  return partial(loss, mix=jsd_mix) if objective == "jsd" else loss


# as in kdjax.objectives.density: the unrolled per-component chains only for tiny mixtures
_log_prob = partial(mx.log_prob, max_unrolled=8)


def gradient_loss_fn(objective: str, jsd_mix: float):
  """A loss whose gradient in the student is an unbiased estimate of the objective's gradient
  (its value need not be the objective's): what training and the convergence check
  differentiate.

  fkl: the objective's own estimate. rkl and jsd: E_student[f] over reparameterized student draws
  with f held fixed at the current student, f = log s - log t (rkl) and (1 - pi)(log s - log m),
  m = pi t + (1 - pi) s (jsd): f is the objective's functional derivative (up to a constant, which
  has no gradient), so the gradient is the objective's. Each draw's gradient is
  grad_x f(x) dx/dtheta (and f itself for the weights), which is zero at every draw when the
  student equals the teacher, where the objective's own estimator still carries the noise of its
  score term (Roeder, Wu & Duvenaud 2017's "sticking the landing" for rkl).
  """
  if objective == "fkl":
    return loss_fn(objective, jsd_mix)

  def loss(student: Mixture, teacher: Mixture, key: jax.Array, n: int) -> jax.Array:
    fixed = jax.lax.stop_gradient(student)
    teacher = jax.lax.stop_gradient(teacher)
    if objective == "rkl":
      return mx.expectation(student, key, n, lambda x: _log_prob(fixed, x) - _log_prob(teacher, x))
    mix = jnp.asarray(jsd_mix, student.means.dtype)

    def f(x):
      log_s = _log_prob(fixed, x)
      return log_s - jnp.logaddexp(jnp.log(mix) + _log_prob(teacher, x), jnp.log1p(-mix) + log_s)

    return (1.0 - mix) * mx.expectation(student, key, n, f)

  return loss


def train_student(objective: str, teacher: Mixture, key: jax.Array, *, components: int,
                  steps: int, batch_size: int, learning_rate: float, jsd_mix: float = 0.5,
                  tol: float = 0.01, init: Whitening | None = None
                  ) -> tuple[Mixture, TrainInfo]:
  """Adam on a density KD loss (density.LOSSES[objective]) against `teacher`; returns the student
  and its TrainInfo. Everything is traced (jit- and vmap-able); shapes come from the arguments.
  `init` overrides the objective's start (`start`)."""
  teacher = jax.lax.stop_gradient(teacher)
  loss = loss_fn(objective, jsd_mix)
  k_init, k_steps, k_eval = jax.random.split(key, 3)
  white = start(objective, teacher, k_init, components) if init is None else init
  params = white.origin()
  opt = optax.chain(optax.clip_by_global_norm(CLIP_NORM),
                    optax.adam(schedule(learning_rate, steps)))
  objective_of = lambda p, k, n: loss(white.to_mixture(p), teacher, k, n)
  grad_loss = gradient_loss_fn(objective, jsd_mix)
  gradient_of = jax.grad(lambda p, k, n: grad_loss(white.to_mixture(p), teacher, k, n))

  half = int(CHECK_FRACTION * steps)

  def step(carry, i_k):
    i, k = i_k
    p, state, p_half = carry
    grads = gradient_of(p, k, batch_size)
    updates, state = opt.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    p_half = jax.tree.map(lambda a, b: jnp.where(i == half - 1, a, b), p, p_half)
    return (p, state, p_half), None

  steps_keys = (jnp.arange(steps), jax.random.split(k_steps, steps))
  carry = (params, opt.init(params), params)
  (params, _, p_half), _ = jax.lax.scan(step, carry, steps_keys)
  # the objective at the check point and at the end on the same EVAL_REPEATS independent sets of
  # draws (common random numbers, one vmapped call), and the gradient at the end on each set
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), p_half, params)
  eval_keys = jax.random.split(k_eval, EVAL_REPEATS)
  n_eval = 2 * batch_size
  values_Rx2 = jax.vmap(lambda k: jax.vmap(lambda p: objective_of(p, k, n_eval))(both))(eval_keys)
  grads = jax.vmap(gradient_of, in_axes=(None, 0, None))(params, eval_keys, n_eval)
  g_RxP = jnp.concatenate([g.reshape(EVAL_REPEATS, -1) for g in jax.tree.leaves(grads)], axis=1)
  final = jnp.mean(values_Rx2[:, 1])
  scale = jnp.maximum(jnp.abs(final), 1.0)
  change = jnp.abs(jnp.mean(values_Rx2[:, 1] - values_Rx2[:, 0])) / scale
  # the decrease a unit Newton step would still buy, 0.5 |E grad|^2 (whitened coordinates, where
  # the curvature is about 1), with |E grad|^2 estimated without the Monte Carlo noise's bias
  mean_P = jnp.mean(g_RxP, axis=0)
  noise = jnp.sum(jnp.var(g_RxP, axis=0, ddof=1)) / EVAL_REPEATS
  gap = 0.5 * jnp.maximum(jnp.sum(jnp.square(mean_P)) - noise, 0.0)
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
  finite = finite & jnp.all(jnp.isfinite(values_Rx2)) & jnp.all(jnp.isfinite(g_RxP))
  return white.to_mixture(params), TrainInfo(finite & (gap <= tol), final, change, gap)
