"""Multi-process JAX on localhost (launch/local.sh + kdjax.distributed), the cluster launchers' dry
runs, and shellcheck on launch/. The multi-process tests start real processes talking over gloo."""

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from kdjax.llm.weights import loading
from kdjax import distributed
from kdjax.cli import UserError, read_json
from tests.conftest import XLA_TEST_FLAGS
from tests.helpers import REPO, run

LAUNCH = os.path.join(REPO, "launch")


def _run(args, timeout=120, devices=8, **env):
  """args run in the repository; 8 fake devices by default, as in the tests: local.sh must
  override them."""
  return run(args, devices=devices, timeout=timeout, env=env)


# ----------------------------------------------------------------------------- plan (no processes)


def test_plan_single_process_is_none():
  assert distributed.plan({}).cluster == "none"
  # One SLURM task is one process too.
  slurm1 = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n1", SLURM_NTASKS="1", SLURM_PROCID="0",
                SLURM_LOCALID="0")
  assert distributed.plan(slurm1).cluster == "none"


def test_plan_env():
  p = distributed.plan(dict(KDJAX_COORDINATOR="10.0.0.1:1234", KDJAX_NUM_PROCESSES="4",
                            KDJAX_PROCESS_ID="3", KDJAX_LOCAL_DEVICE_COUNT="2"))
  assert p.cluster == "env" and p.local_device_count == 2
  assert p.kwargs["coordinator_address"] == "10.0.0.1:1234"
  assert (p.kwargs["num_processes"], p.kwargs["process_id"]) == (4, 3)


def test_plan_slurm_and_tpu():
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="16", SLURM_PROCID="9",
               SLURM_LOCALID="1", KDJAX_COORDINATOR="n1:20007")
  p = distributed.plan(dict(slurm, KDJAX_CLUSTER="slurm"))
  assert p.cluster == "slurm"
  assert (p.kwargs["num_processes"], p.kwargs["process_id"]) == (16, 9)
  assert p.kwargs["coordinator_address"] == "n1:20007"
  assert p.kwargs["local_device_ids"] == []  # every device the task sees, not GPU #SLURM_LOCALID
  del slurm["KDJAX_COORDINATOR"]
  p = distributed.plan(slurm)  # auto-detected; jax derives the coordinator itself
  assert p.cluster == "slurm" and "coordinator_address" not in p.kwargs
  assert distributed.plan(dict(TPU_WORKER_HOSTNAMES="w0,w1,w2,w3")).cluster == "tpu"
  assert distributed.plan(dict(KDJAX_CLUSTER="tpu")).cluster == "tpu"
  assert distributed.plan(dict(TPU_WORKER_HOSTNAMES="w0")).cluster == "none"


@pytest.mark.parametrize("env, message", [
    (dict(KDJAX_CLUSTER="mpi"), "KDJAX_CLUSTER"),
    (dict(KDJAX_COORDINATOR="nohostport", KDJAX_NUM_PROCESSES="2", KDJAX_PROCESS_ID="0"),
     "KDJAX_COORDINATOR"),
    (dict(KDJAX_COORDINATOR="h:1", KDJAX_PROCESS_ID="0"), "KDJAX_NUM_PROCESSES"),
    (dict(KDJAX_COORDINATOR="h:1", KDJAX_NUM_PROCESSES="2", KDJAX_PROCESS_ID="2"),
     "KDJAX_PROCESS_ID"),
    (dict(KDJAX_COORDINATOR="h:1", KDJAX_NUM_PROCESSES="2", KDJAX_PROCESS_ID="0",
          KDJAX_LOCAL_DEVICE_COUNT="two"), "KDJAX_LOCAL_DEVICE_COUNT"),
])
def test_plan_errors_name_the_variable(env, message):
  with pytest.raises(UserError, match=message):
    distributed.plan(env)


def test_initialize_single_process_is_idempotent():
  info = distributed.initialize({})
  assert (info.cluster, info.process_index, info.process_count) == ("none", 0, 1)
  assert distributed.initialize({}) is info
  assert distributed.is_primary()
  distributed.sync("noop")  # one process: returns at once


# ----------------------------------------------------------------------------- local.sh

_PROGRAM = textwrap.dedent("""
  import os, sys
  import numpy as np
  import jax, jax.numpy as jnp
  from absl import logging
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  from kdjax import distributed

  logging.set_verbosity("info")
  info = distributed.initialize()
  if sys.argv[1] == "fail" and info.process_index == 1:
    # A crash (os._exit: no atexit, so no wait at jax's shutdown barrier). Process 0 is then stuck
    # in the collective below until gloo times out (30 s): local.sh must stop it at once.
    os._exit(3)
  n, d = jax.process_count(), jax.local_device_count()
  mesh = jax.make_mesh((n * d,), ("x",))
  # Each process contributes its own rows: 10 * process + local row, times [1, 2, 3].
  local_x = (10 * jax.process_index() + np.arange(d, dtype=np.float32))[:, None] * np.arange(1, 4)
  x = multihost_utils.host_local_array_to_global_array(local_x.astype(np.float32), mesh, P("x"))
  total = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))(x)
  gathered = multihost_utils.process_allgather(x, tiled=True)
  expect_rows = np.concatenate([(10 * p + np.arange(d))[:, None] * np.arange(1, 4) for p in range(n)])
  np.testing.assert_allclose(gathered, expect_rows)
  np.testing.assert_allclose(np.asarray(total), expect_rows.sum(0))
  distributed.sync("done")
  print(f"OK process={jax.process_index()} devices={jax.device_count()} total={np.asarray(total).tolist()}")
""")


@pytest.fixture
def program(tmp_path):
  path = tmp_path / "prog.py"
  path.write_text(_PROGRAM)
  return str(path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_two_processes_psum_and_allgather(program):
  r = _run(["bash", f"{LAUNCH}/local.sh", "2", sys.executable, program, "ok"])
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  out = r.stdout
  # Rows 0,1 (process 0) and 10,11 (process 1): column sums 22 * [1, 2, 3].
  for i in range(2):
    assert f"[p{i}] OK process={i} devices=4 total=[22.0, 44.0, 66.0]" in out, out[-3000:]
    assert f"[p{i}] INFO:absl:process_index={i} process_count=2" in r.stderr  # logging: stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_one_failure_stops_the_others(program):
  start = time.monotonic()
  r = _run(["bash", f"{LAUNCH}/local.sh", "2", sys.executable, program, "fail"], timeout=60)
  elapsed = time.monotonic() - start
  assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
  assert "process 1 exited with status 3" in r.stderr
  assert "OK process" not in r.stdout
  assert elapsed < 25  # process 0 would otherwise wait 30 s in gloo for the missing peer


def test_local_failure_of_a_plain_command_and_success():
  script = 'echo up; if [ "$KDJAX_PROCESS_ID" = 2 ]; then exit 5; fi; sleep 60; echo never'
  start = time.monotonic()
  r = _run(["bash", f"{LAUNCH}/local.sh", "3", "bash", "-c", script], timeout=30)
  assert r.returncode == 5 and time.monotonic() - start < 20
  assert all(f"[p{i}] up" in r.stdout for i in range(3)) and "never" not in r.stdout
  r = _run(["bash", f"{LAUNCH}/local.sh", "3", "bash", "-c",
            'echo "$KDJAX_PROCESS_ID/$KDJAX_NUM_PROCESSES $KDJAX_LOCAL_DEVICE_COUNT $XLA_FLAGS"'],
           KDJAX_LOCAL_DEVICE_COUNT="3")
  assert r.returncode == 0, r.stderr
  for i in range(3):
    line = f"[p{i}] {i}/3 3  {XLA_TEST_FLAGS} --xla_force_host_platform_device_count=3\n"
    assert line in r.stdout, r.stdout


@pytest.mark.parametrize("args", [["0", "true"], ["x", "true"], ["65", "true"], ["2"]])
def test_local_validates_arguments(args):
  r = _run(["bash", f"{LAUNCH}/local.sh", *args])
  assert r.returncode == 2 and r.stderr.startswith("error: ")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_multihost_smoke_matches_one_process(tmp_path):
  """2 processes x 2 devices end where 1 process x 4 devices ends: same 4-device mesh, same data."""
  import numpy as np
  import jax
  from kdjax import checkpoint

  flagfile = "--flagfile=experiments/flags/multihost_smoke.flags"
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  r = _run(["bash", f"{LAUNCH}/local.sh", "2", sys.executable, "-m", "experiments.train_lm",
            flagfile, f"--workdir={multi}"], timeout=300)
  assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
  for i in range(2):
    assert f"process_index={i} process_count=2" in r.stderr  # absl logging goes to stderr
  assert [l.startswith("[p0] {") for l in r.stdout.splitlines()].count(True) == 1  # summary: p0 only
  assert not any(l.startswith("[p1] {") for l in r.stdout.splitlines())
  r = _run([sys.executable, "-m", "experiments.train_lm", flagfile, f"--workdir={single}"],
           timeout=300, devices=4)
  assert r.returncode == 0, r.stderr[-4000:]

  summaries = [read_json(os.path.join(d, "train_summary.json")) for d in (multi, single)]
  assert [s["process_count"] for s in summaries] == [2, 1]
  for s in summaries:
    assert s["steps"] == 6 and s["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3", "6"]
  np.testing.assert_allclose(summaries[0]["final_loss"], summaries[1]["final_loss"], rtol=1e-5)
  (_, p_multi), (_, p_single) = (loading.load_model_checkpoint(os.path.join(d, "best"))
                                 for d in (multi, single))
  leaves_multi, leaves_single = jax.tree.leaves(p_multi), jax.tree.leaves(p_single)
  assert len(leaves_multi) == len(leaves_single) > 0
  for a, b in zip(leaves_multi, leaves_single):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- cluster dry runs


def test_tpu_pod_dry_run_prints_the_commands(tmp_path):
  args = ["bash", f"{LAUNCH}/tpu_pod.sh", "--tpu=kd-v4-32", "--zone=us-central2-b", "--dry_run",
          "python", "-m", "experiments.train_lm", "--mesh=data=16", "--note=it's mine"]
  r = _run(args, PYTHON=sys.executable, PATH="/usr/bin:/bin")
  assert r.returncode == 0, r.stderr
  import jax
  lines = r.stdout.splitlines()
  assert lines == [
      f"git -C {REPO} archive --format=tar.gz -o /tmp/kdjax-kd-v4-32.tar.gz HEAD",
      "gcloud compute tpus tpu-vm scp /tmp/kdjax-kd-v4-32.tar.gz kd-v4-32:kdjax.tar.gz "
      "--zone us-central2-b --worker=all",
      "gcloud compute tpus tpu-vm ssh kd-v4-32 --zone us-central2-b --worker=all --command "
      "'rm -rf kdjax && mkdir -p kdjax && tar -xzf kdjax.tar.gz -C kdjax && python3 -m pip "
      f"install -q -e ./kdjax '\\''jax[tpu]=={jax.__version__}'\\'''",
      "gcloud compute tpus tpu-vm ssh kd-v4-32 --zone us-central2-b --worker=all --command "
      "'cd kdjax && KDJAX_CLUSTER=tpu python -m experiments.train_lm --mesh=data=16 "
      "'\\''--note=it'\\''\\'\\'''\\''s mine'\\'''",
  ]
  # The printed line is runnable: a stub gcloud runs --command on "the worker" (a folder here),
  # whose stub python echoes its arguments, so the quoting survives both shells intact.
  stubs = tmp_path / "bin"
  stubs.mkdir()
  (stubs / "gcloud").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      while [[ $# -gt 0 ]]; do [[ "$1" == --command ]] && cmd="$2"; shift; done
      cd "$WORKER_HOME" && bash -c "$cmd"
      """))
  (stubs / "python").write_text('#!/usr/bin/env bash\necho "$KDJAX_CLUSTER"; printf "<%s>\\n" "$@"\n')
  for f in stubs.iterdir():
    f.chmod(0o755)
  (tmp_path / "home" / "kdjax").mkdir(parents=True)
  r = _run(["bash", "-c", lines[-1]], PATH=f"{stubs}:/usr/bin:/bin", WORKER_HOME=str(tmp_path / "home"))
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == ["tpu", "<-m>", "<experiments.train_lm>", "<--mesh=data=16>",
                                   "<--note=it's mine>"]
  r = _run(["bash", f"{LAUNCH}/tpu_pod.sh", "--zone=z", "true"], TPU_NAME="")
  assert r.returncode == 2 and "--tpu" in r.stderr


def test_slurm_dry_run_prints_the_srun_line():
  fake = dict(DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[007-008,010]",
              SLURM_JOB_NUM_NODES="3", PATH="/usr/bin:/bin")
  cmd = ["bash", f"{LAUNCH}/slurm.sbatch", "python", "-m", "experiments.train_lm", "--x=a b"]
  r = _run(cmd, **fake)
  assert r.returncode == 0, r.stderr
  assert r.stdout == (
      "env KDJAX_CLUSTER=slurm KDJAX_COORDINATOR=gpu007:24242 srun --nodes=3 --ntasks=3 "
      "--ntasks-per-node=1 --kill-on-bad-exit=1 --label python -m experiments.train_lm "
      "'--x=a b'\n")
  r = _run(cmd[:2] + ["true"], KDJAX_SLURM_LAYOUT="gpu", SLURM_GPUS_ON_NODE="4",
           KDJAX_COORDINATOR_PORT="3000", **fake)
  assert r.stdout == (
      "env KDJAX_CLUSTER=slurm KDJAX_COORDINATOR=gpu007:3000 srun --nodes=3 --ntasks=12 "
      "--ntasks-per-node=4 --gpus-per-task=1 --kill-on-bad-exit=1 --label true\n"), r.stderr
  r = _run(cmd[:2] + ["true"], PATH="/usr/bin:/bin", SLURM_JOB_ID="")
  assert r.returncode == 2 and "SLURM_JOB_ID" in r.stderr


def test_shellcheck_launch_scripts():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck); CI installs it")
  scripts = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH)
                   if f.endswith((".sh", ".sbatch")))
  assert len(scripts) == 3
  r = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout
