"""Inputs one step off the paper's grid (issue 19): a 1-D ground truth end to end, figures included;
a ground truth positive definite in float64 but not usable in float32, refused in one line before
any compute; an objective whose every row is non-finite ends the run with a non-zero exit."""

import json
import os
import sys

import numpy as np
import pytest

from kdjax import mixture as mx
from kdjax.cli import UserError
from kdjax.gmm import ground_truth as gt
from kdjax.gmm import plots
from tests.helpers import REPO, run

SMOKE = os.path.join(REPO, "experiments", "flags", "gmm_smoke.flags")
TINY = ("--num_betas=2", "--num_seeds=1", "--steps=5", "--n_eval=200", "--n_teacher_samples=50")

FLOAT32_BAD = {
    "variance 1e-50": ({"weights": [0.5, 0.5], "means": [[-1.0], [1.0]],
                        "variances": [[1e-50], [0.1]]}, "outside float32's range"),
    "variance 1e40": ({"weights": [0.5, 0.5], "means": [[-1.0, 0.0], [1.0, 0.0]],
                       "variances": [[1.0, 1e40], [0.1, 0.1]]}, "outside float32's range"),
    "correlation 0.99999999": ({"weights": [1.0], "means": [[0.0, 0.0]],
                                "covariances": [[[1.0, 0.99999999], [0.99999999, 1.0]]]},
                               "singular in float32"),
}


def _run(*args, code=None):
  argv = ["-c", code] if code else ["-m", "experiments.gmm"]
  return run([sys.executable, *argv, *args])  # 8 fake devices, as the tests


def _write(tmp_path, doc, name="p.json"):
  path = tmp_path / name
  path.write_text(json.dumps(doc))
  return str(path)


@pytest.mark.parametrize("case", sorted(FLOAT32_BAD))
def test_float32_unusable_ground_truth_is_refused(tmp_path, case):
  doc, message = FLOAT32_BAD[case]
  path = _write(tmp_path, doc)
  with pytest.raises(UserError) as e:
    gt.ground_truth(f"json:{path}")
  assert message in str(e.value) and path in str(e.value), str(e.value)


def test_float32_usable_neighbours_still_load(tmp_path):
  """What the checks must not refuse: a correlation of 0.9999 (condition number 2e4), variances
  of 1e-20 and 1e20 in one full covariance (the correlation matrix is the identity), and the
  ends of float32's range."""
  for doc in ({"weights": [1.0], "means": [[0.0, 0.0]],
               "covariances": [[[1.0, 0.9999], [0.9999, 1.0]]]},
              {"weights": [1.0], "means": [[0.0, 0.0]], "covariances": [[[1e-20, 0], [0, 1e20]]]},
              {"weights": [0.5, 0.5], "means": [[0.0], [1.0]], "variances": [[1e-37], [1e38]]}):
    m = gt.ground_truth(f"json:{_write(tmp_path, doc)}")
    assert np.all(np.isfinite(np.asarray(mx.variances(m))))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FLOAT32_BAD))
def test_float32_unusable_ground_truth_is_one_error_line_before_compute(tmp_path, case):
  path = _write(tmp_path, FLOAT32_BAD[case][0])
  proc = _run(f"--flagfile={SMOKE}", f"--ground_truth=json:{path}", "--covariance=full",
              f"--workdir={tmp_path}/w", *TINY)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --ground_truth=json:"), proc.stderr
  assert not os.path.exists(f"{tmp_path}/w")  # refused before the workdir, let alone compute


def test_density_of_a_singular_or_nan_mixture_is_nan_not_an_exception():
  """A diverged student (a zero or NaN covariance) plots as a "(non-finite)" panel; numpy's
  inverse raised LinAlgError from the figures before."""
  m = mx.Mixture(np.zeros(1, np.float32), np.zeros((1, 2), np.float32),
                 np.array([[[-np.inf, 0.0], [0.0, 0.0]]], np.float32))
  assert np.all(np.isnan(plots._log_density_2d(m, np.zeros((3, 2)))))
  m = m._replace(scales=np.full((1, 2, 2), np.nan, np.float32))
  assert np.all(np.isnan(plots._log_density_2d(m, np.zeros((3, 2)))))


def test_one_dimensional_density_panels(tmp_path):
  """D = 1: the panels are curves of the right density (its integral over the range is ~1)."""
  p_star = mx.from_moments(np.array([0.3, 0.7], np.float32), np.array([[-1.0], [1.0]], np.float32),
                           np.array([[0.05], [0.1]], np.float32))
  x_N = np.linspace(*plots._extent_1d(p_star, 2.0), 2001)
  dens_N = np.exp(plots._log_density_2d(p_star, x_N[:, None]))
  assert np.trapezoid(dens_N, x_N) == pytest.approx(1.0, abs=1e-3)
  path = str(tmp_path / "d.png")
  plots.plot_densities([("p*", p_star), ("again", p_star)], path, points=np.zeros((5, 1)))
  assert os.path.getsize(path) > 5_000


def _one_dimensional_flags(tmp_path, covariance):
  """The smoke flagfile, TINY, on a 1-D two-component json ground truth."""
  key = "variances" if covariance == "diag" else "covariances"
  var = [[0.05], [0.1]] if covariance == "diag" else [[[0.05]], [[0.1]]]
  path = _write(tmp_path, {"weights": [0.3, 0.7], "means": [[-1.0], [1.0]], key: var})
  return f"--flagfile={SMOKE}", f"--ground_truth=json:{path}", f"--covariance={covariance}", *TINY


@pytest.mark.slow
def test_one_dimensional_ground_truth_end_to_end(tmp_path):
  # diagonal covariance only: a full-covariance json p* runs end to end in
  # tests/test_experiments_gmm.py (the README's json line, 2-D); the [full] variant of this test
  # (35 CPU-s) went to keep the suite in its time
  proc = _run(*_one_dimensional_flags(tmp_path, "diag"), f"--workdir={tmp_path}/w")
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  rows = json.load(open(f"{tmp_path}/w/results.json"))["rows"]
  assert rows and all(r["precision"] is not None and r["recall"] is not None for r in rows)
  for name in ("precision_vs_beta", "recall_vs_beta", "precision_vs_recall", "densities"):
    assert os.path.getsize(f"{tmp_path}/w/{name}.png") > 10_000, name


ALL_NAN = """
import experiments.gmm as entry
from kdjax import cli
from kdjax.gmm import study
real = study.compile_and_run
def poisoned(*args):
  out, timing = real(*args)
  out["precision"]["rkl"] = out["precision"]["rkl"] * float("nan")
  out["recall"]["jsd"] = out["recall"]["jsd"].at[0, 0].set(float("nan"))  # one row only
  return out, timing
study.compile_and_run = poisoned
cli.run(entry.main)
"""


@pytest.mark.slow
def test_an_objective_with_no_finite_row_fails_the_run(tmp_path):
  # the 1-D diag run's flags (above, all five objectives): its compiled grid is read back from the
  # test run's compilation cache, so this run costs its process and figures, not a compile
  proc = _run(*_one_dimensional_flags(tmp_path, "diag"), f"--workdir={tmp_path}", code=ALL_NAN)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "rkl" in errors[0] and "jsd" not in errors[0], proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == errors[0]
  rows = json.load(open(f"{tmp_path}/results.json"))["rows"]  # rows are still written
  assert all(r["status"] == "non_finite" for r in rows if r["objective"] == "rkl")
  assert os.path.exists(f"{tmp_path}/densities.png")
