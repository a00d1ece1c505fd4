"""Gaussian mixtures as a pytree: density, reparameterized sampling, entropy, sharpening and
truncation (top-p / top-k of the components).

A `Mixture` holds K Gaussians in D dimensions in unconstrained form, so the same pytree is what EM
returns and what an optax optimizer updates:

  logits  [K]        unnormalised log weights (weights = softmax(logits))
  means   [K, D]
  scales  [K, D]     diagonal covariance: log standard deviations, or
          [K, D, D]  full covariance: a "raw" Cholesky factor L_raw; the covariance's Cholesky factor
                     is L = tril(L_raw, -1) + diag(exp(diag(L_raw))) (the strict upper triangle is
                     ignored), so every value of L_raw is a valid covariance.

Which kind is told by shapes alone (scales.ndim == means.ndim for diagonal), so functions work on a
single mixture, inside vmap, and under jit without a static flag.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax import linalg

LOG_2PI = math.log(2.0 * math.pi)


class Mixture(NamedTuple):
  logits: jax.Array  # [K]
  means: jax.Array  # [K, D]
  scales: jax.Array  # [K, D] (diag: log std) or [K, D, D] (full: raw Cholesky factor)


def is_diag(m: Mixture) -> bool:
  return m.scales.ndim == m.means.ndim


def log_weights(m: Mixture) -> jax.Array:
  return jax.nn.log_softmax(m.logits, axis=-1)


def weights(m: Mixture) -> jax.Array:
  return jax.nn.softmax(m.logits, axis=-1)


def diag_embed(v: jax.Array) -> jax.Array:
  """[..., D] -> [..., D, D] diagonal matrices (rank-explicit, fine under strict rank promotion)."""
  eye = jnp.eye(v.shape[-1], dtype=v.dtype)
  return v[..., :, None] * jnp.broadcast_to(eye, v.shape + v.shape[-1:])


def scale_tril(m: Mixture) -> jax.Array:
  """Cholesky factors of the component covariances, [K, D, D]."""
  if is_diag(m):
    return diag_embed(jnp.exp(m.scales))
  diag = jnp.diagonal(m.scales, axis1=-2, axis2=-1)
  return jnp.tril(m.scales, -1) + diag_embed(jnp.exp(diag))


def covariances(m: Mixture) -> jax.Array:
  """Component covariances, [K, D, D]."""
  tril = scale_tril(m)
  return jnp.einsum("...ij,...kj->...ik", tril, tril)


def variances(m: Mixture) -> jax.Array:
  """Diagonal of the component covariances, [K, D]."""
  if is_diag(m):
    return jnp.exp(2.0 * m.scales)
  return jnp.diagonal(covariances(m), axis1=-2, axis2=-1)


def from_moments(weights_K: jax.Array, means_KxD: jax.Array, cov: jax.Array) -> Mixture:
  """Mixture from weights, means and covariances: cov [K, D] (diagonal variances) or [K, D, D]."""
  logits = jnp.log(weights_K)
  if cov.ndim == means_KxD.ndim:
    return Mixture(logits, means_KxD, 0.5 * jnp.log(cov))
  tril = linalg.cholesky(cov)
  diag = jnp.diagonal(tril, axis1=-2, axis2=-1)
  raw = jnp.tril(tril, -1) + diag_embed(jnp.log(diag))
  return Mixture(logits, means_KxD, raw)


def _component_log_prob_KxN(m: Mixture, x_NxD: jax.Array) -> jax.Array:
  """log N(x_n; mu_k, Sigma_k), [K, N]: points along the minor axis (vectorizes well for small D)."""
  d = m.means.shape[-1]
  if is_diag(m):
    inv_KxD = jnp.exp(-m.scales)
    log_det_K = jnp.sum(m.scales, axis=-1)
    if d <= _UNROLL_MAX_DIMS:  # static loop: no [K, N, D] tensor with a tiny minor axis
      quad_KxN = jnp.zeros((m.means.shape[0], x_NxD.shape[0]), x_NxD.dtype)
      for i in range(d):
        z_KxN = (x_NxD[None, :, i] - m.means[:, i, None]) * inv_KxD[:, i, None]
        quad_KxN = quad_KxN + jnp.square(z_KxN)
    else:  # one reduction over D: compiles in a time independent of D
      z_KxNxD = (x_NxD[None, :, :] - m.means[:, None, :]) * inv_KxD[:, None, :]
      quad_KxN = jnp.sum(jnp.square(z_KxNxD), axis=-1)
  else:
    eye = jnp.broadcast_to(jnp.eye(d, dtype=x_NxD.dtype), m.scales.shape)
    inv_KxDxD = linalg.solve_lower(scale_tril(m), eye)
    diff_KxDxN = x_NxD.T[None, :, :] - m.means[:, :, None]
    z_KxDxN = jnp.einsum("kde,ken->kdn", inv_KxDxD, diff_KxDxN)
    quad_KxN = jnp.sum(jnp.square(z_KxDxN), axis=1)
    log_det_K = jnp.sum(jnp.diagonal(m.scales, axis1=-2, axis2=-1), axis=-1)
  return -0.5 * quad_KxN - log_det_K[:, None] - 0.5 * d * LOG_2PI


def component_log_prob(m: Mixture, x_NxD: jax.Array) -> jax.Array:
  """log N(x_n; mu_k, Sigma_k) for every point and component, [N, K] (weights not included)."""
  return _component_log_prob_KxN(m, x_NxD).T


def _log_prob_unrolled(m: Mixture, x_NxD: jax.Array) -> jax.Array:
  """log_prob of a diagonal mixture with few components as elementwise arrays over the points, one
  per component (no reduction over a component axis): XLA emits one vectorized loop for it."""
  k, d = m.means.shape
  inv_KxD = jnp.exp(-m.scales)
  const_K = log_weights(m) - jnp.sum(m.scales, axis=-1) - 0.5 * d * LOG_2PI
  cols = [x_NxD[:, i] for i in range(d)]
  joints = []
  for c in range(k):
    quad_N = sum(jnp.square((cols[i] - m.means[c, i]) * inv_KxD[c, i]) for i in range(d))
    joints.append(const_K[c] - 0.5 * quad_N)
  top_N = joints[0]
  for j in joints[1:]:
    top_N = jnp.maximum(top_N, j)
  top_N = jax.lax.stop_gradient(top_N)
  return top_N + jnp.log(sum(jnp.exp(j - top_N) for j in joints))


def log_prob(m: Mixture, x_NxD: jax.Array, max_unrolled: int | None = None) -> jax.Array:
  """log p(x_n) under the mixture, [N]. A diagonal mixture of K > 1 components takes the unrolled
  K x D chains while K * D <= max_unrolled (default _UNROLL_MAX_TERMS), above it the vectorized
  path."""
  k, d = m.means.shape[-2:]
  limit = _UNROLL_MAX_TERMS if max_unrolled is None else max_unrolled
  if is_diag(m) and 1 < k and k * d <= limit:
    return _log_prob_unrolled(m, x_NxD)
  joint_KxN = _component_log_prob_KxN(m, x_NxD) + log_weights(m)[:, None]
  if joint_KxN.shape[0] == 1:  # one component: log-sum-exp of one term is that term (exactly)
    return joint_KxN[0]
  # max-shifted log-sum-exp without jax.nn.logsumexp's inf/sign handling (cheaper in the sweep's
  # hottest loop); the max is finite whenever one component is, which a mixture guarantees
  top_N = jax.lax.stop_gradient(jnp.max(joint_KxN, axis=0))
  return top_N + jnp.log(jnp.sum(jnp.exp(joint_KxN - top_N[None]), axis=0))


def sample_components(m: Mixture, key: jax.Array, n: int) -> jax.Array:
  """n reparameterized draws from EVERY component, [K, n, D]: x = mu_k + L_k eps.

  Differentiable in means and scales; averaging a function over these draws with the mixture weights
  gives an expectation under the mixture that is differentiable in the weights too (used by the
  reverse-KL and JSD students).
  """
  return _per_component(m, jax.random.normal(key, m.means.shape[:1] + (n,) + m.means.shape[1:],
                                              m.means.dtype))


def _per_component(m: Mixture, eps_KxNxD: jax.Array) -> jax.Array:
  """mu_k + L_k eps_kn for every component k and draw n, [K, N, D]."""
  if is_diag(m):
    return m.means[:, None, :] + jnp.exp(m.scales)[:, None, :] * eps_KxNxD
  return m.means[:, None, :] + jnp.einsum("kde,kne->knd", scale_tril(m), eps_KxNxD)


def expectation(m: Mixture, key: jax.Array, n: int, fn, weight_gradients: bool = True
                ) -> jax.Array:
  """E_{x~m}[fn(x)] by stratified, antithetic Monte Carlo from about n draws (rounded up to an
  even count); `fn` maps points [M, D] to values [M]. Unbiased, and differentiable in the means and
  scales (reparameterized draws). Every Gaussian draw mu + L eps comes with its mirror mu - L eps,
  which cancels the odd-order noise (the mean of a linear function comes out exact).

  weight_gradients=True: n / K draws from EVERY component, averaged with the mixture's weights, so
  the estimate is differentiable in the weights too (a student's expectation).
  weight_gradients=False: components by systematic sampling, u_j = (j + U) / (n / 2), so each
  component gets its expected share of the draws up to one (no component-choice noise, no draws
  wasted on negligible components; a teacher's expectation, where no weight gradient is needed).
  """
  k, d = m.means.shape
  if weight_gradients:
    half = max(1, -(-n // (2 * k)))
    eps_KxHxD = jax.random.normal(key, (k, half, d), m.means.dtype)
    x_KxNxD = _per_component(m, jnp.concatenate([eps_KxHxD, -eps_KxHxD], axis=1))
    f_KxN = fn(x_KxNxD.reshape(k * 2 * half, d)).reshape(k, 2 * half)
    return jnp.sum(weights(m) * jnp.mean(f_KxN, axis=-1))
  half = max(1, -(-n // 2))
  key_u, key_e = jax.random.split(key)
  u_H = (jnp.arange(half, dtype=m.means.dtype) + jax.random.uniform(key_u, (), m.means.dtype)) / half
  eps_HxD = jax.random.normal(key_e, (half, d), m.means.dtype)
  x_NxD = jnp.concatenate([sample_with(m, Draws(u_H, eps_HxD)),
                           sample_with(m, Draws(u_H, -eps_HxD))])
  return jnp.mean(fn(x_NxD))


def gaussian_cross_entropy(m: Mixture, g: Mixture) -> jax.Array:
  """E_{x~m}[-log g(x)] in closed form for a one-component g (log g is quadratic in x):
  sum_k w_k 0.5 [D log 2 pi + log|S| + tr(S^-1 C_k) + (m_k - mu)^T S^-1 (m_k - mu)]."""
  d = m.means.shape[-1]
  diff_KxD = m.means - g.means[0][None]
  if is_diag(m) and is_diag(g):
    inv_var_D = jnp.exp(-2.0 * g.scales[0])
    quad_K = jnp.sum((variances(m) + jnp.square(diff_KxD)) * inv_var_D[None], axis=-1)
    log_det = 2.0 * jnp.sum(g.scales[0])
  else:
    tril = scale_tril(g)[0]
    # ||L^-1 [L_k, m_k - mu]||_F^2 = tr(S^-1 C_k) + (m_k - mu)^T S^-1 (m_k - mu)
    cols_KxDxE = jnp.concatenate([scale_tril(m), diff_KxD[:, :, None]], axis=-1)
    solved = linalg.solve_lower(jnp.broadcast_to(tril, cols_KxDxE.shape[:1] + tril.shape),
                                cols_KxDxE)
    quad_K = jnp.sum(jnp.square(solved), axis=(-2, -1))
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(tril)))
  return jnp.sum(weights(m) * 0.5 * (d * LOG_2PI + log_det + quad_K))


# Unrolling: what is written as a static Python loop of elementwise ops, and up to what size.
# Unrolled chains fuse into one vectorized loop, where a gather / a reduction over a tiny axis ran
# slowly on CPU (worse under vmap); but each unrolled op is traced, differentiated (the gradient
# students call log_prob inside jax.grad in a scan) and compiled, so the chains are kept to the
# small sizes where they pay (the paper's grid: D = 2, K' = 4, p* grid8) and larger mixtures take
# the vectorized path, whose compile time does not grow with K or D. Both give the same values
# (up to float rounding in the order of sums).
#   _UNROLL_MAX_COMPONENTS: `sample` picks each draw's component parameters with a chain of K
#     selects (above: a gather; bit for bit the same draws).
#   _UNROLL_MAX_TERMS: diagonal `log_prob` keeps one elementwise array per component, K x D
#     chains in all, while K * D is at most this (above: a [K, N] array reduced over K).
#   _UNROLL_MAX_DIMS: diagonal component densities sum over D by a static loop up to this D
#     (above: a [K, N, D] array reduced over D).
_UNROLL_MAX_COMPONENTS = 16
_UNROLL_MAX_TERMS = 16
_UNROLL_MAX_DIMS = 4


def _pick(values_Kx: jax.Array, u_N: jax.Array, cdf_K: jax.Array) -> jax.Array:
  """values[comp_n] for every draw, [N, ...], where comp_n is the number of cdf entries (the last
  excluded) at or below u_n: the inverse-CDF component."""
  k = values_Kx.shape[0]
  if k > _UNROLL_MAX_COMPONENTS:
    return values_Kx[jnp.sum(u_N[:, None] >= cdf_K[None, :-1], axis=-1)]
  out = jnp.broadcast_to(values_Kx[0][None], u_N.shape + values_Kx.shape[1:])
  for i in range(1, k):  # the cdf is non-decreasing, so the last true test wins: values[comp]
    after_N = (u_N >= cdf_K[i - 1]).reshape(u_N.shape + (1,) * (values_Kx.ndim - 1))
    out = jnp.where(after_N, values_Kx[i][None], out)
  return out


class Draws(NamedTuple):
  """The standard random numbers behind n mixture samples: what `sample` turns into draws of any
  K-component mixture in D dimensions. Drawing them once and reusing them across mixtures (the
  study's betas) gives common random numbers and saves the random-number generation."""
  u: jax.Array  # [n] uniform in [0, 1): picks the component by inverse CDF
  eps: jax.Array  # [n, D] standard normal: the Gaussian part


def draws(key: jax.Array, n: int, d: int, dtype=jnp.float32) -> Draws:
  key_c, key_e = jax.random.split(key)
  return Draws(jax.random.uniform(key_c, (n,), dtype), jax.random.normal(key_e, (n, d), dtype))


def sample_with(m: Mixture, dr: Draws) -> jax.Array:
  """The mixture's samples for given standard draws, [n, D] (reparameterized in means and
  scales)."""
  cdf_K = jnp.cumsum(weights(m))
  u_N = dr.u * cdf_K[-1]
  mu_NxD = _pick(m.means, u_N, cdf_K)
  if is_diag(m):
    return mu_NxD + _pick(jnp.exp(m.scales), u_N, cdf_K) * dr.eps
  return mu_NxD + jnp.einsum("nde,ne->nd", _pick(scale_tril(m), u_N, cdf_K), dr.eps)


def sample(m: Mixture, key: jax.Array, n: int) -> jax.Array:
  """n draws from the mixture, [n, D]: a component per draw, then mu_k + L_k eps.

  The component is chosen by inverse CDF (one uniform per draw, cheaper than a Gumbel per
  component); the Gaussian part is reparameterized (differentiable in means and scales).
  """
  return sample_with(m, draws(key, n, m.means.shape[-1], m.means.dtype))


def weight_entropy(m: Mixture) -> jax.Array:
  """Entropy of the mixture weights in nats, -sum_k w_k log w_k (0 log 0 = 0)."""
  logw = log_weights(m)
  return -jnp.sum(jnp.where(logw > -jnp.inf, jnp.exp(logw) * logw, 0.0), axis=-1)


def sharpen(m: Mixture, beta: jax.Array) -> Mixture:
  """The paper's entropy knob: weights^beta renormalised (beta=1: unchanged; beta->inf: argmax)."""
  beta = jnp.asarray(beta, m.logits.dtype)
  return m._replace(logits=beta * log_weights(m))


def truncate(m: Mixture, top_p: jax.Array, top_k: jax.Array) -> Mixture:
  """The mixture restricted to its heaviest components, renormalised (dropped: logit -inf).

  Components are ranked by weight, heaviest first, ties by index (the lower first, as
  jax.lax.top_k and the LLM sampler rank them). top_k keeps the first k (k >= K: all); top_p keeps
  the smallest prefix holding mass >= p, i.e. every component whose heavier-ranked ones hold less
  than p (p >= 1: all, whatever the rounding of the masses). Both are traced arrays (top_k an
  integer one), so one program sweeps them; the first-ranked component is always kept, and with
  every component kept the logits are returned unchanged, bit for bit.
  """
  w_K = weights(m)
  k = w_K.shape[-1]
  i_K = jnp.arange(k)
  # ahead_KxK[i, j]: component j ranks before component i
  ahead_KxK = (w_K[None, :] > w_K[:, None]) | ((w_K[None, :] == w_K[:, None])
                                                & (i_K[None, :] < i_K[:, None]))
  rank_K = jnp.sum(ahead_KxK, axis=-1)
  mass_before_K = jnp.sum(jnp.where(ahead_KxK, w_K[None, :], 0.0), axis=-1)
  top_p = jnp.asarray(top_p, w_K.dtype)
  keep_K = (rank_K < jnp.asarray(top_k)) & ((mass_before_K < top_p) | (top_p >= 1))
  return m._replace(logits=jnp.where(keep_K, m.logits, -jnp.inf))


def entropy(m: Mixture, key: jax.Array, n: int) -> jax.Array:
  """The mixture's differential entropy -E_m[log m(x)] in nats, by Monte Carlo over about n draws
  (stratified over components by systematic sampling, antithetic: `expectation`). The same key
  gives the same standard draws for every mixture of the same shape (common random numbers)."""
  return expectation(m, key, n, lambda x_NxD: -log_prob(m, x_NxD), weight_gradients=False)


def moment_match(m: Mixture, diag: bool) -> Mixture:
  """The one Gaussian with the mixture's mean and covariance: the exact forward-KL optimum.

  argmin_q KL(m || q) over single Gaussians q matches the first two moments; with a diagonal q only
  the diagonal of the covariance is matched. This is the infinite-sample limit of fitting a
  one-component student by maximum likelihood (EM) on samples of m.
  """
  w_K = weights(m)
  mean_D = jnp.einsum("k,kd->d", w_K, m.means)
  diff_KxD = m.means - mean_D[None]
  if diag:
    var_D = jnp.einsum("k,kd->d", w_K, variances(m) + jnp.square(diff_KxD))
    return from_moments(jnp.ones((1,), w_K.dtype), mean_D[None], var_D[None])
  outer = jnp.einsum("kd,ke->kde", diff_KxD, diff_KxD)
  cov_DxD = jnp.einsum("k,kde->de", w_K, covariances(m) + outer)
  return from_moments(jnp.ones((1,), w_K.dtype), mean_D[None], cov_DxD[None])


# ----------------------------------------------------------------------------- ground truths


def grid8(covariance: str = "diag", dtype=jnp.float32) -> Mixture:
  """The paper's p*: 2-D, means on {-1,0,1}^2 without the centre, covariance 0.025 I, equal weights."""
  means = [(i, j) for i in (-1.0, 0.0, 1.0) for j in (-1.0, 0.0, 1.0) if (i, j) != (0.0, 0.0)]
  means_KxD = jnp.asarray(means, dtype)
  return isotropic(means_KxD, 0.025, covariance)


def isotropic(means_KxD: jax.Array, variance: float, covariance: str = "diag") -> Mixture:
  """Equal-weight mixture of isotropic Gaussians with the given variance."""
  k, d = means_KxD.shape
  dtype = means_KxD.dtype
  w = jnp.full((k,), 1.0 / k, dtype)
  if covariance == "diag":
    cov = jnp.full((k, d), variance, dtype)
  else:
    cov = jnp.broadcast_to(variance * jnp.eye(d, dtype=dtype), (k, d, d))
  return from_moments(w, means_KxD, cov)


def random_mixture(key: jax.Array, k: int, d: int, covariance: str = "diag",
                   variance: float = 0.025, dtype=jnp.float32) -> Mixture:
  """A random K-component ground truth in D dims: means uniform in [-1, 1]^D, Dirichlet(1) weights,
  per-dimension variances in [0.5, 1.5] x `variance` (a random rotation of them when full)."""
  k_mu, k_w, k_v, k_r = jax.random.split(key, 4)
  means_KxD = jax.random.uniform(k_mu, (k, d), dtype, -1.0, 1.0)
  w_K = jax.random.dirichlet(k_w, jnp.ones((k,), dtype))
  var_KxD = variance * jax.random.uniform(k_v, (k, d), dtype, 0.5, 1.5)
  if covariance == "diag":
    return from_moments(w_K, means_KxD, var_KxD)
  q_KxDxD, _ = jnp.linalg.qr(jax.random.normal(k_r, (k, d, d), dtype))
  cov = jnp.einsum("kij,kj,klj->kil", q_KxDxD, var_KxD, q_KxDxD)
  return from_moments(w_K, means_KxD, cov)
