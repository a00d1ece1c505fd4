"""kdjax/sample_metrics.py: k-NN precision / recall against a float64 brute-force reference and on
cases with a known answer; distinct-n on a hand-made example; MAUVE's absence is a null."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kdjax import sample_metrics as sm


def _reference(real, fake, k):
  """Kynkäänniemi et al.'s definition in float64, one point at a time: radius = distance to the
  k-th nearest other point of its own set (self excluded by index)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

  def radii(x):
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]

  def inside(q, ref, r):
    d = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
    return float(np.mean((d <= r[None]).any(axis=1)))
  return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def _clouds(seed, n=60, m=45, d=5):
  """p* a wide cloud; the student a narrower cloud off-centre: precision and recall differ."""
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(n, d)).astype(np.float32)
  fake = (0.5 * rng.normal(size=(m, d)) + 0.7).astype(np.float32)
  return real, fake


@pytest.mark.parametrize("seed, k, block, d", [(0, 3, 256, 5), (1, 3, 7, 2), (2, 1, 16, 20),
                                               (3, 5, 13, 12)])
def test_knn_matches_brute_force(seed, k, block, d):
  """Blocks that do not divide the sets (7, 13) included: padding rows never count. Both ways of
  computing distances: direct differences (d <= 8) and the matmul."""
  real, fake = _clouds(seed, d=d)
  p, r = sm.knn_precision_recall(jnp.asarray(real), jnp.asarray(fake), k=k, block=block)
  ref_p, ref_r = _reference(real, fake, k)
  assert (float(p), float(r)) == pytest.approx((ref_p, ref_r), abs=1e-6)
  assert abs(ref_p - ref_r) > 0.1  # the case tells precision from recall
  # self excluded: the k-th neighbour including self (the (k-1)-th other) gives other numbers
  if k > 1:
    assert (ref_p, ref_r) != pytest.approx(_reference(real, fake, k - 1), abs=1e-6)


def test_kth_smallest_counts_ties():
  rng = np.random.default_rng(0)
  d = rng.integers(0, 4, size=(50, 9)).astype(np.float32)  # many ties
  for k in (1, 2, 3, 5, 9):
    assert np.asarray(sm.kth_smallest(jnp.asarray(d), k)).tolist() == np.sort(d, 1)[:, k - 1].tolist()


def test_knn_radii_exclude_self_and_count_duplicates():
  x = np.array([[0.0], [1.0], [3.0], [3.0], [7.0]], np.float32)
  r2 = np.asarray(sm.knn_radii(jnp.asarray(x), k=1))
  assert r2 == pytest.approx([1.0, 1.0, 0.0, 0.0, 16.0], abs=1e-5)  # a duplicate is a
  assert r2[2] == 0.0 and r2[3] == 0.0  # neighbour at exactly 0; self is not one
  r2 = np.asarray(sm.knn_radii(jnp.asarray(x), k=2))
  assert r2 == pytest.approx([9.0, 4.0, 4.0, 4.0, 16.0], abs=1e-5)


def test_identical_points_are_at_distance_zero():
  """|x|^2 + |x|^2 - 2 x.x rounds to about 1e-6 x |x|^2 in float32 (of either sign): identical
  points must still be at exactly 0 (a ball of radius 0, a point with k duplicates, holds them),
  and distinct ones keep their distance."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(64, 576)) * rng.uniform(0.1, 3, size=576) + 5.0).astype(np.float32)
  x = x - x.mean(0)
  d2 = np.asarray(sm.sq_dists(jnp.asarray(x), jnp.asarray(x)))
  assert (np.diag(d2) == 0).all()
  ref = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
  off = ~np.eye(64, dtype=bool)
  assert d2[off] == pytest.approx(ref[off], rel=1e-4)


def test_duplicates_against_the_reference():
  """Many repeated points (as in a low-temperature model's samples), offset far from the origin
  in 64 dimensions: balls of radius 0 still hold their duplicates despite matmul rounding."""
  rng = np.random.default_rng(5)
  base = rng.normal(size=(6, 64)) + 40.0
  real = base[rng.integers(0, 6, size=40)].astype(np.float32)
  fake = np.concatenate([base[:2][rng.integers(0, 2, size=20)],
                         rng.normal(size=(10, 64)) + 40.0]).astype(np.float32)
  p, r = sm.knn_precision_recall(jnp.asarray(real), jnp.asarray(fake), k=3, block=16)
  ref = _reference(real, fake, 3)
  assert (float(p), float(r)) == pytest.approx(ref, abs=1e-6)
  assert 0 < ref[0] < 1 and 0 < ref[1] < 1


def test_known_answers():
  real, _ = _clouds(0)
  same = sm.knn_precision_recall(jnp.asarray(real), jnp.asarray(real), k=3)
  assert [float(v) for v in same] == [1.0, 1.0]
  far = real + 1000.0
  assert [float(v) for v in sm.knn_precision_recall(jnp.asarray(real), jnp.asarray(far))] == [0.0, 0.0]
  # the student's points all inside p*'s support but covering one corner of it: precision 1,
  # recall low (a swap of the two fails here)
  rng = np.random.default_rng(1)
  wide = rng.uniform(0, 10, size=(400, 2)).astype(np.float32)
  corner = rng.uniform(0, 2, size=(100, 2)).astype(np.float32)
  p, r = sm.knn_precision_recall(jnp.asarray(wide), jnp.asarray(corner), k=3)
  assert float(p) > 0.95 and float(r) < 0.2


def test_knn_under_vmap_and_jit():
  """The GMM study calls it inside a vmapped sweep: per-row results equal the one-by-one ones."""
  sets = [_clouds(s, n=30, m=30, d=2) for s in range(3)]
  real = jnp.stack([jnp.asarray(a) for a, _ in sets])
  fake = jnp.stack([jnp.asarray(b) for _, b in sets])
  f = jax.jit(jax.vmap(lambda a, b: sm.knn_precision_recall(a, b, k=3, block=8)))
  p_S, r_S = f(real, fake)
  for i, (a, b) in enumerate(sets):
    assert (float(p_S[i]), float(r_S[i])) == pytest.approx(_reference(a, b, 3), abs=1e-6)


def test_too_few_points():
  x = jnp.zeros((3, 2))
  with pytest.raises(ValueError, match="3 points"):
    sm.knn_precision_recall(x, jnp.ones((10, 2)), k=3)
  assert sm.knn_precision_recall_np(np.zeros((3, 2)), np.ones((10, 2)), k=3) == (None, None)


def test_distinct_n_by_hand():
  rows = [[1, 2, 3, 1, 2], [1, 2, 4], [5]]
  # unigrams: 1 2 3 1 2 | 1 2 4 | 5 -> 9 in all, unique {1, 2, 3, 4, 5}
  assert sm.distinct_n(rows, 1) == pytest.approx(5 / 9)
  # bigrams: (1,2) (2,3) (3,1) (1,2) | (1,2) (2,4) -> 6 in all, unique 4; none across rows
  assert sm.distinct_n(rows, 2) == pytest.approx(4 / 6)
  # trigrams: (1,2,3) (2,3,1) (3,1,2) | (1,2,4) -> 4, all unique
  assert sm.distinct_n(rows, 3) == 1.0
  assert sm.distinct_n([[1, 2]], 3) is None
  assert sm.mean_length(rows) == pytest.approx(3.0)


def test_sample_measures_row():
  real, fake = _clouds(0)
  out = sm.sample_measures(real, fake, [[1, 1, 2], [1, 2]], k=3)
  assert set(out) == {"knn_precision", "knn_recall", "mauve", "distinct_1", "distinct_2",
                      "distinct_3", "mean_length"}
  assert (out["knn_precision"], out["knn_recall"]) == pytest.approx(_reference(real, fake, 3))
  assert out["distinct_1"] == pytest.approx(2 / 5) and out["distinct_3"] == 1.0
  if not sm.mauve_available():
    assert out["mauve"] is None


def test_mauve_when_installed():
  """mauve-text is optional (it imports faiss): with it, MAUVE on features tells one distribution
  from a shifted one; without it the row's value is None (test_sample_measures_row)."""
  if not sm.mauve_available():
    pytest.skip("mauve-text not installed")
  rng = np.random.default_rng(0)
  real = rng.normal(size=(200, 16)).astype(np.float32)
  same = sm.mauve_score(real, rng.normal(size=(200, 16)).astype(np.float32))
  shifted = sm.mauve_score(real, rng.normal(size=(200, 16)).astype(np.float32) + 2.0)
  assert 0 <= shifted < 0.5 < same <= 1
