"""`python -m experiments.bench_train --kd_temperatures=N` (the README's line, at tiny size): one
JSON line, N students together against N one-by-one runs of the same steps."""

import json

import pytest

from tests.helpers import run_module


@pytest.mark.slow
def test_kd_temperatures_prints_one_json_line():
  proc = run_module("experiments.bench_train", "--preset=test-tiny", "--teacher=test-tiny",
                    "--kd_temperatures=2", "--batch=4", "--seq=9", "--steps=1", "--rounds=1",
                    "--warmup=1", devices=None)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert out["mode"] == "kd_temperatures" and out["num_temperatures"] == 2
  assert out["one_by_one_step_ms"] == pytest.approx(2 * out["one_student_step_ms"], abs=0.02)
  assert out["speedup"] == pytest.approx(out["one_by_one_step_ms"] / out["vmapped_step_ms"],
                                         rel=0.02)
