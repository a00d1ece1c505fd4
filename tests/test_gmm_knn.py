"""The GMM study's k-NN precision / recall (--knn_samples): the grid's numbers are the metric on the
grid's own samples, they order the students as the likelihood measures do, the report's rank
agreement and flag validation (the entry point on the paper flagfile with --knn_samples:
tests/test_readme.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import mixture as mx
from kdjax.cli import UserError
from kdjax.gmm import ground_truth, report, study
from tests.test_sample_metrics import _reference

CFG = study.StudyConfig(n_eval=300, objectives=("direct", "seqkd"), knn_samples=200)
SEEDS, BETAS = [0, 1, 2, 3], [1.0, 30.0]


@pytest.fixture(scope="module")
def grid():
  p_star = ground_truth.ground_truth("grid8", 0)
  out, _ = study.compile_and_run(CFG, p_star, SEEDS, BETAS)
  return p_star, out


def test_grid_knn_is_the_metric_on_the_grids_samples(grid):
  """A student's k-NN numbers are Kynkäänniemi et al.'s (float64 brute force) on the first
  knn_samples of its evaluation samples and of p*'s, for every method, seed and beta."""
  p_star, out = grid
  n = CFG.knn_samples

  def first(seed):  # the seed's first n p* samples and evaluation draws
    part = study.seed_part(CFG, p_star, seed)
    return jax.tree.map(lambda a: a[:n], (part["x_star"], part["eval_draws"]))

  x_star_S, draws_S = jax.jit(jax.vmap(first))(jnp.asarray(SEEDS))  # eagerly: 4x the CPU time
  for s, seed in enumerate(SEEDS):
    real = np.asarray(x_star_S[s])
    draws = jax.tree.map(lambda a: a[s], draws_S)
    for m in CFG.methods:
      for b in range(len(BETAS)):
        student = jax.tree.map(lambda a: a[s, b], out["students"][m])
        fake = np.asarray(mx.sample_with(student, draws))
        want = _reference(real, fake, CFG.knn_k)
        got = (float(out["knn_precision"][m][s, b]), float(out["knn_recall"][m][s, b]))
        assert got == pytest.approx(want, abs=1e-6), (m, seed, BETAS[b])


def test_knn_orders_the_students_like_the_likelihoods(grid):
  """At beta = 30 a seqkd student that moved onto the teacher's heaviest mode (its likelihood
  precision and recall more than 1 nat from the direct student's, one Gaussian over all eight
  modes) is also ahead in k-NN precision and behind in k-NN recall."""
  _, out = grid
  clear = 0
  for s in range(len(SEEDS)):
    gap = {k: float(out[k]["seqkd"][s, 1] - out[k]["direct"][s, 1])
           for k in ("precision", "recall", "knn_precision", "knn_recall")}
    if gap["precision"] > 1 and gap["recall"] < -1:
      clear += 1
      assert gap["knn_precision"] > 0 and gap["knn_recall"] < 0, (SEEDS[s], gap)
  assert clear >= 2


def test_rows_and_csv_carry_knn(grid):
  _, out = grid
  rows = report.rows_from_outputs(CFG.methods, out, SEEDS, BETAS)
  assert all(0 <= r["knn_precision"] <= 1 and 0 <= r["knn_recall"] <= 1 for r in rows)
  header = report.csv_text(rows).splitlines()[0].split(",")
  assert header[-2:] == ["knn_precision", "knn_recall"]
  assert "knn_precision" in report.summarize(rows)["seqkd"]["beta=30"]


def _rows(precision, knn_precision, status="ok"):
  return [{"objective": "seqkd", "beta": float(b), "seed": 0, "precision": p, "recall": -p,
           "knn_precision": q, "knn_recall": -q, "status": status}
          for b, (p, q) in enumerate(zip(precision, knn_precision))]


def test_knn_agreement_by_hand():
  a = report.knn_agreement(_rows([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.5]))["seqkd"]
  assert a["spearman_precision"] == pytest.approx(1.0) and a["spearman_recall"] == pytest.approx(1.0)
  assert a["beta_min"]["knn_precision"] == 0.1 and a["beta_max"]["precision"] == 4
  a = report.knn_agreement(_rows([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1]))["seqkd"]
  assert a["spearman_precision"] == pytest.approx(-1.0)
  a = report.knn_agreement(_rows([1, 2, 3], [0.5, 0.5, 0.5]))["seqkd"]
  assert a["spearman_precision"] is None  # constant: no rank order to compare
  # ties share their mean rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3)
  a = report.knn_agreement(_rows([1, 2, 3, 4], [0.1, 0.2, 0.2, 0.3]))["seqkd"]
  assert a["spearman_precision"] == pytest.approx(np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1])
  assert report.knn_agreement(_rows([1, 2], [0.1, 0.2], status="not_converged"))["seqkd"][
      "betas"] == 0


@pytest.mark.parametrize("change", [{"knn_samples": 3}, {"knn_samples": 301}, {"knn_samples": -1},
                                    {"knn_samples": 10, "knn_k": 0}])
def test_bad_knn_flags_are_refused(change):
  with pytest.raises(UserError, match="--knn_"):
    study.StudyConfig(n_eval=300, **change)


# The paper flagfile with --knn_samples end to end: tests/test_readme.py's scaled-down run of the
# README's first command.
