"""Start JAX's multi-controller runtime (jax.distributed) from the environment, once per process.

Every kdjax entry point calls `initialize()` before any other JAX work. The environment says how
this process finds the others (the launchers in launch/ set these variables):

  KDJAX_CLUSTER       auto (default) | env | slurm | tpu | none: which case below; auto picks "env"
                      if KDJAX_COORDINATOR is set, else "slurm" inside a SLURM job step of several
                      tasks, else "tpu" when GKE's TPU_WORKER_HOSTNAMES lists several hosts, else
                      "none" (one process: nothing to initialise).
  KDJAX_COORDINATOR   host:port of process 0's coordinator service ("env"; optional for "slurm",
                      where jax otherwise derives it from SLURM_STEP_NODELIST and the job id).
  KDJAX_NUM_PROCESSES, KDJAX_PROCESS_ID    process count and this process's index ("env").
  KDJAX_LOCAL_DEVICE_COUNT   fake CPU devices for this process ("env"; forces the CPU platform,
                      whose cross-process collectives then go through gloo). launch/local.sh.
  KDJAX_LOCAL_DEVICE_IDS     "0,1": the accelerators this process drives ("slurm"; default: all it
                      can see, i.e. whatever SLURM bound to the task).
  KDJAX_INIT_TIMEOUT  seconds to wait for every process to join (default 300).

"slurm" takes the process count and index from SLURM_NTASKS / SLURM_PROCID (launch/slurm.sbatch);
"tpu" calls jax.distributed.initialize() bare, which asks the TPU VM metadata server
(launch/tpu_pod.sh sets KDJAX_CLUSTER=tpu). Whatever the case, every process logs
`process_index=I process_count=N` and its devices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kdjax.cli import UserError

CLUSTERS = ("auto", "env", "slurm", "tpu", "none")
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do: the detected case and the jax.distributed.initialize kwargs."""
  cluster: str  # "env" | "slurm" | "tpu" | "none"
  kwargs: dict
  local_device_count: int | None = None  # fake CPU devices per process ("env" case only)


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  cluster: str
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int


_info: ProcessInfo | None = None


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int:
  text = env.get(name)
  if text is None or not text.strip():
    raise UserError(f"{name} is not set")
  try:
    value = int(text)
  except ValueError:
    raise UserError(f"{name}={text!r}: expected an integer") from None
  if value < minimum:
    raise UserError(f"{name}={value}: expected an integer >= {minimum}")
  return value


def _coordinator(env: Mapping[str, str]) -> str:
  coordinator = env.get("KDJAX_COORDINATOR", "")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f"KDJAX_COORDINATOR={coordinator!r}: expected host:port")
  return coordinator


def _device_ids(env: Mapping[str, str]) -> list[int] | None:
  ids = env.get("KDJAX_LOCAL_DEVICE_IDS", "").strip()
  try:
    return [int(t) for t in ids.split(",")] if ids else None
  except ValueError:
    raise UserError(f"KDJAX_LOCAL_DEVICE_IDS={ids!r}: expected comma-separated integers") from None


def plan(env: Mapping[str, str] | None = None) -> Plan:
  """Decide, from the environment alone (no JAX calls), how this process joins the others."""
  env = os.environ if env is None else env
  cluster = env.get("KDJAX_CLUSTER", "auto").strip() or "auto"
  if cluster not in CLUSTERS:
    raise UserError(f"KDJAX_CLUSTER={cluster!r}: expected one of {', '.join(CLUSTERS)}")
  timeout = 300
  if env.get("KDJAX_INIT_TIMEOUT"):
    timeout = _int_env(env, "KDJAX_INIT_TIMEOUT", 1)

  if cluster == "auto":
    if env.get("KDJAX_COORDINATOR"):
      cluster = "env"
    elif all(v in env for v in _SLURM_STEP_VARS) and env["SLURM_NTASKS"].strip() not in ("", "1"):
      cluster = "slurm"
    elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
      cluster = "tpu"
    else:
      cluster = "none"

  if cluster == "none":
    return Plan("none", {})
  if cluster == "tpu":
    # jax's own detection: the TPU VM metadata server (or GKE's TPU_* variables).
    return Plan("tpu", {"initialization_timeout": timeout})
  if cluster == "slurm":
    kwargs = dict(num_processes=_int_env(env, "SLURM_NTASKS", 1),
                  process_id=_int_env(env, "SLURM_PROCID", 0), initialization_timeout=timeout)
    if kwargs["process_id"] >= kwargs["num_processes"]:
      raise UserError(f"SLURM_PROCID={kwargs['process_id']}: must be < SLURM_NTASKS")
    if env.get("KDJAX_COORDINATOR"):
      kwargs["coordinator_address"] = _coordinator(env)
    # jax would otherwise pin each process to the one device numbered SLURM_LOCALID, wrong both for
    # one process per node (it would drive GPU 0 only) and under SLURM's per-task GPU binding
    # (the task's one visible GPU is number 0). An empty list means: every device this task sees.
    kwargs["local_device_ids"] = _device_ids(env) or []
    return Plan("slurm", kwargs)

  coordinator = _coordinator(env)
  num_processes = _int_env(env, "KDJAX_NUM_PROCESSES", 1)
  process_id = _int_env(env, "KDJAX_PROCESS_ID", 0)
  if process_id >= num_processes:
    raise UserError(f"KDJAX_PROCESS_ID={process_id}: must be < KDJAX_NUM_PROCESSES={num_processes}")
  local_devices = None
  if env.get("KDJAX_LOCAL_DEVICE_COUNT"):
    local_devices = _int_env(env, "KDJAX_LOCAL_DEVICE_COUNT", 1)
  kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                process_id=process_id, initialization_timeout=timeout)
  if _device_ids(env):
    kwargs["local_device_ids"] = _device_ids(env)
  if local_devices is not None:
    # Fake CPU devices: no accelerator to enumerate, so no cluster auto-detection either.
    kwargs["cluster_detection_method"] = "deactivate"
  return Plan("env", kwargs, local_devices)


def initialize(env: Mapping[str, str] | None = None) -> ProcessInfo:
  """Join the other processes (if any) and log this process's place among them. Idempotent.

  Must run before anything touches a JAX backend (jax.devices(), an array, a jit call): JAX fixes
  its process count when the backend starts.
  """
  global _info
  if _info is not None:
    return _info
  from jax._src import xla_bridge

  p = plan(env)
  if p.cluster != "none" and not jax.distributed.is_initialized():
    if xla_bridge.backends_are_initialized():
      raise UserError("kdjax.distributed.initialize() must run before any JAX computation "
                      f"(cluster={p.cluster}), but a JAX backend is already started")
    if p.local_device_count is not None:
      jax.config.update("jax_platforms", "cpu")
      jax.config.update("jax_num_cpu_devices", p.local_device_count)
    # Cross-process collectives on CPU go through gloo (TCP), bootstrapped by the coordinator.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("kdjax.distributed: cluster=%s jax.distributed.initialize(%s)", p.cluster,
                 ", ".join(f"{k}={v!r}" for k, v in p.kwargs.items()))
    jax.distributed.initialize(**p.kwargs)

  _info = ProcessInfo(
      cluster=p.cluster if jax.distributed.is_initialized() or p.cluster == "none" else "none",
      process_index=jax.process_index(), process_count=jax.process_count(),
      local_device_count=jax.local_device_count(), device_count=jax.device_count())
  # Shown even where an entry point quiets INFO (orbax's chatter): one line per process matters.
  level = logging.INFO if logging.level_info() else logging.WARNING
  logging.log(level, "process_index=%d process_count=%d cluster=%s local_devices=%s (%d of %d devices)",
              _info.process_index, _info.process_count, _info.cluster,
              [str(d) for d in jax.local_devices()], _info.local_device_count, _info.device_count)
  return _info


def is_primary() -> bool:
  """True on process 0, the one that writes results, plots, summaries and TensorBoard."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier: every process waits here until all arrive (a no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def sum_over_processes(values) -> "np.ndarray":
  """The elementwise sum over processes of a host vector (float64; the vector itself for one
  process). Each float64 travels as two float32 (high part and remainder), since JAX without x64
  would round it to float32: partial totals of log-likelihoods add up to the last digits."""
  x = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return x
  hi = x.astype(np.float32)
  lo = (x - hi.astype(np.float64)).astype(np.float32)
  both = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)
  return both.sum(axis=(0, 1))

