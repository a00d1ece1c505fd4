"""The study with every stage on every process: `launch/local.sh 2` (2 processes x 2 fake CPU
devices) on experiments/flags/study_multihost_smoke.flags writes the same results.json as one
process with 4 devices: identical samples in every dataset, scores within 1e-5 (training sums its
gradients over processes in another order, so parameters agree to rounding, not bit for bit)."""

import glob
import json
import math
import os
import sys

import pytest

from tests.helpers import module_argv, run

# The flagfile's students less `direct`: it trains and is scored as seqkd is (the NLL head on a
# sampled dataset, p*'s instead of the teacher's), while seqkd and fkl (the KD head on the teacher's
# logits) are each their own path across processes; ~2.5 CPU seconds a process saved.
FLAGS = ("--flagfile=experiments/flags/study_multihost_smoke.flags", "--students=seqkd,fkl")


def _datasets(workdir):
  from kdjax.llm import data
  out = {}
  for done in glob.glob(os.path.join(workdir, "**", "DONE.json"), recursive=True):
    d = os.path.dirname(done)
    if data.shard_dirs(d):
      out[os.path.relpath(d, workdir)] = data.load_dataset_dir(d)["input_ids"]
  return out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_write_what_one_process_writes(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  p1 = run(module_argv("experiments.llm", *FLAGS, f"--workdir={one}"), devices=4, timeout=900)
  assert p1.returncode == 0, p1.stderr[-4000:]
  p2 = run(["bash", "launch/local.sh", "2", *module_argv("experiments.llm", *FLAGS,
                                                           f"--workdir={two}")],
           devices=None, timeout=900, env=dict(PYTHON=sys.executable))
  assert p2.returncode == 0, p2.stderr[-4000:]
  assert "process_index=1 process_count=2" in p2.stderr  # really two processes

  a, b = _datasets(one), _datasets(two)
  assert sorted(a) == sorted(b) and "pstar/train" in a and "seed_0/teacher_T0.8/train" in a
  assert any(k.startswith("seed_0/student_samples/") for k in a)
  for name in a:
    assert a[name] == b[name], name  # every sample, token for token

  ra, rb = (json.load(open(os.path.join(w, "results.json"))) for w in (one, two))
  assert ra["config"] == rb["config"] and len(ra["rows"]) == len(rb["rows"]) == 2
  assert sorted(x["objective"] for x in ra["rows"]) == ["fkl", "seqkd"]  # both training heads
  for x, y in zip(ra["rows"], rb["rows"]):
    assert (x["objective"], x["temperature"], x["seed"]) == (y["objective"], y["temperature"],
                                                             y["seed"])
    for k in ("precision", "recall"):
      assert abs(x[k] - y[k]) <= 1e-5, (x, y)
    assert abs(math.log(x["val_perplexity"]) - math.log(y["val_perplexity"])) <= 1e-5
  # the results are written once (process 0), not raced by both
  assert not glob.glob(os.path.join(two, "**", ".tmp-*"), recursive=True)
