"""The study's programs compiled for named hardware: memory per device and, from the TPU compiler,
the time of each stage priced from the programs themselves.

Each stage's programs (kdjax.llm.train.footprint: the train steps, the sampler, the scorer, from
abstract arrays, nothing allocated) are compiled for the mesh the pipeline gives them:

  TPU chips (v5e, v5p, v6e) with libtpu installed (setup.py's `tpu` extra): by the TPU compiler,
      on this machine, for a topology of the slice (kdjax.compiled.tpu_devices: e.g. v5p:2x4x4 for
      the 32 chips of a v5p-64); jax.devices() stays the CPU.
  otherwise (GPUs; TPUs without libtpu): by XLA:CPU on as many fake CPU devices, which partitions
      the same program but fuses and lays out memory its own way.

Every figure says which compiler gave it. With the TPU compiler each program's FLOPs per chip and
call (kdjax.compiled.cost: XLA's cost analysis of the TPU executable, loop bodies weighted by their
trip counts) and its HBM bytes (kdjax.hbm.traffic: the scheduled program's instructions, in-place
updates and partial reads counted by what they touch, on-chip memory not at all; XLA's own "bytes
accessed" counts every operand whole, 2-3x more on these programs), the sampler for the tokens a
call draws (all --max_new_tokens, or what a workdir's finished samples show,
kdjax/llm/study/observed.py), give its time by roofline:

  seconds per call = max(FLOPs / (peak x MFU), bytes / (HBM bandwidth x MBU))

and a stage's time is its calls' (sampling batches, train steps, scoring batches, dealt to the
processes as kdjax/llm/study/hardware.py describes). The teacher's validation passes stay priced
from their FLOPs (they run on the training mesh, not compiled here).
"""

from __future__ import annotations

import math
import time

import jax

from kdjax import compiled
from kdjax.cli import require
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.study.layout import Layout
from kdjax.llm.train import footprint
from kdjax.sharding import make_mesh

XLA_CPU = "XLA:CPU on fake devices"


def per_chip(batch: int, local: int) -> tuple[int, int]:
  """(rows per chip, chips used): pipeline.data_parallel splits a batch the chips divide."""
  return (batch // local, local) if batch % local == 0 else (batch, 1)


def sampling_calls(cfg, num: int, processes: int, local: int) -> int:
  """Sampler calls the busiest process makes for a dataset of `num` sequences, as
  kdjax.llm.study.work.sample_dataset deals them: shard i (--shard_size rows) to process i % P, each
  shard cut in chunks of R = --sample_batch_size rows, a call drawing one chunk on each of the
  process's `local` chips (a spare chip redraws a chunk: the call costs the same)."""
  shards = math.ceil(num / cfg.shard_size)
  chunks = [0] * min(processes, shards)
  for i in range(shards):
    chunks[i % processes] += math.ceil(min(cfg.shard_size, num - i * cfg.shard_size)
                                       / cfg.sample_batch_size)
  return max(math.ceil(n / local) for n in chunks)


def tpu_target(chip) -> bool:
  """Whether the TPU compiler compiles this chip's programs here (a TPU chip, libtpu installed)."""
  return bool(getattr(chip, "tpu", "")) and compiled.tpu_compiler() is not None


def mesh_for(chip, data: int, fsdp: int, tensor: int):
  """(mesh, compiler): TPU devices of a topology for TPU chips with libtpu, else fake CPU ones
  (chip None: fake CPU devices)."""
  n = data * fsdp * tensor
  if tpu_target(chip):
    topology, devices = compiled.tpu_devices(chip.tpu, n)
    return (make_mesh(data, fsdp, tensor, devices=devices),
            f"TPU compiler (libtpu {compiled.tpu_compiler()}) for {topology}")
  devices = jax.devices("cpu")
  require(len(devices) >= n, f"--hardware: the memory analysis compiles for {n} devices but JAX "
          f"has {len(devices)} CPU devices; set XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{n} or pass --nomemory_analysis")
  return make_mesh(data, fsdp, tensor, devices=devices[:n]), XLA_CPU


def ensure_cpu_devices(n: int) -> None:
  """Ask for n fake CPU devices; a no-op once a JAX backend has started (mesh_for then checks)."""
  try:
    jax.config.update("jax_num_cpu_devices", max(n, 1))
  except RuntimeError:
    pass


def sampler_memory(c: LlamaConfig, batch: int, prompt_len: int, max_new_tokens: int,
                   chips: int, chip=None, steps=None) -> dict:
  """footprint.sampler on `chips` devices (params replicated, the batch split) + its compiler;
  its cost for `steps` tokens drawn (default max_new_tokens)."""
  mesh, how = mesh_for(chip, chips, 1, 1)
  return {**footprint.sampler(c, mesh, batch, prompt_len, max_new_tokens, steps),
          "compiled_by": how}


def scorer_memory(c: LlamaConfig, batch: int, seq_len: int, chips: int, chip=None) -> dict:
  """footprint.scorer on `chips` devices + its compiler."""
  mesh, how = mesh_for(chip, chips, 1, 1)
  return {**footprint.scorer(c, mesh, batch, seq_len), "compiled_by": how}


def train_memory(c: LlamaConfig, mesh_shape, batch: int, seq_len: int, chip=None, **kw) -> dict:
  """footprint.train_step on the training mesh (kw: num_students, teacher, shared_batch)."""
  mesh, how = mesh_for(chip, *mesh_shape)
  return {**footprint.train_step(c, mesh, batch, seq_len, **kw), "compiled_by": how}


def compile_stages(cfg, plan: dict, models: dict, mesh_shape, local: int, student_programs,
                   chip, progress, steps=None) -> dict:
  """{stage: [(program, mesh text, report)]}: every program compiled (report: footprint's, with
  `compiled_by`; steps: {model name: tokens a sampling call draws}, default max_new_tokens)."""
  seq_len, prompt_len = plan["seq_len"], plan["seq_len"] - cfg.max_new_tokens
  rows = cfg.sample_batch_size  # per chip: each chip draws its own chunk (no collective)
  eb, eval_chips = cfg.eval_batch_size, per_chip(cfg.eval_batch_size, local)[1]
  mesh_text = "data={},fsdp={},tensor={}".format(*mesh_shape)

  def sampler(name):
    c = models[name]
    label = f"sampler {name}, {rows} rows/chip (one chunk per chip, {local} chips)"
    return (label, "1 chip",
            lambda: sampler_memory(c, rows, prompt_len, cfg.max_new_tokens, 1, chip,
                                   (steps or {}).get(name)))

  def scorer(name):
    label = f"scorer {name}, batch {eb} x {seq_len} ({eb // eval_chips}/chip)"
    return label, f"data={eval_chips}", lambda: scorer_memory(models[name], eb, seq_len,
                                                              eval_chips, chip)

  def train(name, label, **kw):
    return [(f"{label}, remat {r}", mesh_text,
             lambda r=r: train_memory(models[name].replace(remat=r), mesh_shape, cfg.batch_size,
                                      seq_len, chip, **kw)) for r in ("none", "layer")]

  todo = {"1_sample_ground_truth": [sampler("ground_truth")],
          "2_train_teacher": train("teacher", f"train step teacher, batch {cfg.batch_size}"),
          "3_sample_teacher": [sampler("teacher")],
          "4_train_students": [p for label, kw in student_programs
                               for p in train("student", f"train step {label}", **kw)],
          "5_score_students": [sampler("student"), scorer("ground_truth"), scorer("student")]}
  out = {}
  for stage, programs in todo.items():
    out[stage] = []
    for label, mesh, fn in programs:
      started = time.perf_counter()
      try:
        report = fn()
      except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what HBM cannot hold
        require("RESOURCE_EXHAUSTED" not in str(e), f"--hardware: {stage}: {label} does not fit "
                f"{chip.name}: {' '.join(str(e).split())[:300]}")
        raise
      progress(f"compiled {stage}: {label} on {mesh} by {report['compiled_by']}: "
               f"{report['memory_per_device_gb']:.3g} GB per device "
               f"({time.perf_counter() - started:.0f} s)")
      out[stage].append((label, mesh, report))
  return out


# ----------------------------------------------------------------------------- time


def roofline(report: dict, chip, mfu: float, mbu: float) -> tuple[float, str]:
  """(seconds per call, 'FLOPs' or 'HBM'): max(flops / (peak x mfu), bytes / (bandwidth x mbu))
  of one compiled program's per-chip cost."""
  compute_s = report["flops"] / (chip.peak_flops * mfu)
  memory_s = report["bytes_accessed"] / (chip.hbm_bandwidth * mbu)
  return max(compute_s, memory_s), ("FLOPs" if compute_s >= memory_s else "HBM")


def _program(stages: dict, stage: str, prefix: str) -> dict:
  return next(r for label, _, r in stages[stage] if label.startswith(prefix))


def compiled_hours(cfg, stages: dict, student_label, chip, processes: int, local: int,
                   mfu: float, mbu: float, validation_s: float) -> dict:
  """{stage: (hours, how)}: each stage's calls x its compiled programs' roofline seconds.
  student_label(kind) -> the label of the kind's train program (hardware._student_programs)."""
  def call(stage, prefix):
    report = _program(stages, stage, prefix)
    s, bound = roofline(report, chip, mfu, mbu)
    how = (f"{prefix.split(',')[0]} {report['flops'] / 1e12:.3g} TFLOP, "
           f"{report['bytes_accessed'] / 1e9:.3g} GB HBM per chip -> {s * 1e3:.3g} ms ({bound})")
    if report["unknown_trip_counts"]:  # kdjax.compiled.cost counted those loops' bodies once
      how += f" [LOWER BOUND: {report['unknown_trip_counts']} loops of unknown trip count]"
    return s, how

  batches = lambda num: sampling_calls(cfg, num, processes, local)

  def rounds(num):  # scoring batches dealt to the processes
    return math.ceil(math.ceil(num / cfg.eval_batch_size) / processes)

  out, seeds = {}, cfg.num_seeds
  n_pstar, n_teachers = Layout(cfg).sample_sets_and_teachers()  # by --seed_scope
  s, how = call("1_sample_ground_truth", "sampler")
  n = sum(batches(k) for k in (cfg.num_train, cfg.num_val, cfg.num_select)) * n_pstar
  out["1_sample_ground_truth"] = (n * s, f"{how} x {n} calls")
  s, how = call("2_train_teacher", "train step teacher, batch")
  steps = int(cfg.num_train * cfg.teacher_epochs) // cfg.batch_size * n_teachers
  out["2_train_teacher"] = (steps * s + validation_s * n_teachers, f"{how} x {steps} steps + "
                            f"validation {validation_s * n_teachers / 3600:.3g} h (FLOPs / (chips"
                            " x peak x MFU))")
  s, how = call("3_sample_teacher", "sampler")
  settings = len(cfg.temperatures) + len(cfg.knob_values)  # each a teacher sample set
  n = (batches(cfg.teacher_num_train) + batches(cfg.teacher_num_val)) * settings * seeds
  out["3_sample_teacher"] = (n * s, f"{how} x {n} calls")
  total, hows = 0.0, []
  for kind in cfg.students:  # matched budgets: every kind's run takes cfg.student_steps
    steps = cfg.student_steps * seeds
    s, how = call("4_train_students", f"train step {student_label(kind)}, remat none")
    total += steps * s
    hows.append(f"{how} x {steps} steps")
  out["4_train_students"] = (total, "; ".join(hows))
  sample, how_s = call("5_score_students", "sampler")
  gt, how_g = call("5_score_students", "scorer ground_truth")
  st, how_t = call("5_score_students", "scorer student")
  n_sample = n_gt = n_st = 0
  for kind, group in cfg.student_groups():
    scored = cfg.num_scored(len(group))  # --score_rates
    n_sample += scored * batches(cfg.num_eval_samples) * seeds
    n_gt += scored * rounds(cfg.num_eval_samples) * seeds
    n_st += scored * (rounds(cfg.num_val) + (rounds(cfg.teacher_num_val)
                                             if kind == "seqkd" else 0)) * seeds
    if cfg.lr_sweep:  # every rate's student on p*'s select split
      n_st += len(group) * rounds(cfg.num_select) * seeds
  out["5_score_students"] = (n_sample * sample + n_gt * gt + n_st * st,
                             f"{how_s} x {n_sample}; {how_g} x {n_gt}; {how_t} x {n_st}")
  return {k: (v / 3600, how) for k, (v, how) in out.items()}
