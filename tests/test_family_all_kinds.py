"""experiments/flags/llm_family_all_kinds.flags: every student kind of the family trains, samples
and scores end to end through the entry point (issue 20: every kind in a flagfile that runs)."""

import json
import os

import numpy as np
import pytest

from kdjax.llm.study import kinds
from tests.helpers import run_module


@pytest.mark.slow
def test_every_kind_runs_from_its_flagfile(tmp_path):
  proc = run_module("experiments.llm", "--flagfile=experiments/flags/llm_family_all_kinds.flags",
                    f"--workdir={tmp_path}", devices=1, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    rows = json.load(f)["rows"]
  listed = [line for line in open("experiments/flags/llm_family_all_kinds.flags")
            if line.startswith("--students=")][0].strip().split("=", 1)[1].split(",")
  # every kind of the table is listed (GKD's lambda by one value of it), and every one has its row
  assert {kinds.get(k).name.split("@")[0] for k in listed} >= {k for k in kinds.KINDS}
  assert sorted(r["objective"] for r in rows) == sorted(listed)
  for r in rows:
    assert np.isfinite([r["precision"], r["recall"], r["val_perplexity"]]).all(), r
    assert r["train_sequences"] == 16 and r["steps"] == 2, r  # matched budgets
  assert os.path.exists(tmp_path / "comparisons.csv")
