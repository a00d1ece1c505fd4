"""Measures of a model that need only its samples: k-NN precision and recall, MAUVE, distinct-n.

k-NN precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for
assessing generative models"): each point of a set gets a ball whose radius is the distance to its
k-th nearest neighbour within its own set, itself excluded; the union of a set's balls estimates
its support. precision = the fraction of the student's points inside some ball of p*'s points;
recall = the fraction of p*'s points inside some ball of the student's points. Both are in [0, 1];
identical sets give 1 and 1, far-apart sets 0 and 0.

Distances are squared Euclidean, by matmul (|x|^2 + |y|^2 - 2 x.y, both sets centred on the
reference set's mean first), a block of query rows at a time so that memory is block x N, not
M x N. The matmul form rounds: two identical points can come out a little above zero, so values
within ROUNDING x (|x|^2 + |y|^2) of zero are taken as zero (duplicates are common among a
low-temperature model's samples, and a point with k duplicates has a ball of radius zero that its
duplicates must fall in). In 8 dimensions or fewer the distances are direct sums of squared
differences (exact). The k-th neighbour comes from one variadic reduction that carries each row's
k smallest values. Pure functions of arrays: usable inside jit and vmap (the GMM study's
sweep) and on embeddings (the SmolLM2 study).

distinct-n (Li et al. 2016): unique n-grams / all n-grams over a model's samples, n-grams taken
within each sample. MAUVE (Pillutla et al. 2021) comes from the mauve-text package when it is
installed (not a dependency of kdjax: it imports faiss); `mauve_score` returns None otherwise.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ROUNDING = 1e-5  # relative: float32 matmul error of |x|^2 + |y|^2 - 2 x.y is ~1e-7 x D at worst
DIRECT_DIMS = 8


def sq_dists(x_NxD: jax.Array, y_MxD: jax.Array) -> jax.Array:
  """Squared Euclidean distances [N, M] by matmul; >= 0; rounding noise around 0 set to 0.
  Centre both sets on a common point first (knn_* do): the error scales with the norms. In
  DIRECT_DIMS dimensions or fewer, the sum of squared differences instead (exact, and about twice
  as fast as a matmul over so short an axis: the GMM study's 2-D sweep)."""
  if x_NxD.shape[-1] <= DIRECT_DIMS:
    return jnp.sum(jnp.square(x_NxD[:, None, :] - y_MxD[None, :, :]), axis=-1)
  nx_N = jnp.sum(x_NxD * x_NxD, axis=-1)
  ny_M = jnp.sum(y_MxD * y_MxD, axis=-1)
  xy_NxM = jnp.dot(x_NxD, y_MxD.T, precision=jax.lax.Precision.HIGHEST)
  scale_NxM = nx_N[:, None] + ny_M[None, :]
  d2_NxM = scale_NxM - 2.0 * xy_NxM
  return jnp.where(d2_NxM <= ROUNDING * scale_NxM, 0.0, d2_NxM)


def _blocks(x_NxD: jax.Array, block: int) -> tuple[jax.Array, int]:
  """x padded with zero rows to a multiple of `block`, as [num_blocks, block, D], and N."""
  n = x_NxD.shape[0]
  nb = -(-n // block)
  x_PxD = jnp.pad(x_NxD, ((0, nb * block - n), (0, 0)))
  return x_PxD.reshape(nb, block, x_NxD.shape[1]), n


def _check(n: int, k: int, what: str) -> None:
  if k < 1:
    raise ValueError(f"k = {k}: must be >= 1")
  if n <= k:
    raise ValueError(f"{what} has {n} points: a k-NN radius needs more than k = {k}")


def _merge_smallest(a: tuple, b: tuple) -> tuple:
  """The k smallest of two ascending k-tuples, ascending: the i-th is min_j max(a_j, b_(i-j))
  (a_0 = b_0 = -inf), elementwise."""
  k, out = len(a), []
  for i in range(1, k + 1):
    cands = [a[i - 1], b[i - 1]] + [jnp.maximum(a[j - 1], b[i - j - 1]) for j in range(1, i)]
    m = cands[0]
    for c in cands[1:]:
      m = jnp.minimum(m, c)
    out.append(m)
  return tuple(out)


def kth_smallest(d_CxN: jax.Array, k: int) -> jax.Array:
  """The k-th smallest value of each row, repeated values counted with their multiplicity, [C]:
  one variadic reduction carrying each row's k smallest (fused with the distances that feed it;
  several times faster than lax.top_k on the CPU)."""
  inf_CxN = jnp.full(d_CxN.shape, jnp.inf, d_CxN.dtype)
  init = tuple(jnp.array(jnp.inf, d_CxN.dtype) for _ in range(k))
  smallest = jax.lax.reduce((d_CxN,) + (inf_CxN,) * (k - 1), init, _merge_smallest, (1,))
  return smallest[k - 1]


def knn_radii(x_NxD: jax.Array, k: int = 3, block: int = 256) -> jax.Array:
  """Squared distance of each point to its k-th nearest neighbour in the set, itself excluded
  (by index: a duplicate of the point counts as a neighbour at distance 0), [N]."""
  _check(x_NxD.shape[0], k, "the set")
  x_NxD = x_NxD - jnp.mean(x_NxD, axis=0, keepdims=True)
  blocks_BxCxD, n = _blocks(x_NxD, min(block, x_NxD.shape[0]))
  c = blocks_BxCxD.shape[1]

  def one(args):
    i, q_CxD = args
    d2_CxN = sq_dists(q_CxD, x_NxD)
    own_CxN = (i * c + jnp.arange(c))[:, None] == jnp.arange(n)[None, :]
    return kth_smallest(jnp.where(own_CxN, jnp.inf, d2_CxN), k)

  r2 = jax.lax.map(one, (jnp.arange(blocks_BxCxD.shape[0]), blocks_BxCxD))
  return r2.reshape(-1)[:n]


def coverage(query_QxD: jax.Array, ref_NxD: jax.Array, ref_r2_N: jax.Array,
             block: int = 256) -> jax.Array:
  """The fraction of query points inside some reference ball: mean over q of
  any_n |q - ref_n|^2 <= ref_r2_n (a scalar)."""
  mu_1xD = jnp.mean(ref_NxD, axis=0, keepdims=True)
  ref_NxD = ref_NxD - mu_1xD
  blocks_BxCxD, q = _blocks(query_QxD - mu_1xD, min(block, query_QxD.shape[0]))

  def one(q_CxD):
    return jnp.any(sq_dists(q_CxD, ref_NxD) <= ref_r2_N[None, :], axis=1)

  inside = jax.lax.map(one, blocks_BxCxD).reshape(-1)[:q]
  return jnp.mean(inside.astype(jnp.float32))


def knn_precision_recall(real_NxD: jax.Array, fake_MxD: jax.Array, k: int = 3, block: int = 256,
                         real_r2_N: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """(precision, recall) of the fake (student) set against the real (p*) set, k-NN balls.
  real_r2_N: knn_radii(real_NxD, k), when the caller has it already (one p* set, many students)."""
  _check(real_NxD.shape[0], k, "the real set")
  _check(fake_MxD.shape[0], k, "the sample set")
  if real_r2_N is None:
    real_r2_N = knn_radii(real_NxD, k, block)
  fake_r2_M = knn_radii(fake_MxD, k, block)
  precision = coverage(fake_MxD, real_NxD, real_r2_N, block)
  recall = coverage(real_NxD, fake_MxD, fake_r2_M, block)
  return precision, recall


_knn_jit = jax.jit(knn_precision_recall, static_argnames=("k", "block"))


def knn_precision_recall_np(real_NxD, fake_MxD, k: int = 3) -> tuple[Optional[float],
                                                                     Optional[float]]:
  """knn_precision_recall of host arrays as floats (jitted); (None, None) when either set has
  k points or fewer (no k-th neighbour)."""
  if len(real_NxD) <= k or len(fake_MxD) <= k:
    return None, None
  p, r = _knn_jit(jnp.asarray(real_NxD, jnp.float32), jnp.asarray(fake_MxD, jnp.float32), k=k)
  return float(p), float(r)


# ----------------------------------------------------------------------------- text samples


def distinct_n(rows: Sequence[Sequence[int]], n: int) -> Optional[float]:
  """Unique n-grams / n-grams over all rows (n-grams within a row, never across two); None when
  no row has n tokens."""
  grams = [tuple(r[i:i + n]) for r in rows for i in range(len(r) - n + 1)]
  return len(set(grams)) / len(grams) if grams else None


def mean_length(rows: Sequence[Sequence[int]]) -> Optional[float]:
  return float(np.mean([len(r) for r in rows])) if len(rows) else None


@functools.lru_cache(maxsize=1)
def _mauve():
  try:
    import mauve
    return mauve
  except Exception:  # ImportError, or one of its own imports (faiss, torch) failing
    return None


def mauve_available() -> bool:
  return _mauve() is not None


def mauve_score(real_NxD, fake_MxD, seed: int = 0) -> Optional[float]:
  """MAUVE of the fake set against the real set, both given as feature vectors (mauve-text's
  compute_mauve with p_features = real, q_features = fake, its default quantization); None when
  mauve-text is not installed."""
  mauve = _mauve()
  if mauve is None:
    return None
  out = mauve.compute_mauve(p_features=np.asarray(real_NxD, np.float32),
                            q_features=np.asarray(fake_MxD, np.float32), seed=seed,
                            device_id=-1, verbose=False)
  return float(out.mauve)


def sample_measures(real_NxD, fake_MxD, generated_rows: Sequence[Sequence[int]], k: int = 3,
                    seed: int = 0) -> dict:
  """The sample-based measures of one student: knn_precision, knn_recall (its embeddings against
  p*'s), mauve (None without mauve-text), distinct_1/2/3 and mean_length (its generated tokens)."""
  p, r = knn_precision_recall_np(real_NxD, fake_MxD, k)
  out = {"knn_precision": p, "knn_recall": r, "mauve": mauve_score(real_NxD, fake_MxD, seed)}
  for n in (1, 2, 3):
    out[f"distinct_{n}"] = distinct_n(generated_rows, n)
  out["mean_length"] = mean_length(generated_rows)
  return out
