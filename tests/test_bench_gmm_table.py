"""`python -m experiments.bench_gmm --compile_table`: one JSON line with compile seconds per
(K'', D); bad table flags are one `error:` line."""

import json

import pytest

from tests.helpers import error_line, run_module

pytestmark = pytest.mark.slow  # the benchmark's entry point in a subprocess


def _run(*args):
  return run_module("experiments.bench_gmm", "--compile_table", *args, devices=None, timeout=300)


def test_compile_table_prints_one_json_line():
  r = _run("--table_components=1", "--table_dims=2")
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 1, r.stdout
  out = json.loads(lines[0])
  assert out["mode"] == "compile_table" and out["covariance"] == "diag"
  assert out["objectives"] == "direct,seqkd,fkl,rkl,jsd"
  assert out["configs"] == 6  # the smoke flagfile's 3 betas x 2 seeds
  assert out["compile_seconds"]["K''=1"]["D=2"] > 0
  assert [(r["student_components"], r["dim"]) for r in out["rows"]] == [(1, 2)]


@pytest.mark.parametrize("args,named", [(["--covariance=bogus"], "--covariance"),
                                        (["--table_dims=0"], "--table_dims"),
                                        (["--table_components=1.5"], "--table_components")])
def test_bad_table_flags_are_one_error_line(args, named):
  r = _run(*args)
  assert named in error_line(r), r.stderr[-3000:]
