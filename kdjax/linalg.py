"""Cholesky factorisation and lower-triangular solves of small batched matrices in plain XLA ops.

jax.numpy's versions call LAPACK on CPU (custom calls), and a batch of those splits itself across
XLA:CPU's intra-op thread pool (`ParallelBatchMap`) and waits for the pieces. Two such calls
running at once on a 2-thread pool can each hold a thread while waiting for work queued behind
the other: the process hangs with every thread idle (seen in the GMM study's full-covariance grid,
about one run in three). These loops never leave the thread that runs them. They are the textbook
unblocked algorithms (one column / one row per step, `lax.fori_loop`, so the program stays the
same size whatever D), as accurate as LAPACK's for the D of a mixture study, and differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

UNROLL_MAX = 8  # up to this D the loops are unrolled (faster; the program grows with D)


def _lead(v: jax.Array, ndim: int) -> jax.Array:
  """v with leading unit axes up to ndim (explicit broadcasting, fine under strict promotion)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def cholesky(a: jax.Array) -> jax.Array:
  """Lower Cholesky factor L of symmetric positive definite matrices a [..., D, D] (L L^T = a);
  NaN where a is not positive definite, as jnp.linalg.cholesky."""
  d = a.shape[-1]
  idx = jnp.arange(d)

  def column(j, tril):
    e_j = (idx == j).astype(a.dtype)
    row_j = jnp.einsum("...jk,j->...k", tril, e_j)  # L[j, :j] (later entries still 0)
    a_col = jnp.einsum("...ij,j->...i", a, e_j)  # a[:, j]
    l_jj = jnp.sqrt(jnp.einsum("...i,i->...", a_col, e_j) - jnp.sum(jnp.square(row_j), axis=-1))
    col = (a_col - jnp.einsum("...ik,...k->...i", tril, row_j)) / l_jj[..., None]
    n = col.ndim
    new = jnp.where(_lead(idx > j, n), col, 0.0) + _lead(e_j, n) * l_jj[..., None]
    return tril + new[..., :, None] * _lead(e_j, n + 1)

  return jax.lax.fori_loop(0, d, column, jnp.zeros_like(a), unroll=d <= UNROLL_MAX)


def solve_lower(tril: jax.Array, b: jax.Array) -> jax.Array:
  """X with tril X = b for lower-triangular tril [..., D, D] and b [..., D, M] (forward
  substitution; the strict upper triangle of tril is not read)."""
  d = tril.shape[-1]
  idx = jnp.arange(d)

  def row(i, x):
    e_i = (idx == i).astype(tril.dtype)
    l_row = jnp.einsum("...ik,i->...k", tril, e_i)
    l_row = l_row * _lead((idx <= i).astype(tril.dtype), l_row.ndim)  # L[i, :i+1]
    l_ii = jnp.einsum("...k,k->...", l_row, e_i)
    b_row = jnp.einsum("...im,i->...m", b, e_i)
    x_row = (b_row - jnp.einsum("...k,...km->...m", l_row, x)) / l_ii[..., None]
    return x + _lead(e_i[:, None], x.ndim) * x_row[..., None, :]

  return jax.lax.fori_loop(0, d, row, jnp.zeros(b.shape, jnp.result_type(tril, b)),
                           unroll=d <= UNROLL_MAX)
