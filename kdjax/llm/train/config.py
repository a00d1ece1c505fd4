"""A training run's configuration (TrainConfig), its one-line checks (validate, preflight), the
models and datasets it names, and its workdir.

Three kinds of run (kdjax.llm.train.loop):
  * plain: one model per train dataset (several: N students vmapped; force_students: a student
    axis even with one), next-token cross-entropy;
  * online KD (`teacher`): the same, the loss the `objective` between teacher and student both
    tempered by `kd_temperature`;
  * teacher-only tempered KD (`teacher` and `teacher_temperatures` (T_1..T_N)): N students on ONE
    shared train dataset, student i's target softmax(z_teacher / T_i), the student untempered;
    with `onpolicy` each student's batches are its own samples (`prompt`, `max_new_tokens`,
    `eos_id`; no train_data) instead; with `student_data_fraction` lambda < 1 (GKD's lambda)
    only round(lambda B) rows of each batch are the student's own, the rest p*'s sequences of
    the ONE train dataset (kdjax.llm.train.batches).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from kdjax import distributed
from kdjax import sharding as sharding_lib
from kdjax.cli import UserError, prepare_workdir, require
from kdjax.llm import data as data_lib
from kdjax.llm.model import partition, truncation
from kdjax.llm.model.config import ATTENTION_IMPLS, REMAT_POLICIES
from kdjax.llm.weights import loading
from kdjax.objectives import tokens

# fields added after workdirs existed: left out of a run's identity while at their defaults, so
# an older run's config.json still matches (and resumes)
_NEW_FIELDS = {"student_data_fraction": 1.0,
               "teacher_temperatures": (), "onpolicy": False, "prompt": (), "max_new_tokens": 0,
               "eos_id": -1, "eval_sequences": 0, "attention": "einsum", "remat": "none",
               "common_random_numbers": False, "learning_rates": (),
               "teacher_knob": "temperature"}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. train_data: one dataset dir per student (several = N students, vmapped);
  `synthetic:N` = N random sequences generated from the seed into the workdir. val_data: one dir
  (every student validated on it) or a comma list of one per student (each student validated, and
  its best checkpoint selected, on its own set)."""
  model: str = "preset:test-tiny"
  train_data: tuple = ()
  val_data: str = ""
  teacher: str = ""
  objective: str = "fkl"
  kd_temperature: float = 1.0    # divides both models' logits (classic KD)
  batch_size: int = 16
  seq_len: int = 128             # training rows (dataset runs) and validation rows
  steps: int = 0                 # total optimizer steps; 0: use epochs
  epochs: int = 0
  lr: float = 5e-4
  warmup_frac: float = 0.01
  decay_frac: float = 0.2
  weight_decay: float = 0.0
  clip: float = 1.0
  grad_accum: int = 1
  dtype: str = "float32"
  mesh: str = ""                 # "data=2,fsdp=2,tensor=1"; default: all devices on data
  eval_every: int = 0            # steps between validations (0: only at the end)
  eval_batch_size: int = 0       # 0: batch_size
  eval_sequences: int = 0        # validate on the first N sequences of each val set (0: all)
  attention: str = "einsum"      # LlamaConfig.attention of the trained model and the teacher
  remat: str = "none"            # LlamaConfig.remat of the trained model: none, layer, dots
  checkpoint_every: int = 0      # steps between checkpoints (0: only at the end)
  keep_checkpoints: int = 2
  seed: int = 0
  pad_id: int = 0
  log_every: int = 10
  progress: bool = True
  force_students: bool = False   # a student axis even with one train dataset (tests, pipeline)
  debug_nan_at_step: int = 0     # testing only: poison the params before this step (1-based)
  # teacher-only tempered KD: N = len(teacher_temperatures) students, student i's target
  # softmax(z_teacher / T_i), student untempered; ONE train dataset shared by all of them
  teacher_temperatures: tuple = ()
  # what teacher_temperatures are: "temperature" (T_i), or a truncation of the teacher at T = 1
  # (kdjax.llm.model.truncation): top_p, min_p (values in (0, 1]) or top_k (whole numbers >= 1),
  # student i's target the teacher's next-token distribution truncated at value i, renormalised
  teacher_knob: str = "temperature"
  # on-policy: student i's batches are B samples of its current params at T = 1 after `prompt`
  # (token ids), max_new_tokens new tokens, stopped at eos_id (-1: never); rows are
  # len(prompt) + max_new_tokens long; no train_data; --steps required
  onpolicy: bool = False
  prompt: tuple = ()
  max_new_tokens: int = 0
  eos_id: int = -1
  # GKD's student-data fraction lambda: the first round(lambda x batch_size) rows of each on-policy
  # batch are the student's own samples, the rest the rows of the ONE train_data dir (p*'s
  # sequences) a token-level student reads at that step; 1: all own (no train_data), 0: none
  student_data_fraction: float = 1.0
  # Student i's random streams (initialisation, data order, on-policy sampling keys) are stream i
  # of the seed; with common_random_numbers every student of the axis uses stream 0, the one a
  # single model uses: students that differ only in data or temperature start from the same
  # parameters and read their data in the same order (the study: identity by seed, never by a
  # student's position; paired comparisons between them carry less noise).
  common_random_numbers: bool = False
  # Student i's peak learning rate (one per student of the axis; () = lr for every student): a
  # learning-rate sweep trained as one vmapped run.
  learning_rates: tuple = ()

  def stream_ids(self) -> tuple:
    """The random stream of each student of the axis (one model: (0,))."""
    n = self.num_students or 1
    return (0,) * n if self.common_random_numbers else tuple(range(n))

  @property
  def num_students(self):
    """N of the student axis, None for one model without one."""
    if self.teacher_temperatures:
      return len(self.teacher_temperatures)
    n = len(self.train_data)
    return n if (n > 1 or self.force_students) else None

  @property
  def val_dirs(self) -> tuple:
    """The validation set(s): () without, one shared, or one per student."""
    return tuple(s.strip() for s in self.val_data.split(",") if s.strip())

  @property
  def train_seq_len(self) -> int:
    """Length of the training rows: seq_len, or prompt + max_new_tokens on-policy."""
    return len(self.prompt) + self.max_new_tokens if self.onpolicy else self.seq_len

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ("train_data", "teacher_temperatures", "prompt", "learning_rates"):
      d[k] = list(d[k])
    for k in ("progress", "log_every", "debug_nan_at_step"):  # not part of the run's identity
      d.pop(k)
    for k, default in _NEW_FIELDS.items():
      if getattr(self, k) == default:
        d.pop(k)
    return d


def _validate_knob(cfg: TrainConfig) -> None:
  """--teacher_knob and the range of its values (teacher_temperatures)."""
  knob, values = cfg.teacher_knob, cfg.teacher_temperatures
  require(knob in truncation.KNOBS, f"--teacher_knob={knob!r}: one of {', '.join(truncation.KNOBS)}")
  if knob == "temperature":
    return
  require(bool(values), f"--teacher_knob={knob} needs its values in --teacher_temperatures")
  if knob == "top_k":
    require(all(float(v).is_integer() and v >= 1 for v in values),
            f"--teacher_knob=top_k: {list(values)}: every k must be a whole number >= 1")
  else:
    require(all(0 < v <= 1 for v in values), f"--teacher_knob={knob}: {list(values)}: every "
            "value must be in (0, 1]")
  require(cfg.objective not in ("rkl",), f"--objective={cfg.objective}: reverse KL to a "
          f"truncated teacher ({knob}) is infinite (the student's mass on the cut tokens); use "
          "srkl, jsd, skl, tvd or fkl")


def _validate_tempered(cfg: TrainConfig) -> None:
  """The teacher_temperatures / onpolicy fields."""
  temps = cfg.teacher_temperatures
  if temps:
    require(bool(cfg.teacher), "--teacher_temperatures needs a --teacher")
    require(all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temps),
            f"--teacher_temperatures={list(temps)}: every temperature must be a number > 0")
    require(cfg.kd_temperature == 1.0, f"--kd_temperature={cfg.kd_temperature} tempers both "
            "models; with --teacher_temperatures (teacher only) leave it at 1")
  _validate_knob(cfg)
  lam = cfg.student_data_fraction
  require(isinstance(lam, (int, float)) and 0 <= lam <= 1,
          f"--student_data_fraction={lam} must be in [0, 1]")
  if not cfg.onpolicy:
    require(not cfg.prompt and cfg.max_new_tokens == 0 and cfg.eos_id == -1,
            "--prompt, --max_new_tokens and --eos_id are for --onpolicy runs only")
    require(lam == 1, f"--student_data_fraction={lam} is for --onpolicy runs only")
    if temps:
      require(len(cfg.train_data) == 1, f"--teacher_temperatures trains its {len(temps)} "
              f"students on ONE shared --train_data dir, got {len(cfg.train_data)}")
    return
  require(bool(temps), "--onpolicy needs --teacher and --teacher_temperatures")
  require(len(cfg.prompt) >= 1, "--onpolicy needs a --prompt (token ids, at least one)")
  require(all(isinstance(t, (int, np.integer)) and t >= 0 for t in cfg.prompt),
          f"--prompt={list(cfg.prompt)}: expected token ids (integers >= 0)")
  require(cfg.max_new_tokens >= 1, f"--max_new_tokens={cfg.max_new_tokens} must be >= 1 "
          "with --onpolicy")
  require(cfg.eos_id >= -1, f"--eos_id={cfg.eos_id} must be a token id or -1 (never stop)")
  require(cfg.steps > 0, "--onpolicy needs --steps (its batches are samples, there are no epochs)")
  if lam == 1:
    require(not cfg.train_data, "--train_data is not used with --onpolicy (the students' own "
            "samples are the batches); leave it empty")
    return
  require(len(cfg.train_data) == 1, f"--student_data_fraction={lam} < 1 fills the rest of each "
          f"batch from ONE --train_data dir (p*'s sequences), got {len(cfg.train_data)}")
  require(cfg.seq_len == cfg.train_seq_len, f"--seq_len={cfg.seq_len}: with "
          f"--student_data_fraction < 1, p*'s rows and the samples must have one length: "
          f"len(--prompt) + --max_new_tokens = {cfg.train_seq_len}")


def validate(cfg: TrainConfig) -> None:
  require(len(cfg.train_data) >= 1 or cfg.onpolicy,
          "--train_data is required (a dataset dir, comma list, or synthetic:N)")
  require(cfg.batch_size >= 1, f"--batch_size={cfg.batch_size} must be >= 1")
  require(cfg.seq_len >= 2, f"--seq_len={cfg.seq_len} must be >= 2")
  require(cfg.steps >= 0 and cfg.epochs >= 0, "--steps and --epochs must be >= 0")
  require((cfg.steps > 0) != (cfg.epochs > 0), "give exactly one of --steps or --epochs (> 0)")
  require(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr={cfg.lr} must be a positive number")
  require(0 <= cfg.warmup_frac <= 1, f"--warmup_frac={cfg.warmup_frac} must be in [0, 1]")
  require(0 <= cfg.decay_frac <= 1, f"--decay_frac={cfg.decay_frac} must be in [0, 1]")
  require(cfg.warmup_frac + cfg.decay_frac <= 1, "--warmup_frac + --decay_frac must be <= 1")
  require(cfg.weight_decay >= 0, f"--weight_decay={cfg.weight_decay} must be >= 0")
  require(cfg.clip >= 0, f"--clip={cfg.clip} must be >= 0 (0 disables clipping)")
  require(cfg.grad_accum >= 1, f"--grad_accum={cfg.grad_accum} must be >= 1")
  require(cfg.batch_size % cfg.grad_accum == 0,
          f"--batch_size={cfg.batch_size} is not a multiple of --grad_accum={cfg.grad_accum}")
  require(cfg.dtype in ("float32", "bfloat16", "float16"),
          f"--dtype={cfg.dtype!r}: expected float32, bfloat16 or float16")
  require(cfg.kd_temperature > 0, f"--kd_temperature={cfg.kd_temperature} must be > 0")
  require(cfg.eval_every >= 0 and cfg.checkpoint_every >= 0,
          "--eval_every and --checkpoint_every must be >= 0")
  require(cfg.keep_checkpoints >= 1, "--keep_checkpoints must be >= 1")
  require(cfg.eval_batch_size >= 0, "--eval_batch_size must be >= 0")
  require(cfg.eval_sequences >= 0, f"--eval_sequences={cfg.eval_sequences} must be >= 0 (0: all)")
  n_val, n = len(cfg.val_dirs), cfg.num_students or 1
  require(n_val <= 1 or n_val == n, f"--val_data: {n_val} dirs for {n} student(s); give one "
          "(shared) or one per student")
  lrs = cfg.learning_rates
  require(not lrs or len(lrs) == n, f"--learning_rates: {len(lrs)} rates for {n} student(s); "
          "give one per student")
  require(all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in lrs),
          f"--learning_rates={list(lrs)}: every rate must be a number > 0")
  require(cfg.remat in REMAT_POLICIES,
          f"--remat={cfg.remat!r}: expected {', '.join(REMAT_POLICIES)}")
  require(cfg.attention in ATTENTION_IMPLS,
          f"--attention={cfg.attention!r}: expected {', '.join(ATTENTION_IMPLS)}")
  require(cfg.attention != "cudnn" or cfg.dtype != "float32",
          "--attention=cudnn: cuDNN flash attention needs --dtype=bfloat16 or float16")
  if cfg.teacher:
    tokens.by_name(cfg.objective)  # one-line error for an unknown objective
  _validate_tempered(cfg)


def load_spec(spec: str, seed: int = 0):
  """(config, params) of a model spec (kdjax.llm.weights.loading, the one parser of specs); a preset
  without @SEED is initialised from `seed`."""
  return loading.load_model(spec, default_seed=seed)


def _initial_model(spec: str, seed: int, mesh):
  """(config, initial params) of the model to train. `preset:NAME`: params None (init_state draws
  them born sharded from --seed); `preset:NAME@SEED`: the init that spec names everywhere, born
  sharded on the mesh; other specs: host copies (identical on every process) that init_state
  places on the mesh."""
  if loading.parse_spec(spec)[0] == "preset":
    config, preset_seed = loading.parse_preset(spec)
    if preset_seed is None:
      return config, None
    shardings = partition.param_shardings(config, mesh)
    return config, loading.init_preset(config, preset_seed, shardings)
  config, params = load_spec(spec, seed)
  return config, jax.device_get(params)


def preflight(cfg: TrainConfig):
  """Everything checkable before data or weights are read: the flags, the mesh and the batch sizes
  it must divide, the model specs (kdjax.llm.weights.loading.validate_spec), the teacher's vocabulary and
  the on-policy prompt and length. Returns (mesh, eval batch size). The SmolLM2 study runs it on
  each of its training runs first."""
  validate(cfg)
  require(cfg.attention != "cudnn" or jax.default_backend() == "gpu",
          f"--attention=cudnn needs an NVIDIA GPU; this run's backend is {jax.default_backend()}")
  mesh = sharding_lib.mesh_from_text(cfg.mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  require(cfg.batch_size % batch_shards == 0,
          f"--batch_size={cfg.batch_size} is not a multiple of data x fsdp = {batch_shards}")
  eval_b = cfg.eval_batch_size or cfg.batch_size
  require(eval_b % batch_shards == 0,
          f"--eval_batch_size={eval_b} is not a multiple of data x fsdp = {batch_shards}")
  config = loading.validate_spec(cfg.model)
  if cfg.teacher:
    teacher = loading.validate_spec(cfg.teacher)
    require(teacher.vocab_size == config.vocab_size,
            f"--teacher vocabulary {teacher.vocab_size} != student vocabulary {config.vocab_size}")
  if cfg.onpolicy:
    v = config.vocab_size
    require(max(cfg.prompt) < v, f"--prompt token {max(cfg.prompt)} is outside the vocabulary "
            f"of {v} tokens")
    require(cfg.eos_id < v, f"--eos_id={cfg.eos_id} is outside the vocabulary of {v} tokens")
  return mesh, eval_b


def resolve_dataset(spec: str, workdir: str, vocab_size: int, seed: int, name: str) -> str:
  """A dataset dir; `synthetic:N` is generated (deterministically from seed) into the workdir."""
  if not spec.startswith("synthetic:"):
    return spec
  try:
    n = int(spec.split(":", 1)[1])
  except ValueError:
    raise UserError(f"{spec!r}: expected synthetic:N with N an integer") from None
  require(n >= 1, f"{spec!r}: N must be >= 1")
  directory = os.path.join(workdir, "data", f"{name}-synthetic-{n}-seed{seed}")
  if jax.process_index() == 0 and data_lib.num_complete_shards(directory) == 0:
    data_lib.ShardWriter(directory).write(data_lib.synthetic_sequences(n, vocab_size, seed))
  distributed.sync("kdjax_synthetic_data")
  return directory


def _prepare(cfg: TrainConfig, workdir: str, overwrite: bool) -> bool:
  """Record cfg in the workdir (process 0); a new or overwritten config clears stale outputs."""
  same = 0
  if jax.process_index() == 0:
    same = int(prepare_workdir(workdir, cfg.to_dict(), overwrite))
    if not same:
      for name in ("checkpoints", "best", "tb", "train_summary.json"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.unlink(path)
  if jax.process_count() > 1:
    same = int(multihost_utils.broadcast_one_to_all(np.int32(same)))
  return bool(same)
