"""experiments/gmm.py end to end on the smoke flagfile, and its one-line flag errors."""

import csv
import json
import os
import sys

import pytest

from tests.helpers import REPO, entry_point_runs, run, run_module

SMOKE = os.path.join(REPO, "experiments", "flags", "gmm_smoke.flags")


def _run(*args):
  return run_module("experiments.gmm", *args)  # 8 fake devices, as the tests


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gmm_smoke"))
  proc = _run(f"--flagfile={SMOKE}", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_results_json_rows_and_timing(smoke_run):
  with open(os.path.join(smoke_run, "results.json")) as f:
    result = json.load(f)
  rows = result["rows"]
  for r in rows:
    assert set(r) >= {"objective", "beta", "seed", "precision", "recall", "teacher_entropy",
                      "status", "converged", "final_objective", "objective_change", "note"}
    assert r["status"] in ("ok", "not_converged", "non_finite")
    if r["objective"] in ("fkl", "rkl", "jsd"):
      assert r["final_objective"] is not None and r["objective_change"] is not None
  objectives = {r["objective"] for r in rows}
  assert objectives == {"direct", "seqkd", "fkl", "rkl", "jsd", "exact"}
  direct = [r for r in rows if r["objective"] == "direct"]
  assert len(direct) == 2 and all(r["beta"] is None for r in direct)  # 2 seeds, beta-free
  seqkd = [r for r in rows if r["objective"] == "seqkd" and r["knob"] == "beta"]
  assert len(seqkd) == 2 * 3
  assert sorted({r["beta"] for r in seqkd}) == pytest.approx([1.0, 30 ** 0.5, 30.0], rel=1e-5)
  assert all(r["precision"] is not None and r["recall"] is not None for r in rows)
  ent = {r["beta"]: r["teacher_entropy"] for r in seqkd if r["seed"] == 0}
  assert ent[min(ent)] > ent[max(ent)]
  ent = {r["beta"]: r["teacher_density_entropy"] for r in seqkd if r["seed"] == 0}
  assert ent[min(ent)] > ent[max(ent)]
  # the smoke flagfile sweeps every knob; beta rows are the by-beta rows above
  knob_rows = [r for r in rows if r["objective"] == "seqkd" and r["knob"] != "beta"]
  assert {r["knob"] for r in knob_rows} == {"top_p", "top_k"}
  assert all(r["beta"] is None and r["teacher_density_entropy"] is not None for r in knob_rows)
  slopes = result["entropy_slopes"]["seqkd"]
  assert set(slopes) == {"beta", "top_p", "top_k"}
  assert slopes["top_k"]["minus_beta"]["precision"]["n"] == 2
  timing = result["timing"]
  assert timing["configs"] == 2 * (3 + 2 + 2)
  assert timing["compile_seconds"] > 0 and timing["sweep_seconds"] > 0


@pytest.mark.slow
def test_same_flags_and_seed_give_identical_rows(smoke_run, poisoned_run):
  """The smoke flagfile run again (the poisoned run below: the same flags and seed, two outputs
  overwritten after the grid) gives bit-identical rows; only "timing" may differ between runs, and
  in the two poisoned rows only the overwritten number, its status and its note."""
  _, workdir = poisoned_run
  rows = [json.load(open(os.path.join(d, "results.json")))["rows"] for d in (smoke_run, workdir)]
  assert len(rows[0]) == len(rows[1])
  poisoned = {("rkl", 1.0, 1): "precision", ("jsd", 30.0, 0): "recall"}
  for clean, again in zip(*rows):
    differ = {k for k in clean if clean[k] != again[k]}
    if clean["knob"] == "beta" and again["status"] == "non_finite":
      key = (clean["objective"], round(clean["beta"], 3), clean["seed"])
      assert differ <= {poisoned.pop(key), "status", "note"}, (clean, again)
    else:
      assert not differ, (clean, again)
  assert not poisoned  # both poisoned rows were found


@pytest.mark.slow
def test_csv_has_the_same_rows(smoke_run):
  with open(os.path.join(smoke_run, "results.json")) as f:
    rows = json.load(f)["rows"]
  with open(os.path.join(smoke_run, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert len(table) == len(rows)
  assert list(table[0]) == ["objective", "knob", "knob_value", "beta", "seed", "precision",
                            "recall", "teacher_entropy", "teacher_density_entropy", "status",
                            "converged", "final_objective", "objective_change", "objective_gap",
                            "note"]
  for r, t in zip(rows, table):
    assert t["objective"] == r["objective"]
    assert float(t["precision"]) == pytest.approx(r["precision"])


@pytest.mark.slow
def test_figures_exist_and_are_not_trivial(smoke_run):
  import matplotlib.image
  for name in ("precision_vs_beta", "recall_vs_beta", "precision_vs_recall", "densities",
               "precision_vs_entropy", "recall_vs_entropy"):
    path = os.path.join(smoke_run, name + ".png")
    assert os.path.getsize(path) > 10_000, name
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05, name  # not a blank canvas


@pytest.mark.slow
def test_other_configuration_is_refused_unless_overwrite(smoke_run):
  proc = _run(f"--flagfile={SMOKE}", f"--workdir={smoke_run}", "--n_eval=400", "--num_betas=0")
  assert proc.returncode != 0  # flags are checked first
  proc = _run(f"--workdir={smoke_run}", "--n_eval=7", "--objectives=direct", "--num_seeds=1",
              "--num_betas=1", "--n_train=20", "--teacher_components=2", "--n_teacher_samples=20")
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "--overwrite" in lines[0] and "n_eval" in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _run(f"--workdir={smoke_run}", "--n_eval=7", "--objectives=direct", "--num_seeds=1",
              "--num_betas=1", "--n_train=20", "--teacher_components=2", "--n_teacher_samples=20",
              "--overwrite")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(smoke_run, "results.json")) as f:
    assert json.load(f)["timing"]["configs"] == 1


FLAG_ERRORS = [
    (["--num_betas=0"], "--num_betas"),
    (["--beta_min=0"], "--beta_min"),
    (["--beta_min=-1"], "--beta_min"),
    (["--beta_min=10", "--beta_max=2"], "--beta_max"),
    (["--teacher_components=0"], "--teacher_components"),
    (["--student_components=0"], "--student_components"),
    (["--objectives=direct,bogus"], "--objectives"),
    (["--objectives="], "--objectives"),
    (["--num_seeds=0"], "--num_seeds"),
    (["--n_eval=0"], "--n_eval"),
    (["--covariance=spherical"], "--covariance"),
    (["--jsd_mix=1.5"], "--jsd_mix"),
    (["--ground_truth=random:x:2"], "--ground_truth"),
    (["--ground_truth=json:/nonexistent.json"], "--ground_truth"),
    (["--convergence_tol=0"], "--convergence_tol"),
    (["--flagfile=/nonexistent/gmm.flags"], "gmm.flags"),
    (["--knobs=top_p"], "--knobs"),
    (["--knobs=beta,temperature"], "--knobs"),
    (["--knobs=beta,top_p", "--top_p_values=0.5,1.5"], "--top_p_values"),
    (["--knobs=beta,top_k", "--top_k_values=0,2"], "--top_k_values"),
    (["--knobs=beta,top_k", "--top_k_values=1.5"], "--top_k_values"),
]


@pytest.mark.slow
def test_flag_errors_are_one_line(tmp_path):
  """Every bad flag set in one process (helpers.entry_point_runs: as cli.run runs main)."""
  cases = [[f"--workdir={tmp_path}/w", *args] for args, _ in FLAG_ERRORS]
  for (args, flag), proc in zip(FLAG_ERRORS, entry_point_runs("experiments.gmm", cases,
                                                                devices=8)):
    assert proc.returncode != 0, args
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, (args, proc.stderr)
    assert flag in lines[0] and "Traceback" not in proc.stderr, (args, lines)
  assert not os.path.exists(f"{tmp_path}/w/results.json")


POISON = """
import sys
import experiments.gmm as entry
from kdjax import cli
from kdjax.gmm import study
real = study.compile_and_run
def poisoned(*args):
  out, timing = real(*args)
  out["precision"]["rkl"] = out["precision"]["rkl"].at[1, 0].set(float("nan"))
  out["recall"]["jsd"] = out["recall"]["jsd"].at[0, 2].set(-float("inf"))
  return out, timing
study.compile_and_run = poisoned
cli.run(entry.main)
"""


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
  """The smoke flagfile with NaN / inf injected into two rows: (process, workdir)."""
  workdir = str(tmp_path_factory.mktemp("gmm_poisoned"))
  return run([sys.executable, "-c", POISON, f"--flagfile={SMOKE}", f"--workdir={workdir}"]), workdir


@pytest.mark.slow
def test_non_finite_rows_warn_once_per_objective_and_exit_zero(poisoned_run):
  """NaN / inf in a row (injected into the grid's outputs): one warning line per objective naming
  the betas and seeds, null values with the reason, left out of the summary, exit status 0."""
  proc, tmp_path = poisoned_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  warned = [l for l in proc.stderr.splitlines() if "non-finite" in l]
  assert len(warned) == 2, proc.stderr
  (rkl,) = [l for l in warned if "rkl:" in l]
  assert "betas 1;" in rkl and "seeds 1" in rkl, rkl
  (jsd,) = [l for l in warned if "jsd:" in l]
  assert "betas 30;" in jsd and "seeds 0" in jsd, jsd
  result = json.load(open(os.path.join(tmp_path, "results.json")))
  bad = [r for r in result["rows"] if r["status"] == "non_finite"]
  assert len(bad) == 2 and result["left_out"]["non_finite"] == 2
  (r,) = [r for r in bad if r["objective"] == "rkl"]
  assert r["precision"] is None and r["recall"] is not None and "precision was nan" in r["note"]
  (r,) = [r for r in bad if r["objective"] == "jsd"]
  assert r["recall"] is None and "recall was -inf" in r["note"]
  assert result["summary"]["rkl"]["beta=1"]["left_out"] == 1
  assert result["summary"]["rkl"]["beta=1"]["n"] == 1
  assert result["summary"]["jsd"]["beta=30"]["left_out"] == 1
  assert "left out" in proc.stderr


@pytest.mark.slow
def test_the_issues_high_dimensional_case_ends_cleanly(tmp_path):
  """random:3:40 with full covariances and rkl (NaN rows and a traceback before): exit 0, every
  row either finite or flagged, and the summary never formats a missing mean."""
  proc = _run(f"--flagfile={SMOKE}", "--ground_truth=random:3:40", "--covariance=full",
              "--objectives=rkl", f"--workdir={tmp_path}")
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  rows = json.load(open(os.path.join(tmp_path, "results.json")))["rows"]
  for r in rows:
    finite = r["precision"] is not None and r["recall"] is not None
    assert finite or r["status"] == "non_finite", r


@pytest.mark.slow
def test_json_ground_truth_line_from_the_readme(tmp_path):
  (line,) = [l.strip() for l in open(os.path.join(REPO, "README.md"))
             if l.strip().startswith("python -m experiments.gmm") and "json:" in l]
  argv = [a for a in line.split()[3:] if not a.startswith("--workdir=")]
  # later flags override the line's: its p* and covariance at a smaller grid and fewer samples,
  # beta the only knob (top_p / top_k teachers run end to end in the smoke run above)
  small = ("--num_betas=2", "--num_seeds=1", "--steps=5", "--n_eval=200", "--n_teacher_samples=50",
           "--knobs=beta")
  proc = _run(*argv, *small, f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.load(open(os.path.join(tmp_path, "results.json")))
  assert result["config"]["ground_truth"].startswith("json:")
  assert all(r["precision"] is not None for r in result["rows"])


def test_summary_means_use_ok_rows_only():
  from kdjax.gmm import report
  row = lambda seed, p, status: {"objective": "rkl", "beta": 1.0, "seed": seed, "precision": p,
                                 "recall": -1.0, "status": status}
  rows = [row(0, -1.0, "ok"), row(1, -3.0, "ok"), row(2, -100.0, "not_converged"),
          row(3, None, "non_finite")]
  entry = report.summarize(rows)["rkl"]["beta=1"]
  assert entry["n"] == 2 and entry["left_out"] == 2
  assert entry["precision"]["mean"] == pytest.approx(-2.0)
  lines = report.problems(rows)
  assert len(lines) == 2 and any("seeds 2" in l and "did not converge" in l for l in lines)
