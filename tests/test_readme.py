"""Every command line the README shows is exercised: flagfiles exist and parse, the cluster launch
lines are dry-run verbatim, the paper flagfiles run (scaled down by flags after the flagfile)."""

import json
import os
import re
import shlex
import sys

import pytest

from tests.helpers import REPO, entry_point_runs, run

README = open(os.path.join(REPO, "README.md")).read()


def _commands(prefix):
  """README lines (inside code blocks) starting with prefix, as argv lists."""
  lines = [l.strip() for l in README.splitlines() if l.strip().startswith(prefix)]
  assert lines, f"README shows no line starting with {prefix!r}"
  return [shlex.split(l) for l in lines]


def _run(argv, timeout=300, **env):
  return run(argv, devices=None, timeout=timeout, env=env)  # the one CPU device a user has


def test_readme_opens_with_the_two_setup_commands():
  head = README.split("\n## ")[0]
  assert "python -m experiments.gmm --flagfile=experiments/flags/gmm_paper.flags" in head
  assert 'pip install -e ".[test]"' in head and "python -m pytest -q -n 2 tests" in head
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  assert 'pip install -q -e ".[test]"' in ci and "python -m pytest -q -n 2 tests" in ci


def test_every_flagfile_named_exists_and_every_flagfile_is_named():
  named = set(re.findall(r"experiments/flags/([\w.]+\.flags)", README))
  on_disk = set(f for f in os.listdir(os.path.join(REPO, "experiments", "flags"))
                if f.endswith(".flags"))
  assert named == on_disk


@pytest.mark.slow
def test_gmm_paper_flagfile_runs_scaled_down(tmp_path):
  (argv,) = [a for a in _commands("python -m experiments.gmm") if "gmm_paper.flags" in " ".join(a)]
  argv = [sys.executable if a == "python" else a for a in argv]
  argv = [f"--workdir={tmp_path}" if a.startswith("--workdir=") else a for a in argv]
  # Later flags override the flagfile's: the paper's protocol on a 2 x 2 grid with fewer samples
  # and three of its objectives, with the k-NN measures (README: --knn_samples) in the same run.
  argv += ["--num_betas=2", "--num_seeds=2", "--n_eval=500", "--steps=20",
           "--objectives=direct,seqkd,fkl", "--knn_samples=100"]
  r = _run(argv)
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.load(open(tmp_path / "results.json"))
  assert {r["objective"] for r in result["rows"]} == {"direct", "seqkd", "fkl", "exact"}
  assert all(r["knn_precision"] is not None for r in result["rows"])
  assert set(result["knn_agreement"]) == {"seqkd", "fkl", "exact"}
  assert "rank correlation of precision with knn precision" in r.stderr


def test_tpu_pod_line_dry_runs():
  for argv in _commands("bash launch/tpu_pod.sh"):
    r = _run(argv[:2] + ["--dry_run"] + argv[2:], PATH="/usr/bin:/bin")
    assert r.returncode == 0, r.stderr
    assert "--worker=all" in r.stdout and argv[argv.index("-m") + 1] in r.stdout


def test_slurm_line_dry_runs():
  for argv in _commands("sbatch "):
    nodes = next(a.split("=")[1] for a in argv if a.startswith("--nodes="))
    script = argv.index("launch/slurm.sbatch")
    r = _run(["bash"] + argv[script:], DRY_RUN="1", SLURM_JOB_ID="1",
             SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES=nodes, PATH="/usr/bin:/bin")
    assert r.returncode == 0, r.stderr
    assert f"srun --nodes={nodes}" in r.stdout and argv[argv.index("-m") + 1] in r.stdout


@pytest.mark.slow
def test_llm_dry_run_lines(tmp_path):
  """The paper's plan, and the plans priced on hardware (the compile-only memory analysis of the
  paper's programs takes minutes: skipped here; tests/test_hardware.py compiles a tiny study's).
  The four lines in one process (helpers.entry_point_runs: as cli.run runs main)."""
  lines = [a for a in _commands("python -m experiments.llm") if "--dry_run" in a]
  assert len(lines) == 4
  cases = []
  for argv in lines:
    assert argv[:3] == ["python", "-m", "experiments.llm"], argv
    args = [f"--workdir={tmp_path}" if a.startswith("--workdir=") else a for a in argv[3:]]
    hardware = any(a.startswith("--hardware=") for a in args)
    cases.append(args + ["--nomemory_analysis"] if hardware else args)
  for args, r in zip(cases, entry_point_runs("experiments.llm", cases)):
    assert r.returncode == 0, (args, r.stderr[-2000:])
    paper = "llm_paper.flags" in " ".join(args)
    assert ("smollm2-360m" if paper else "preset:small-49k") in r.stdout, args
    if any(a.startswith("--hardware=") for a in args):
      assert "training mesh" in r.stdout and "assumptions:" in r.stdout, args


def test_accelerator_installs_follow_the_cpu_ones_and_name_real_extras():
  import ast
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  setup = next(n for n in ast.walk(tree)
               if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
  kw = {k.arg: ast.literal_eval(k.value) for k in setup.keywords
        if k.arg in ("install_requires", "extras_require")}
  assert kw["extras_require"]["cuda12"] == ["jax[cuda12]>=0.8.2"]
  assert kw["extras_require"]["tpu"] == ["jax[tpu]>=0.8.2"]
  assert "jax>=0.8.2" in kw["install_requires"]  # the extras keep install_requires' jax versions
  head = README.split("\n## ")[0]
  first_block = head.split("```bash\n")[1].split("```")[0]  # the two CPU commands, as CI runs them
  assert 'pip install -e ".[test]"' in first_block and "[cuda12]" not in first_block
  for extra in ("cuda12", "tpu"):
    assert f'pip install -e ".[{extra}]"' in head.split(first_block)[1]
