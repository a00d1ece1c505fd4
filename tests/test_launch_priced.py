"""launch/priced.txt: one launch line per configuration the study is priced for. Each launcher is
dry-run (the command it would start on every host) and each line's command is priced again with
`--dry_run --hardware=NAME --nomemory_analysis`: the hours its comment states are the hours it
prints (the compiled-program figures take minutes of compiles: measured once, not re-run here)."""

import os
import re
import shlex
import sys

import pytest

from tests.helpers import REPO, run

PRICED = os.path.join(REPO, "launch", "priced.txt")


def _lines() -> list[tuple[str, list[str]]]:
  """(the comment above it, argv) of every launch line."""
  out, comment = [], ""
  for line in open(PRICED).read().splitlines():
    if line.startswith("#"):
      comment = line
    elif line.strip():
      out.append((comment, shlex.split(line)))
  return out


def _command(argv: list[str]) -> list[str]:
  """The `python -m experiments.llm ...` a launch line starts (after the launcher's own args)."""
  return argv[argv.index("python"):]


def test_one_line_per_priced_configuration():
  lines = _lines()
  hardware = [re.search(r"--hardware=(\S+) prices", c).group(1) for c, _ in lines]
  assert hardware == ["h100-8", "v5p-64", "h100"]
  for _, argv in lines:
    assert _command(argv)[:3] == ["python", "-m", "experiments.llm"]


def test_launchers_dry_run_every_line():
  for comment, argv in _lines():
    cmd = " ".join(_command(argv))
    if argv[0] == "sbatch":
      nodes = next(a.split("=")[1] for a in argv if a.startswith("--nodes="))
      script = argv.index("launch/slurm.sbatch")
      r = run(["bash"] + argv[script:], devices=None, timeout=60,
              env=dict(DRY_RUN="1", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="gpu001",
                       SLURM_JOB_NUM_NODES=nodes, PATH="/usr/bin:/bin"))
      assert r.returncode == 0, r.stderr
      assert f"srun --nodes={nodes} --ntasks={nodes}" in r.stdout and cmd in r.stdout, r.stdout
    else:
      assert argv[:2] == ["bash", "launch/tpu_pod.sh"], argv
      r = run(argv[:2] + ["--dry_run"] + argv[2:], devices=None, timeout=60,
              env=dict(PATH="/usr/bin:/bin"))
      assert r.returncode == 0, r.stderr
      assert "--worker=all" in r.stdout and "KDJAX_CLUSTER=tpu " + cmd in r.stdout, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("i", range(3))
def test_each_line_prints_the_hours_its_comment_states(i):
  comment, argv = _lines()[i]
  name, hours = re.search(r"--hardware=(\S+) prices ([\d.]+) h \(--nomemory_analysis",
                          comment).groups()
  cmd = [sys.executable if a == "python" else a for a in _command(argv)]
  cmd = [a for a in cmd if not a.startswith("--workdir=")]
  r = run(cmd + ["--dry_run", f"--hardware={name}", "--nomemory_analysis"], devices=None,
          timeout=300, env=dict(PATH="/usr/bin:/bin"))
  assert r.returncode == 0, r.stderr[-3000:]
  total = next(l for l in r.stdout.splitlines() if l.strip().startswith("total ") and "days" in l)
  assert f"{float(total.split()[1]):.3g}" == f"{float(hours):.3g}", total
