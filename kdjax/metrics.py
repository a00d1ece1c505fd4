"""Precision and recall of a generative model (the paper's two measures; higher is better for both).

  precision = E_{x ~ student} [ log p*(x) ]   the student's samples, scored by the ground truth
  recall    = E_{x ~ p*}      [ log student(x) ]   ground-truth samples, scored by the student

Both are Monte Carlo averages of log-likelihoods. The functions here take log-density callables and
sample arrays, so the GMM study (densities over R^D) and the LLM study (sequences, where a
"log-likelihood" is the mean per-token log-probability, `mean_token_loglik`) share one definition.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LogProb = Callable[[jax.Array], jax.Array]  # samples [N, ...] -> log-likelihoods [N]


def mean_loglik(log_prob: LogProb, x_N: jax.Array) -> jax.Array:
  """Mean log-likelihood of samples x under log_prob."""
  return jnp.mean(log_prob(x_N))


def precision(log_p_star: LogProb, student_samples: jax.Array) -> jax.Array:
  """E_{x~student}[log p*(x)], from samples already drawn from the student."""
  return mean_loglik(log_p_star, student_samples)


def recall(log_student: LogProb, p_star_samples: jax.Array) -> jax.Array:
  """E_{x~p*}[log student(x)], from held-out samples of the ground truth."""
  return mean_loglik(log_student, p_star_samples)


def standard_error(values_N: jax.Array) -> jax.Array:
  """Standard error of the mean of i.i.d. values (sample std with ddof=1 over sqrt(N))."""
  n = values_N.shape[0]
  return jnp.std(values_N, ddof=1) / jnp.sqrt(n)


def mean_token_loglik(logprobs_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean per-token log-likelihood over non-pad tokens: sum(logprobs * mask) / sum(mask).

  The LLM study's precision / recall: logprobs_BxT are next-token log-probabilities of sequences
  (from one model) and mask_BxT marks real tokens; pooling over all tokens of all sequences is what
  the authors' code does.
  """
  mask_BxT = mask_BxT.astype(logprobs_BxT.dtype)
  total = jnp.sum(jnp.where(mask_BxT > 0, logprobs_BxT, 0.0))
  return total / jnp.maximum(jnp.sum(mask_BxT), 1.0)
