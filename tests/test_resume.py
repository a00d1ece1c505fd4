"""Issue 6: a NaN loss stops with a message naming the step and keeps the last good checkpoint.

SIGKILL after a checkpoint + the same command again == an uninterrupted run (params, optimizer
state, step, RNG and data position restored): tests/test_experiments_llm.py's
test_kill_during_sampling_and_training_then_resume (the study's teacher, trained from a dataset by
the same kdjax.llm.train.loop, killed after a checkpoint: the same params_checksum) and
tests/test_llm_train_family.py's on-policy students."""

import os

import jax
import numpy as np
import pytest

from kdjax import checkpoint as ckpt_lib
from tests.helpers import REPO, error_line, module_argv, run

FLAGFILE = os.path.join(REPO, "experiments", "flags", "resume_smoke.flags")

pytestmark = pytest.mark.slow  # train_lm on a flagfile in a subprocess


def _cmd(workdir, *extra):
  return module_argv("experiments.train_lm", f"--flagfile={FLAGFILE}", f"--workdir={workdir}",
                     "--progress=false", *extra)


def _run(workdir, *extra):
  return run(_cmd(workdir, *extra))


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
