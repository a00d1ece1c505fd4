"""The SmolLM2 study's configuration: every knob of the pipeline (kdjax/llm/study/pipeline.py) and
the range of each. Student kinds are kdjax/llm/study/kinds.py's table."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from kdjax.cli import require
from kdjax.llm.model import truncation
from kdjax.llm.model.config import ATTENTION_IMPLS, REMAT_POLICIES
from kdjax.llm.study import kinds as kindlib
from kdjax.llm.study.kinds import student_name


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """One run of the study. Field names are the flag names of experiments/llm.py."""
  ground_truth: str = "gguf:default"     # p*: gguf:PATH|default, hf:DIR, ckpt:DIR, preset:...
  tokenizer: str = ""                    # "" = the ground truth's; "bytes" = byte-level (tests)
  prompt: str = "The"
  teacher: str = "preset:tiny-49k"       # p' from scratch: preset:NAME[@SEED] (default: --seed)
  student: str = "preset:micro-49k"      # p'' from scratch: preset:NAME[@SEED] (default: each seed)
  temperatures: tuple = (0.8, 0.875, 0.95, 1.0)
  teacher_knob: str = "temperature"      # a truncation knob's students beside the temperatures'
  knob_values: tuple = ()                # its values (top_p / min_p in (0, 1], top_k >= 1)
  students: tuple = ("direct", "seqkd")  # student kinds (KINDS); all but direct at every T
  num_seeds: int = 1
  seed_scope: str = "students"           # what a seed re-draws: students, teacher (and on), all
  seed: int = 0
  num_train: int = 4096                  # p* training sequences
  num_val: int = 512                     # p* validation sequences: recall's test set, nothing else
  num_select: int = 512                  # p* sequences held out to select the teacher's checkpoint
  teacher_num_train: int = 4096          # teacher samples per temperature (KD training set)
  student_num_train: int = 0             # every student's training sequences per epoch (matched
  #                                        budgets: the same steps for every kind); 0 = num_train
  teacher_num_val: int = 256             # teacher samples per temperature (KD validation set)
  num_eval_samples: int = 512            # student samples per student (precision's test set)
  max_new_tokens: int = 32
  sample_batch_size: int = 64
  shard_size: int = 512
  teacher_epochs: int = 1
  student_epochs: int = 1
  batch_size: int = 32
  learning_rate: float = 5e-4
  student_learning_rates: tuple = ()     # a sweep: every student at each rate, one chosen on select
  score_rates: str = "chosen"            # with a sweep, whose precision and recall are measured:
  #                                        the chosen rate's (chosen) or every rate's (all)
  warmup_fraction: float = 0.01
  decay_fraction: float = 0.2
  weight_decay: float = 0.1
  eval_every: int = 0                    # teacher validation (best checkpoint) every N steps; 0 = per epoch
  checkpoint_every: int = 50             # training checkpoints (resume after a kill) every N steps
  eval_batch_size: int = 64
  eval_sequences: int = 0                # validate (select checkpoints) on the first N only; 0 = all
  dtype: str = "float32"
  mesh: str = ""                         # e.g. "data=1,fsdp=8,tensor=1"; "" = all devices on data
  embedding_map: str = "umap"            # embedding_map.png: umap (umap-learn), pca, or none
  knn_k: int = 3                         # the k of the k-NN precision / recall
  attention: str = "einsum"              # LlamaConfig.attention in training: einsum, dot_product, cudnn
  remat: str = "none"                    # LlamaConfig.remat of trained models: none, layer, dots

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["temperatures"] = list(self.temperatures)
    d["students"] = list(self.students)
    d["student_learning_rates"] = list(self.student_learning_rates)
    d["knob_values"] = list(self.knob_values)
    return d

  @property
  def student_sequences(self) -> int:
    """The training sequences every student sees per epoch, whatever its kind."""
    return self.student_num_train or self.num_train

  @property
  def student_steps(self) -> int:
    """Every student's optimizer steps (matched budgets: one number for every kind)."""
    return self.student_epochs * (self.student_sequences // self.batch_size)

  @property
  def seeds(self) -> list[int]:
    return [self.seed + i for i in range(self.num_seeds)]

  @property
  def knobs(self) -> list[str]:
    """The teacher's knobs this run sweeps: temperature (--temperatures) always, and
    --teacher_knob (--knob_values) when it is a truncation."""
    return ["temperature"] + ([self.teacher_knob] if self.teacher_knob != "temperature" else [])

  def knob_values_of(self, knob: str) -> tuple:
    return self.temperatures if knob == "temperature" else self.knob_values

  def student_runs(self) -> list[tuple[str, str]]:
    """[(kind, knob)]: one training run per kind and knob (its students vmapped over the knob's
    values), in --students order, the temperature run first; direct has one run."""
    return [(kind, knob) for kind in self.students
            for knob in (self.knobs if kindlib.get(kind).per_temperature else ["temperature"])]

  def student_groups(self) -> list[tuple[str, list[tuple[str, Optional[float]]]]]:
    """[(kind, [(name, value)])] of every training run (student_runs: a kind appears once per
    knob), in --students order; direct has the one student ('direct', None)."""
    return [(kind, [(n, v) for n, v, _ in self.student_grid(kind, knob)])
            for kind, knob in self.student_runs()]

  def student_grid(self, kind: str, knob: str = "temperature"
                   ) -> list[tuple[str, Optional[float], Optional[float]]]:
    """[(name, knob value (T for temperature), learning rate or None)] of a kind's students
    under a knob, in their run's vmapped order."""
    return kindlib.get(kind).grid(self.knob_values_of(knob), self.student_learning_rates, knob)

  @property
  def lr_sweep(self) -> bool:
    return len(self.student_learning_rates) > 1

  @property
  def scores_chosen_only(self) -> bool:
    """With a sweep and --score_rates=chosen, only each (kind, T, seed)'s chosen student is
    sampled and scored; every rate's student is still measured on p*'s select split."""
    return self.lr_sweep and self.score_rates == "chosen"

  def num_scored(self, candidates: int) -> int:
    """How many of a group's `candidates` students (every rate of its values) are scored."""
    return candidates // len(self.student_learning_rates) if self.scores_chosen_only else candidates

  def student_names(self) -> list[str]:
    """Every student's name: 'direct' and '<kind>_T<t>' per kind and temperature, in flag order."""
    return [name for _, group in self.student_groups() for name, _ in group]


EMBEDDING_MAPS = ("umap", "pca", "none")
SEED_SCOPES = ("students", "teacher", "all")
SCORE_RATES = ("chosen", "all")


def kd_name(temperature: float) -> str:
  """The sequence-level KD student's name at a temperature."""
  return student_name("seqkd", temperature)


def validate(cfg: StudyConfig) -> None:
  """Every flag's range, with a one-line error naming the flag."""
  require(len(cfg.temperatures) > 0, "--temperatures: give at least one temperature")
  for t in cfg.temperatures:
    require(math.isfinite(t) and t > 0, f"--temperatures: {t:g} is not a positive temperature")
  require(len(set(kd_name(t) for t in cfg.temperatures)) == len(cfg.temperatures),
          "--temperatures: a temperature is repeated")
  _validate_knob(cfg)
  require(len(cfg.students) > 0, "--students: give at least one student kind")
  for kind in cfg.students:
    kindlib.get(kind)  # a one-line error naming the known kinds
  require(len(set(cfg.students)) == len(cfg.students), "--students: a kind is repeated")
  for name in ("num_seeds", "num_train", "num_val", "num_select", "teacher_num_train",
               "teacher_num_val", "num_eval_samples", "max_new_tokens", "sample_batch_size",
               "shard_size", "batch_size", "eval_batch_size"):
    require(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
  require(cfg.seed >= 0, f"--seed={cfg.seed}: must be >= 0")
  for name in ("eval_every", "checkpoint_every"):
    require(getattr(cfg, name) >= 0, f"--{name}={getattr(cfg, name)}: must be >= 0")
  for name in ("teacher_epochs", "student_epochs"):
    require(getattr(cfg, name) >= 1, f"--{name}={getattr(cfg, name)}: must be >= 1")
  require(cfg.num_train >= cfg.batch_size and cfg.teacher_num_train >= cfg.batch_size,
          f"--batch_size={cfg.batch_size}: more than --num_train or --teacher_num_train sequences")
  require(cfg.student_num_train >= 0, f"--student_num_train={cfg.student_num_train}: must be "
          ">= 0 (0: --num_train)")
  require(cfg.student_sequences >= cfg.batch_size, f"--student_num_train="
          f"{cfg.student_num_train}: fewer than one --batch_size={cfg.batch_size} batch")
  require(math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0,
          f"--learning_rate={cfg.learning_rate}: must be a positive number")
  require(0 <= cfg.warmup_fraction < 1, f"--warmup_fraction={cfg.warmup_fraction}: must be in [0, 1)")
  require(0 <= cfg.decay_fraction <= 1, f"--decay_fraction={cfg.decay_fraction}: must be in [0, 1]")
  require(cfg.warmup_fraction + cfg.decay_fraction <= 1,
          "--warmup_fraction + --decay_fraction must be <= 1")
  require(cfg.weight_decay >= 0, f"--weight_decay={cfg.weight_decay}: must be >= 0")
  for r in cfg.student_learning_rates:
    require(math.isfinite(r) and r > 0, f"--student_learning_rates: {r:g} is not a positive rate")
  require(len(set(cfg.student_learning_rates)) == len(cfg.student_learning_rates),
          "--student_learning_rates: a rate is repeated")
  _validate_choices(cfg)
  require(cfg.knn_k >= 1, f"--knn_k={cfg.knn_k}: must be >= 1")
  require(cfg.eval_sequences >= 0, f"--eval_sequences={cfg.eval_sequences}: must be >= 0 (0: all)")
  require(cfg.eval_sequences <= cfg.num_select, f"--eval_sequences={cfg.eval_sequences}: more "
          f"than the {cfg.num_select} --num_select sequences the teacher is selected on")
  require(bool(cfg.prompt), "--prompt: must not be empty")
  for name in ("ground_truth", "teacher", "student"):
    spec = getattr(cfg, name)
    require(":" in spec,
            f"--{name}={spec!r}: expected gguf:PATH, hf:DIR, ckpt:DIR or preset:NAME[@SEED]")
  for name in ("teacher", "student"):
    require(getattr(cfg, name).startswith("preset:"),
            f"--{name}={getattr(cfg, name)!r}: the study trains from scratch; give "
            "preset:NAME[@SEED]")


def _validate_choices(cfg: StudyConfig) -> None:
  """The flags that take one of a few names."""
  for name, choices in (("score_rates", SCORE_RATES), ("seed_scope", SEED_SCOPES),
                        ("embedding_map", EMBEDDING_MAPS), ("remat", REMAT_POLICIES),
                        ("attention", ATTENTION_IMPLS), ("dtype", ("float32", "bfloat16"))):
    require(getattr(cfg, name) in choices,
            f"--{name}={getattr(cfg, name)!r}: one of {', '.join(choices)}")


def _validate_knob(cfg: StudyConfig) -> None:
  """--teacher_knob and --knob_values (kdjax.llm.model.truncation)."""
  knob, values = cfg.teacher_knob, cfg.knob_values
  require(knob in truncation.KNOBS,
          f"--teacher_knob={knob!r}: one of {', '.join(truncation.KNOBS)}")
  if knob == "temperature":
    require(not values, "--knob_values: for --teacher_knob=temperature give --temperatures")
    return
  require(len(values) > 0, f"--teacher_knob={knob}: give its values in --knob_values")
  require(len(set(values)) == len(values), "--knob_values: a value is repeated")
  if knob == "top_k":
    require(all(float(v).is_integer() and v >= 1 for v in values),
            f"--knob_values={','.join(f'{v:g}' for v in values)}: every k must be a whole "
            "number >= 1")
  else:
    require(all(0 < v <= 1 for v in values), f"--knob_values="
            f"{','.join(f'{v:g}' for v in values)}: every {knob} must be in (0, 1]")
  for kind in cfg.students:
    require(kindlib.get(kind).objective != "rkl", f"--students: {kind} with --teacher_knob="
            f"{knob}: reverse KL to a truncated teacher is infinite (the student's mass on the "
            "cut tokens); use srkl, jsd, skl, tvd or fkl")


def config_from_dict(d: dict[str, Any]) -> StudyConfig:
  d = dict(d)
  d["temperatures"] = tuple(d.get("temperatures", StudyConfig.temperatures))
  d["students"] = tuple(d.get("students", StudyConfig.students))
  d["student_learning_rates"] = tuple(d.get("student_learning_rates", ()))
  d["knob_values"] = tuple(d.get("knob_values", ()))
  return StudyConfig(**d)
