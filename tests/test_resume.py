"""Issue 6: SIGKILL after the first checkpoint + the same command again == an uninterrupted run;
a NaN loss stops with a message naming the step and keeps the last good checkpoint."""

import json
import math
import os
import signal
import time

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from tests.helpers import REPO, error_line, module_argv, run, start

FLAGFILE = os.path.join(REPO, "experiments", "flags", "resume_smoke.flags")

pytestmark = pytest.mark.slow  # train_lm on a flagfile in a subprocess


def _cmd(workdir, *extra):
  return module_argv("experiments.train_lm", f"--flagfile={FLAGFILE}", f"--workdir={workdir}",
                     "--progress=false", *extra)


def _run(workdir, *extra):
  return run(_cmd(workdir, *extra))


def _summary(workdir):
  with open(os.path.join(workdir, "train_summary.json")) as f:
    return json.load(f)


def test_sigkill_then_rerun_gives_identical_params(tmp_path):
  a, b = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
  r = _run(a)
  assert r.returncode == 0, r.stderr[-2000:]
  ref = _summary(a)
  assert ref["steps"] == 40 and math.isfinite(ref["final_loss"])

  proc = start(_cmd(b))
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
  err = error_line(r)
  assert "non-finite loss" in err and "at step 25" in err
  assert os.path.join(w, "checkpoints", "20") in err
  assert not os.path.exists(os.path.join(w, "train_summary.json"))
  c = ckpt_lib.Checkpointer(os.path.join(w, "checkpoints"))
  assert c.latest_step() == 20  # nothing saved after the NaN
  restored = c._manager.restore(20)  # noqa: SLF001 (raw read: every leaf must be finite)
  leaves = jax.tree.leaves(restored["state"])
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  assert restored["meta"]["step"] == 20
  c.close()
