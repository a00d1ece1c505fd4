"""The study's plan priced on named hardware: hours per stage, and whether each stage fits.

`python -m experiments.llm --flagfile=F --dry_run --hardware=NAME` prints it (`estimate`, then
`format_estimate`). NAME is a chip of `CHIPS` (h100, h200, a100, v5e, v5p, v6e), optionally with
a slice size as the vendors count it: h100-8 (8 GPUs), v5p-64 (64 TensorCores = 32 chips: v5p
names count 2 cores per chip), v6e-16 (16 chips). Without a size the chips are the --mesh's
(data=-1: one host's).

Time, per stage (every assumption is printed with the figures):
  training   its FLOPs (kdjax.llm.study.plan) / (chips x peak bf16 FLOP/s x MFU), the teacher's
             validation passes added as forward FLOPs.
  decoding   each sampling call as kdjax.llm.model.decode.decode_cost counts it (the call as the
             sampler runs it: the prefill, then one step per token drawn reading the weights in
             the compute dtype and only the KV cache's blocks filled so far), the prefill and each
             run of steps reading as many blocks at max(bytes / (HBM bandwidth x MBU), FLOPs /
             (peak x MFU)), plus a fixed cost per layer and token. Tokens drawn per call: all
             --max_new_tokens (the loop stops when every row has ended, and the longest of a
             chunk's rows rarely ends early), or fewer where the caller knows a model's samples
             (`steps`); the printed assumptions say which.
  scoring    forward FLOPs / (chips x peak x MFU).
Where the work runs follows kdjax/llm/study/pipeline.py: training on the --mesh (`data` replicates
parameters and splits the batch, `fsdp` shards both, `tensor` shards heads, MLP and vocabulary);
sampling on each process's own chips, every chip drawing its own chunk of --sample_batch_size rows
per call (kdjax.llm.model.sample_rows; programs.sampling_calls), scoring with the batch split over
them (or one chip when they do not divide it); dataset shards and scoring batches dealt
round-robin to the processes, one process per host.

Memory: each stage's programs compiled from abstract arrays for its mesh (nothing allocated;
kdjax/llm/study/programs.py: by the TPU compiler for a topology of the slice when the chip is a TPU
and libtpu is installed, which then also times every stage from the programs' own FLOPs and bytes;
otherwise by XLA:CPU on fake CPU devices): the train step by kdjax.llm.train.footprint (remat
none and layer), the sampler (sampling._sample_jit on one chip's chunk of rows: the chips draw
theirs independently) and the scorer (evaluate._sums_jit) as the pipeline places them. The
per-device figure is XLA's (arguments + outputs + temporaries - donated). The programs are
compiled for the real mesh, however many chips: XLA partitions one program per device, so the
compile time does not grow with the device count (measured here: a 135M train step for data=1,
fsdp=8 in 19.6 s, for data=4, fsdp=8 on 32 devices in 18.8 s, same bytes per device), and no
equivalent smaller mesh has to be argued for.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Optional

import jax

from kdjax.cli import UserError, require
from kdjax.llm.model import decode
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.study import inputs, kinds, programs
from kdjax.llm.study.layout import Layout
from kdjax.llm.study.programs import (ensure_cpu_devices, per_chip, sampler_memory,  # noqa: F401
                                      sampling_calls, scorer_memory, train_memory)
from kdjax.sharding import parse_mesh

USABLE_HBM = 0.9        # a program fits when it needs at most this fraction of a chip's HBM
DEFAULT_MBU = 0.6       # fraction of HBM bandwidth a decode step achieves


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip, from its vendor's datasheet (dense bf16; GB = 1e9 bytes)."""
  name: str
  peak_flops: float         # bf16 FLOP/s per chip, dense
  hbm_bandwidth: float      # bytes/s per chip
  hbm_bytes: float          # HBM per chip
  chips_per_host: int
  mfu: float                # default model-FLOPs utilisation (assumed, --mfu)
  layer_step_s: float       # fixed cost of one layer in one decode step (kernels, small ops; a guess)
  cores_per_chip: int = 1   # what a slice name counts: v5p-64 = 64 TensorCores = 32 chips
  tpu: str = ""             # the TPU generation the TPU compiler compiles for (libtpu's topology)


CHIPS = {
    "h100": Chip("H100-SXM", 989e12, 3.35e12, 80e9, 8, 0.4, 20e-6),
    "h200": Chip("H200", 989e12, 4.8e12, 141e9, 8, 0.4, 20e-6),
    "a100": Chip("A100-80GB", 312e12, 2.039e12, 80e9, 8, 0.4, 20e-6),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16e9, 8, 0.5, 10e-6, tpu="v5e"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95e9, 4, 0.5, 10e-6, cores_per_chip=2, tpu="v5p"),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32e9, 8, 0.5, 10e-6, tpu="v6e"),
}
_ALIASES = {"h100-sxm": "h100", "a100-80gb": "a100", "tpu-v5e": "v5e", "tpu-v5p": "v5p",
            "tpu-v6e": "v6e"}


def parse(name: str) -> tuple[Chip, Optional[int]]:
  """'h100' -> (H100, None); 'h100-8' -> (H100, 8 chips); 'v5p-64' -> (v5p, 32 chips)."""
  m = re.fullmatch(r"(.+?)(?:-(\d+))?", name.strip().lower())
  key = _ALIASES.get(m.group(1), m.group(1)) if m else ""
  require(key in CHIPS, f"--hardware={name!r}: unknown; known: {', '.join(CHIPS)} (optionally "
          "-N, the slice size: h100-8, v5p-64)")
  chip, count = CHIPS[key], m.group(2)
  if count is None:
    return chip, None
  require(int(count) > 0 and int(count) % chip.cores_per_chip == 0,
          f"--hardware={name!r}: {chip.name} slices count {chip.cores_per_chip} cores per chip")
  return chip, int(count) // chip.cores_per_chip


def resolve_mesh(mesh: str, chip: Chip, chips: Optional[int]) -> tuple[int, int, int]:
  """(data, fsdp, tensor) of --mesh on the hardware: data=-1 takes the chips (one host's without
  a slice size); an explicit mesh must span the slice."""
  data, fsdp, tensor = parse_mesh(mesh)
  if data == -1:
    n = chips or chip.chips_per_host
    require(n % (fsdp * tensor) == 0,
            f"--mesh={mesh!r}: fsdp x tensor = {fsdp * tensor} does not divide {n} chips")
    return n // (fsdp * tensor), fsdp, tensor
  require(chips is None or data * fsdp * tensor == chips, f"--mesh={mesh!r} spans "
          f"{data * fsdp * tensor} chips, the --hardware slice {chips}")
  return data, fsdp, tensor


def hosts(chip: Chip, chips: int) -> tuple[int, int]:
  """(processes, chips per process): one process per host."""
  local = min(chips, chip.chips_per_host)
  return math.ceil(chips / local), local


# ----------------------------------------------------------------------------- time


def decode_call_seconds(c: LlamaConfig, rows: int, prompt_len: int, new_tokens: int, chip: Chip,
                        mfu: float, mbu: float, steps: Optional[int] = None,
                        kv_block: int = decode.KV_BLOCK) -> tuple[float, str]:
  """(seconds, 'HBM' or 'FLOPs') of one sampling call on one chip holding `rows` rows, from
  decode.decode_cost (the call as the sampler runs it: the prefill, then one step per further token
  drawn, each reading the KV blocks filled so far). The prefill and each run of steps reading the
  same number of blocks (their steps cost alike) take max(bytes / (bandwidth x mbu), FLOPs / (peak
  x mfu)); every token drawn adds num_layers x the chip's fixed per-layer cost. steps: tokens the
  loop draws (it stops when every row has ended), default new_tokens; the bound is the one that
  took most of the time."""
  steps = new_tokens if steps is None else max(1, min(int(steps), new_tokens))
  cost = lambda s: decode.decode_cost(c, rows, prompt_len, new_tokens, s, kv_block)
  # the step drawing token i (i >= 1) writes slot prompt_len + i - 1: a new block starts there
  marks = [1] + [i for i in range(2, steps) if (prompt_len + i - 1) % kv_block == 0] + [steps]
  time_by = {"HBM": 0.0, "FLOPs": 0.0}
  prev = (0.0, 0.0)
  for s in dict.fromkeys(marks):  # the prefill (1 token), then each run of steps to `s` tokens
    flops, bytes_ = cost(s)
    memory_s = (bytes_ - prev[1]) / (chip.hbm_bandwidth * mbu)
    compute_s = (flops - prev[0]) / (chip.peak_flops * mfu)
    time_by["HBM" if memory_s >= compute_s else "FLOPs"] += max(memory_s, compute_s)
    prev = (flops, bytes_)
  bound = max(time_by, key=time_by.get)
  return sum(time_by.values()) + steps * c.num_layers * chip.layer_step_s, bound


def sampling_seconds(c: LlamaConfig, num: int, prompt_len: int, cfg, chip: Chip, processes: int,
                     local: int, mfu: float, mbu: float, steps: Optional[int] = None,
                     kv_block: int = decode.KV_BLOCK) -> float:
  """One dataset of `num` sequences: the busiest process's sampling_calls, each a chunk of
  --sample_batch_size rows on every chip, drawing `steps` tokens (default --max_new_tokens: no
  row assumed to end early)."""
  return sampling_calls(cfg, num, processes, local) * decode_call_seconds(
      c, cfg.sample_batch_size, prompt_len, cfg.max_new_tokens, chip, mfu, mbu, steps, kv_block)[0]


def compute_seconds(flops: float, chips: int, chip: Chip, mfu: float) -> float:
  return flops / (chips * chip.peak_flops * mfu)


def forward_flops(c: LlamaConfig, sequences: int, seq_len: int) -> float:
  """Teacher-forced forward FLOPs of `sequences` rows of seq_len tokens (causal attention)."""
  return sequences * seq_len * c.forward_flops_per_token(seq_len // 2)


def scoring_seconds(c: LlamaConfig, num: int, seq_len: int, batch: int, chip: Chip,
                    processes: int, local: int, mfu: float) -> float:
  """A forward pass over `num` rows padded to seq_len, in batches dealt to the processes."""
  _, used = per_chip(batch, local)
  rounds = math.ceil(math.ceil(num / batch) / processes)
  return compute_seconds(rounds * forward_flops(c, batch, seq_len), used, chip, mfu)


def teacher_validation_flops(cfg, teacher: LlamaConfig, seq_len: int) -> float:
  """Forward FLOPs of the teacher's checkpoint selection (every --eval_every steps, else once per
  epoch, on --eval_sequences or all --num_select sequences)."""
  steps = cfg.teacher_epochs * (cfg.num_train // cfg.batch_size)
  every = cfg.eval_every or cfg.num_train // cfg.batch_size
  return (math.ceil(steps / every) * forward_flops(teacher, cfg.eval_sequences or cfg.num_select,
                                                     seq_len))


# ----------------------------------------------------------------------------- the estimate


def _configs(cfg, ground_truth_preset: str) -> dict:
  """{ground_truth, teacher, student: LlamaConfig} in the study's compute dtype and attention (as
  plan.dry_run_plan describes them; cudnn attention compiles as dot_product off a GPU)."""
  def desc(spec):
    return inputs.describe(spec, ground_truth_preset if spec == cfg.ground_truth else "")

  attention = "dot_product" if cfg.attention == "cudnn" else cfg.attention
  out = {name: desc(getattr(cfg, name)).replace(dtype=cfg.dtype)
         for name in ("ground_truth", "teacher", "student")}
  for name in ("teacher", "student"):
    out[name] = out[name].replace(attention=attention)
  return out


def _student_program(cfg, name: str, models: dict) -> tuple[str, dict]:
  """(label, footprint.train_step kwargs) of the training program of student kind `name`."""
  n, kind = len(cfg.temperatures), kinds.get(name)
  if not kind.per_temperature:
    return kind.name, {}
  if not kind.distills_tokens:
    return f"{kind.name} x{n}", {"num_students": n}
  if not kind.onpolicy:
    return (f"token-level x{n} + teacher",
            {"num_students": n, "teacher": models["teacher"], "shared_batch": True})
  return (f"on-policy x{n} + teacher (its sampler not counted)",
          {"num_students": n, "teacher": models["teacher"]})


def _student_programs(cfg, models: dict) -> list[tuple[str, dict]]:
  """(label, footprint.train_step kwargs) of each distinct student training program."""
  return list(dict(_student_program(cfg, k, models) for k in cfg.students).items())


def _hours_and_how(cfg, plan: dict, models: dict, chip: Chip, mesh_chips: int, processes: int,
                   local: int, mfu: float, mbu: float, steps: Optional[dict] = None) -> dict:
  """{stage: (hours, how)} from the plan's FLOPs and the sampler's decode_cost. steps: {model name:
  tokens a sampling call draws (its longest row)}, default --max_new_tokens for each."""
  seq_len, prompt_len = plan["seq_len"], plan["seq_len"] - cfg.max_new_tokens
  flops = {s["stage"]: s["flops"] for s in plan["stages"]}
  gt, teacher, student = models["ground_truth"], models["teacher"], models["student"]
  steps = {name: (steps or {}).get(name) or cfg.max_new_tokens for name in models}
  sample = lambda name, num: sampling_seconds(models[name], num, prompt_len, cfg, chip, processes,
                                              local, mfu, mbu, steps[name])
  score = lambda c, num: scoring_seconds(c, num, seq_len, cfg.eval_batch_size, chip, processes,
                                         local, mfu)
  rows = cfg.sample_batch_size

  def step(name):
    n = steps[name]
    s, bound = decode_call_seconds(models[name], rows, prompt_len, cfg.max_new_tokens, chip, mfu,
                                   mbu, n)
    return (f"{s:.3g} s per call of {rows} rows/chip x {n} tokens ({s / n * 1e3:.3g} ms/token, "
            f"{bound}-bound)")

  out = {}
  n_pstar, n_teachers = Layout(cfg).sample_sets_and_teachers()  # --seed_scope
  s1 = sum(sample("ground_truth", n) for n in (cfg.num_train, cfg.num_val, cfg.num_select))
  out["1_sample_ground_truth"] = (s1 * n_pstar, f"decode p*: {step('ground_truth')}")
  val = teacher_validation_flops(cfg, teacher, seq_len) * n_teachers
  s2 = compute_seconds(flops["2_train_teacher"] + val, mesh_chips, chip, mfu)
  out["2_train_teacher"] = (s2, f"{flops['2_train_teacher']:.3g} FLOP + validation {val:.3g} "
                            f"FLOP on {mesh_chips} chips")
  per = sample("teacher", cfg.teacher_num_train) + sample("teacher", cfg.teacher_num_val)
  settings = len(cfg.temperatures) + len(cfg.knob_values)  # each a teacher sample set
  out["3_sample_teacher"] = (per * settings * cfg.num_seeds, f"decode teacher: {step('teacher')}")
  out["4_train_students"] = (compute_seconds(flops["4_train_students"], mesh_chips, chip, mfu),
                             f"{flops['4_train_students']:.3g} FLOP on {mesh_chips} chips")
  decode, forward = 0.0, 0.0
  for kind, group in cfg.student_groups():
    for _ in range(cfg.num_scored(len(group))):  # --score_rates
      decode += sample("student", cfg.num_eval_samples)
      forward += score(student, cfg.num_val) + score(gt, cfg.num_eval_samples)
      if kind == "seqkd":
        forward += score(student, cfg.teacher_num_val)
    if cfg.lr_sweep:  # every rate's student on p*'s select split
      forward += len(group) * score(student, cfg.num_select)
  out["5_score_students"] = ((decode + forward) * cfg.num_seeds,
                             f"decode students {decode * cfg.num_seeds / 3600:.3g} h "
                             f"({step('student')}) + forward passes "
                             f"{forward * cfg.num_seeds / 3600:.3g} h")
  return {k: (v / 3600, how) for k, (v, how) in out.items()}


def prepare(cfg, hardware: str, memory: bool) -> None:
  """Validate --hardware against --mesh and, for the memory analysis, ask for as many fake CPU
  devices as the mesh spans: call before anything starts a JAX backend."""
  chip, chips = parse(hardware)
  if memory:
    ensure_cpu_devices(math.prod(resolve_mesh(cfg.mesh, chip, chips)))


def estimate(cfg, plan: dict, hardware: str, ground_truth_preset: str = "",
             mfu: float = 0.0, mbu: float = 0.0, memory: bool = True, progress=None,
             steps: Optional[dict] = None) -> dict:
  """Hours per stage on `hardware` for the flags `cfg` and their plan (plan.dry_run_plan), and,
  with `memory`, every stage's compiled programs' memory per device against the chip's HBM.
  steps: {model name: tokens each of its sampling calls draws}, where known (the datasheet path);
  default --max_new_tokens."""
  chip, chips = parse(hardware)
  mfu, mbu = mfu or chip.mfu, mbu or DEFAULT_MBU
  require(0 < mfu <= 1, f"--mfu={mfu}: must be in (0, 1]")
  require(0 < mbu <= 1, f"--mbu={mbu}: must be in (0, 1]")
  mesh_shape = resolve_mesh(cfg.mesh, chip, chips)
  mesh_chips = math.prod(mesh_shape)
  processes, local = hosts(chip, mesh_chips)
  models = _configs(cfg, ground_truth_preset)
  steps = {name: (steps or {}).get(name) or cfg.max_new_tokens for name in models}
  hours = _hours_and_how(cfg, plan, models, chip, mesh_chips, processes, local, mfu, mbu, steps)
  progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
  timed_by = "datasheet formulas (plan FLOPs; the sampler's decode_cost)"
  mem = {}
  if memory:
    mem = programs.compile_stages(cfg, plan, models, mesh_shape, local,
                                  _student_programs(cfg, models), chip, progress, steps)
    if programs.tpu_target(chip):
      val = compute_seconds(teacher_validation_flops(cfg, models["teacher"], plan["seq_len"]),
                            mesh_chips, chip, mfu)
      hours = programs.compiled_hours(cfg, mem, lambda k: _student_program(cfg, k, models)[0],
                                      chip, processes, local, mfu, mbu, val)
      timed_by = "the TPU compiler's programs (roofline of their FLOPs and HBM bytes)"
  return {"chip": dataclasses.asdict(chip), "hardware": hardware, "chips": mesh_chips,
          "mesh": mesh_shape, "processes": processes, "chips_per_process": local, "mfu": mfu,
          "mbu": mbu, "steps": steps, "max_new_tokens": cfg.max_new_tokens, "hours": hours, "timed_by": timed_by, "dtype": cfg.dtype,
          "memory": {stage: [(label, mesh, r["memory_per_device_gb"], r["compiled_by"])
                             for label, mesh, r in progs] for stage, progs in mem.items()},
          "total_hours": sum(h for h, _ in hours.values())}


def _fits(gb: float, chip: dict) -> str:
  return "yes" if gb * 1e9 <= USABLE_HBM * chip["hbm_bytes"] else "NO"


def format_estimate(est: dict) -> str:
  c, (d, f, t) = est["chip"], est["mesh"]
  lines = [f"hardware {est['hardware']}: {est['chips']} x {c['name']} "
           f"({est['processes']} host(s) of {est['chips_per_process']}), training mesh "
           f"data={d},fsdp={f},tensor={t}",
           f"  hours from {est.get('timed_by', 'datasheet formulas')}:",
           f"  {'stage':24s} {'hours':>9s}  how"]
  for stage, (h, how) in est["hours"].items():
    lines.append(f"  {stage:24s} {h:9.3g}  {how}")
  lines.append(f"  {'total':24s} {est['total_hours']:9.3g}  "
               f"(= {est['total_hours'] / 24:.3g} days; 6_results not counted)")
  if est["memory"]:
    cap = USABLE_HBM * c["hbm_bytes"] / 1e9
    lines.append(f"  memory per device, compiled from abstract arrays (fits: <= {cap:.3g} GB "
                 f"= {USABLE_HBM:g} x {c['hbm_bytes'] / 1e9:g} GB HBM; the plan's GiB above are "
                 "its formulas'):")
    lines.append(f"  {'stage':24s} {'GB':>7s}  {'fits':4s}  {'mesh compiled':26s} program, "
                 "compiled by")
    for stage, progs in est["memory"].items():
      for label, mesh, gb, by in progs:
        lines.append(f"  {stage:24s} {gb:7.3g}  {_fits(gb, c):4s}  {mesh:26s} {label}, {by}")
  else:
    lines.append("  memory per device: not compiled (--nomemory_analysis)")
  lines.append("  assumptions:")
  lines += ["    " + a for a in assumptions(est)]
  return "\n".join(lines)


def _steps_text(est: dict) -> str:
  n = est.get("max_new_tokens")
  steps = est.get("steps") or {}
  if all(v == n for v in steps.values()):
    return f"all --max_new_tokens={n} (no row assumed to end early at EOS)"
  return ", ".join(f"{name} {v}" + (" (--max_new_tokens: none known)" if v == n else
                                    " (its longest rows known)") for name, v in steps.items())


def assumptions(est: dict) -> list[str]:
  c = est["chip"]
  tpu = ["hours: each program's seconds per call = max(FLOPs / (peak x MFU "
         f"{est['mfu']:g}), HBM bytes / (HBM bandwidth x MBU {est['mbu']:g})), per chip from the "
         "TPU compiler's executable: FLOPs by XLA's cost analysis (kdjax.compiled.cost), HBM bytes "
         "by kdjax.hbm (in-place updates and partial reads counted by what they touch, on-chip "
         "memory not at all), loop bodies weighted by their trip counts (the sampler's loops for "
         "the tokens drawn below); the decoding formula below is not used"
         ] if est.get("timed_by", "").startswith("the TPU") else []
  return tpu + [
      f"{c['name']}: {c['peak_flops'] / 1e12:g} TFLOP/s bf16 dense peak, HBM "
      f"{c['hbm_bandwidth'] / 1e12:g} TB/s and {c['hbm_bytes'] / 1e9:g} GB per chip, "
      f"{c['chips_per_host']} chips per host (vendor datasheets); the same peak for float32 runs",
      f"training and forward passes at MFU {est['mfu']:g} (--mfu); no input pipeline, checkpoint, "
      "compile or host time; the teacher's validation passes counted, every epoch's",
      f"decoding: each sampling call as kdjax.llm.model.decode.decode_cost counts it (the prefill, "
      f"then one step per token drawn reading the weights in {est['dtype']}, the KV cache's "
      f"{decode.KV_BLOCK}-slot blocks filled so far and writing f32 logits; activations not "
      f"counted); the prefill and each run of steps that read as many blocks at max(HBM bytes / (bandwidth x "
      f"MBU {est['mbu']:g} (--mbu)), FLOPs / (peak x MFU)), + {c['layer_step_s'] * 1e6:g} us per "
      "layer and token (kernel launches, small ops: a guess, not measured)",
      "tokens drawn per sampling call (the loop stops when every row has ended): "
      + _steps_text(est),
      f"sampling and scoring: one process per host, params replicated on its "
      f"{est['chips_per_process']} chip(s), each drawing its own chunk of --sample_batch_size "
      f"rows per sampling call, the scoring batch split over them; shards and scoring batches "
      f"dealt round-robin to the {est['processes']} process(es) (a dataset of one shard keeps one "
      "host busy); on-policy students' sampling priced as FLOPs (plan)",
      "memory: the compiler's buffer assignment of the partitioned program (XLA:CPU on fake "
      "devices fuses differently from the GPU / TPU compilers; TPU chips are compiled by the TPU "
      "compiler when libtpu is installed: setup.py's tpu extra); on GPUs JAX preallocates 75% of HBM unless "
      f"XLA_PYTHON_CLIENT_MEM_FRACTION is raised (e.g. to {USABLE_HBM:g}); the study trains with "
      "remat none (remat layer: train_lm / bench_train --remat)",
  ]
