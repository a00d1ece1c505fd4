"""`python -m experiments.bench_gmm --compile_table`: one JSON line with compile seconds per
(K'', D); bad table flags are one `error:` line."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "experiments.bench_gmm", "--compile_table", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


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
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and named in errors[0], r.stderr[-3000:]
