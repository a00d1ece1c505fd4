"""EM for Gaussian mixtures (diagonal or full covariance), jit- and vmap-able.

Follows scikit-learn's GaussianMixture step for step so the two can be compared from the same
initialisation: each iteration is an E-step (whose mean log-likelihood is the "lower bound") then an
M-step; the loop stops when the lower bound changes by less than `tol` or after `max_iter`
iterations; `reg_covar` is added to the covariance diagonal; nk gets 10 * machine epsilon.
Differences: covariances are computed from centred data (the same quantity, better in float32), and
the loop is a `lax.while_loop` whose per-fit `converged` flag freezes a finished fit, so under vmap
each fit of a batch stops on its own (the batch runs until its slowest member is done).

Initialisations (`init`): "data" (K distinct data points as means), "kmeans++" (D^2 seeding),
"kmeans" (k-means++ seeding then `lloyd_iters` Lloyd steps, like scikit-learn's default). Every
initialisation turns its means into a mixture by one M-step on hard nearest-mean assignments.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax import mixture as mx
from kdjax.mixture import Mixture

INITS = ("kmeans", "kmeans++", "data")


class EMInfo(NamedTuple):
  n_iter: jax.Array  # iterations run
  converged: jax.Array  # bool
  lower_bound: jax.Array  # mean log-likelihood at the last E-step


def m_step(x_NxD: jax.Array, resp_NxK: jax.Array, diag: bool, reg_covar) -> Mixture:
  """Maximum-likelihood mixture for soft assignments resp (scikit-learn's M-step)."""
  n, d = x_NxD.shape
  eps = 10.0 * jnp.finfo(x_NxD.dtype).eps
  nk_K = jnp.sum(resp_NxK, axis=0) + eps
  means_KxD = jnp.einsum("nk,nd->kd", resp_NxK, x_NxD) / nk_K[:, None]
  diff_KxNxD = x_NxD[None, :, :] - means_KxD[:, None, :]
  if diag:
    cov = jnp.einsum("nk,knd->kd", resp_NxK, jnp.square(diff_KxNxD)) / nk_K[:, None] + reg_covar
  else:
    cov = jnp.einsum("nk,knd,kne->kde", resp_NxK, diff_KxNxD, diff_KxNxD) / nk_K[:, None, None]
    cov = cov + reg_covar * jnp.eye(d, dtype=x_NxD.dtype)[None]
  w_K = nk_K / n
  return mx.from_moments(w_K / jnp.sum(w_K), means_KxD, cov)


def one_gaussian(x_NxD: jax.Array, diag: bool, reg_covar) -> Mixture:
  """The maximum-likelihood single Gaussian: the sample mean and (biased) covariance + reg_covar.

  What `m_step` gives with every responsibility 1 (up to its 10 eps in the count), without the
  contractions that run slowly when batched over thousands of small fits.
  """
  n, d = x_NxD.shape
  mean_D = jnp.mean(x_NxD, axis=0)
  diff_NxD = x_NxD - mean_D[None]
  if diag:
    cov = jnp.mean(jnp.square(diff_NxD), axis=0)[None] + reg_covar
  else:
    cov = (diff_NxD.T @ diff_NxD / n + reg_covar * jnp.eye(d, dtype=x_NxD.dtype))[None]
  return mx.from_moments(jnp.ones((1,), x_NxD.dtype), mean_D[None], cov)


def e_step(m: Mixture, x_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean log-likelihood, responsibilities [N, K])."""
  joint_NxK = mx.component_log_prob(m, x_NxD) + mx.log_weights(m)[None]
  norm_N = jax.nn.logsumexp(joint_NxK, axis=-1)
  return jnp.mean(norm_N), jnp.exp(joint_NxK - norm_N[:, None])


def _sq_dist_NxK(x_NxD: jax.Array, means_KxD: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x_NxD[:, None, :] - means_KxD[None, :, :]), axis=-1)


def kmeans_plusplus(key: jax.Array, x_NxD: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding: the first centre uniformly, each next one with probability ~ D(x)^2."""
  n, d = x_NxD.shape
  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, n)
  centres_KxD = jnp.zeros((k, d), x_NxD.dtype).at[0].set(x_NxD[first])
  d2_N = jnp.sum(jnp.square(x_NxD - x_NxD[first][None]), axis=-1)

  def body(i, carry):
    centres_KxD, d2_N = carry
    logits_N = jnp.log(jnp.maximum(d2_N, 1e-30))
    idx = jax.random.categorical(keys[i], logits_N)
    centre_D = x_NxD[idx]
    d2_N = jnp.minimum(d2_N, jnp.sum(jnp.square(x_NxD - centre_D[None]), axis=-1))
    return centres_KxD.at[i].set(centre_D), d2_N

  centres_KxD, _ = jax.lax.fori_loop(1, k, body, (centres_KxD, d2_N))
  return centres_KxD


def lloyd(x_NxD: jax.Array, means_KxD: jax.Array, iters: int) -> jax.Array:
  """`iters` k-means (Lloyd) steps; an empty cluster keeps its centre."""
  k = means_KxD.shape[0]

  def body(_, means_KxD):
    assign_NxK = jax.nn.one_hot(jnp.argmin(_sq_dist_NxK(x_NxD, means_KxD), axis=-1), k,
                                dtype=x_NxD.dtype)
    count_K = jnp.sum(assign_NxK, axis=0)
    sums_KxD = jnp.einsum("nk,nd->kd", assign_NxK, x_NxD)
    new_KxD = sums_KxD / jnp.maximum(count_K, 1.0)[:, None]
    return jnp.where((count_K > 0)[:, None], new_KxD, means_KxD)

  return jax.lax.fori_loop(0, iters, body, means_KxD)


def init_means(key: jax.Array, x_NxD: jax.Array, k: int, init: str = "kmeans",
               lloyd_iters: int = 10) -> jax.Array:
  """Initial component means [K, D] by one of INITS."""
  if init == "data":
    idx = jax.random.choice(key, x_NxD.shape[0], (k,), replace=False)
    return x_NxD[idx]
  if init == "kmeans++":
    return kmeans_plusplus(key, x_NxD, k)
  if init == "kmeans":
    return lloyd(x_NxD, kmeans_plusplus(key, x_NxD, k), lloyd_iters)
  raise ValueError(f"unknown EM init {init!r}; expected one of {INITS}")


def init_mixture(key: jax.Array, x_NxD: jax.Array, k: int, *, diag: bool = True,
                 init: str = "kmeans", reg_covar=1e-6, lloyd_iters: int = 10) -> Mixture:
  """A starting mixture: initial means, hard nearest-mean assignment, one M-step.

  With k = 1 every initialisation gives the same start (all points in the one component), so the
  random part is skipped: that start is already the maximum-likelihood Gaussian.
  """
  if k == 1:
    return one_gaussian(x_NxD, diag, reg_covar)
  means_KxD = init_means(key, x_NxD, k, init, lloyd_iters)
  resp_NxK = jax.nn.one_hot(jnp.argmin(_sq_dist_NxK(x_NxD, means_KxD), axis=-1), k,
                            dtype=x_NxD.dtype)
  return m_step(x_NxD, resp_NxK, diag, reg_covar)


def fit_from(x_NxD: jax.Array, start: Mixture, *, max_iter=100, tol=1e-3,
             reg_covar=1e-6) -> tuple[Mixture, EMInfo]:
  """EM from a given mixture; max_iter, tol and reg_covar may be traced values."""
  diag = mx.is_diag(start)
  dtype = x_NxD.dtype
  if start.logits.shape[-1] == 1:
    # One component: every responsibility is exactly 1, so the first M-step lands on the
    # maximum-likelihood Gaussian (the sample moments) whatever the start, and every later
    # iteration returns it unchanged. Skip the loop: the closed form, reported as one converged
    # iteration (scikit-learn runs a second one to see the bound stop moving: n_iter_ = 2).
    m = one_gaussian(x_NxD, diag, reg_covar)
    bound = jnp.mean(mx.log_prob(m, x_NxD))
    return m, EMInfo(jnp.ones((), jnp.int32), jnp.ones((), bool), bound)

  def cond(carry):
    i, _, _, converged = carry
    return jnp.logical_and(i < max_iter, jnp.logical_not(converged))

  def body(carry):
    i, m, prev_bound, _ = carry
    bound, resp_NxK = e_step(m, x_NxD)
    m = m_step(x_NxD, resp_NxK, diag, reg_covar)
    return i + 1, m, bound, jnp.abs(bound - prev_bound) < tol

  init = (jnp.zeros((), jnp.int32), start, jnp.asarray(-jnp.inf, dtype), jnp.zeros((), bool))
  n_iter, m, bound, converged = jax.lax.while_loop(cond, body, init)
  return m, EMInfo(n_iter, converged, bound)


def fit(key: jax.Array, x_NxD: jax.Array, k: int, *, diag: bool = True, init: str = "kmeans",
        max_iter=100, tol=1e-3, reg_covar=1e-6, lloyd_iters: int = 10) -> tuple[Mixture, EMInfo]:
  """Fit a K-component mixture to x by EM (initialise with `init`, then `fit_from`)."""
  start = init_mixture(key, x_NxD, k, diag=diag, init=init, reg_covar=reg_covar,
                       lloyd_iters=lloyd_iters)
  return fit_from(x_NxD, start, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
