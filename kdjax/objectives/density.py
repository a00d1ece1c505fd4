"""KD losses between two Gaussian mixtures, estimated by Monte Carlo, differentiable in the student.

Each loss is an unbiased estimate of a divergence (not just of its gradient): the teacher's own
log-density terms are kept, so a loss near 0 means the student matches the teacher.

  forward_kl(s, t)  = KL(t || s) = E_{x~t}[log t(x) - log s(x)]     fresh teacher samples (no gradient
                      flows through them): the mass-covering objective, whose optimum for a
                      one-Gaussian student is moment matching.
  reverse_kl(s, t)  = KL(s || t) = E_{x~s}[log s(x) - log t(x)]     reparameterized student samples,
                      scored by the teacher density: mode-seeking.
  generalized_jsd   = pi KL(t || m) + (1 - pi) KL(s || m),  m = pi t + (1 - pi) s,  0 < pi < 1;
                      pi = 1/2 is the Jensen-Shannon divergence; it is bounded by -log of min(pi, 1-pi).

Expectations under the student are taken per component (n reparameterized draws from every
component, averaged with the mixture weights), so the estimate is differentiable in the student's
weights as well as in its means and scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.gmm import mixture as mx
from kdjax.gmm.mixture import Mixture


def _student_expectation(student: Mixture, key: jax.Array, n: int, fn) -> jax.Array:
  """E_{x~student}[fn(x)] = sum_k w_k mean_n fn(mu_k + L_k eps_kn), differentiable in everything."""
  x_KxNxD = mx.sample_components(student, key, n)
  k, _, d = x_KxNxD.shape
  f_KxN = fn(x_KxNxD.reshape(k * n, d)).reshape(k, n)
  return jnp.sum(mx.weights(student) * jnp.mean(f_KxN, axis=-1))


def forward_kl(student: Mixture, teacher: Mixture, key: jax.Array, n: int) -> jax.Array:
  """KL(teacher || student) from n fresh teacher samples."""
  x_NxD = jax.lax.stop_gradient(mx.sample(teacher, key, n))
  teacher = jax.lax.stop_gradient(teacher)
  return jnp.mean(mx.log_prob(teacher, x_NxD) - mx.log_prob(student, x_NxD))


def reverse_kl(student: Mixture, teacher: Mixture, key: jax.Array, n: int) -> jax.Array:
  """KL(student || teacher) from n reparameterized draws per student component."""
  teacher = jax.lax.stop_gradient(teacher)
  fn = lambda x: mx.log_prob(student, x) - mx.log_prob(teacher, x)
  return _student_expectation(student, key, n, fn)


def _log_mix(log_t, log_s, mix):
  return jnp.logaddexp(jnp.log(mix) + log_t, jnp.log1p(-mix) + log_s)


def generalized_jsd(student: Mixture, teacher: Mixture, key: jax.Array, n: int,
                    mix=0.5) -> jax.Array:
  """pi KL(t || m) + (1 - pi) KL(s || m) with m = pi t + (1 - pi) s and pi = `mix` in (0, 1)."""
  mix = jnp.asarray(mix, student.means.dtype)
  teacher = jax.lax.stop_gradient(teacher)
  key_t, key_s = jax.random.split(key)
  x_NxD = jax.lax.stop_gradient(mx.sample(teacher, key_t, n))
  log_t = mx.log_prob(teacher, x_NxD)
  kl_t = jnp.mean(log_t - _log_mix(log_t, mx.log_prob(student, x_NxD), mix))

  def fn(x):
    log_s = mx.log_prob(student, x)
    return log_s - _log_mix(mx.log_prob(teacher, x), log_s, mix)

  kl_s = _student_expectation(student, key_s, n, fn)
  return mix * kl_t + (1.0 - mix) * kl_s


LOSSES = {"fkl": forward_kl, "rkl": reverse_kl, "jsd": generalized_jsd}
