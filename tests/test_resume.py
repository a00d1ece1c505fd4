"""Issue 6: SIGKILL after the first checkpoint + the same command again == an uninterrupted run;
a NaN loss stops with a message naming the step and keeps the last good checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from kdjax import checkpoint as ckpt_lib
from tests.conftest import REPO

FLAGFILE = os.path.join(REPO, "experiments", "flags", "resume_smoke.flags")


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "experiments.train_lm", f"--flagfile={FLAGFILE}",
          f"--workdir={workdir}", "--progress=false", *extra]


def _run(workdir, *extra):
  return subprocess.run(_cmd(workdir, *extra), cwd=REPO, capture_output=True, text=True,
                        timeout=600)


def _summary(workdir):
  with open(os.path.join(workdir, "train_summary.json")) as f:
    return json.load(f)


def test_sigkill_then_rerun_gives_identical_params(tmp_path):
  a, b = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
  r = _run(a)
  assert r.returncode == 0, r.stderr[-2000:]
  ref = _summary(a)
  assert ref["steps"] == 40 and math.isfinite(ref["final_loss"])

  proc = subprocess.Popen(_cmd(b), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = os.path.join(b, "checkpoints", "10")
  deadline = time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(b, "train_summary.json"))

  r = _run(b)  # the same command again
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming from" in r.stdout
  got = _summary(b)
  assert got["resumed_from_step"] >= 10
  assert got["params_checksum"] == ref["params_checksum"]
  assert got["final_loss"] == ref["final_loss"]
  assert got["best_step"] == ref["best_step"]
  assert got["best_val_perplexity"] == ref["best_val_perplexity"]


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  w = str(tmp_path / "nan")
  r = _run(w, "--debug_nan_at_step=25")
  assert r.returncode == 1
  err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(err) == 1, r.stderr[-2000:]
  assert "non-finite loss" in err[0] and "at step 25" in err[0]
  assert os.path.join(w, "checkpoints", "20") in err[0]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(w, "train_summary.json"))
  c = ckpt_lib.Checkpointer(os.path.join(w, "checkpoints"))
  assert c.latest_step() == 20  # nothing saved after the NaN
  restored = c._manager.restore(20)  # noqa: SLF001 (raw read: every leaf must be finite)
  leaves = jax.tree.leaves(restored["state"])
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  assert restored["meta"]["step"] == 20
  c.close()
