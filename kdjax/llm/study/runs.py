"""The study's training runs: the kdjax.llm.train TrainConfig of the teacher and of each student
kind of a seed, read from the kinds table (kdjax/llm/study/kinds.py).

Every student of a seed trains with the seed's common random numbers (the same initialisation and
data order whatever its kind or temperature: TrainConfig.common_random_numbers), so a student's
identity is (seed, kind, temperature), never its position in --temperatures or --students.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

from kdjax.llm.study import kinds, units
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.study.kinds import OWN_SAMPLES, TEACHER_SAMPLES
from kdjax.llm.train.config import TrainConfig


class RunInputs(NamedTuple):
  """What the training runs need beyond the flags: the workdir and the tokenized prompt."""
  cfg: StudyConfig
  workdir: str
  prompt: tuple
  eos_id: Optional[int]

  @property
  def seq_len(self) -> int:
    return len(self.prompt) + self.cfg.max_new_tokens

  def path(self, rel: str) -> str:
    return os.path.join(self.workdir, rel)


def train_config(cfg: StudyConfig, model: str, train_dirs, val_dir: str, epochs: int, seed: int,
                 seq_len: int, **distill) -> TrainConfig:
  """The TrainConfig of one of the study's training runs: `model` from scratch on `train_dirs`
  (several: trained together, vmapped); with `val_dir`, the kept checkpoint is the one of best
  perplexity on it (evaluated every --eval_every steps, default once per epoch), without, the final
  parameters. `distill`: the TrainConfig fields of a student (teacher, objective,
  teacher_temperatures, onpolicy, prompt, max_new_tokens, eos_id, steps, common_random_numbers)."""
  eval_every = cfg.eval_every or cfg.num_train // cfg.batch_size
  return TrainConfig(
      model=model, train_data=tuple(train_dirs), val_data=val_dir or "",
      batch_size=cfg.batch_size, seq_len=seq_len, epochs=0 if distill.get("steps") else epochs,
      lr=cfg.learning_rate, warmup_frac=cfg.warmup_fraction, decay_frac=cfg.decay_fraction,
      weight_decay=cfg.weight_decay, dtype=cfg.dtype, mesh=cfg.mesh, attention=cfg.attention,
      remat=cfg.remat, eval_every=eval_every if val_dir else 0,
      eval_batch_size=cfg.eval_batch_size, eval_sequences=cfg.eval_sequences if val_dir else 0,
      checkpoint_every=cfg.checkpoint_every, seed=seed, **distill)


def teacher_run(ri: RunInputs, seed: int) -> TrainConfig:
  """The teacher trained with `seed` (units.Layout.teacher_seed): from scratch on p*'s train
  split, its best checkpoint on the select split."""
  cfg, layout = ri.cfg, units.Layout(ri.cfg)
  return train_config(cfg, cfg.teacher, [ri.path(layout.pstar("train", layout.pstar_seed(seed)))],
                      ri.path(layout.pstar("select", layout.pstar_seed(seed))),
                      cfg.teacher_epochs, seed, ri.seq_len)


def student_run(ri: RunInputs, seed: int, kind: str, teacher_spec: str,
                knob: str = "temperature") -> TrainConfig:
  """One kind's students of a seed (kinds.KINDS): on p*'s train set, on the teacher's samples at
  each temperature, or on their own samples; distilling kinds against the teacher's next-token
  distribution at each T. Every kind trains cfg.student_steps steps of --batch_size sequences
  (matched budgets). Its students (one per T, and per rate of a --student_learning_rates sweep,
  cfg.student_grid's order) train vmapped in one run with the seed's common random numbers.
  Under a truncation `knob` its values stand for the temperatures: seqkd reads the teacher's
  samples drawn with the knob, the token-level kinds its truncated target (teacher_knob)."""
  cfg, k, layout = ri.cfg, kinds.get(kind), units.Layout(ri.cfg)
  grid = cfg.student_grid(kind, knob)
  extra = {"steps": cfg.student_steps}  # matched budgets: every kind the same steps
  if len(grid) > 1:
    extra["common_random_numbers"] = True
  if cfg.lr_sweep:
    extra["learning_rates"] = tuple(lr for _, _, lr in grid)
  if k.distills_tokens:
    extra.update(teacher=teacher_spec, teacher_temperatures=tuple(t for _, t, _ in grid),
                 objective=k.objective)
    if knob != "temperature":
      extra["teacher_knob"] = knob
  pstar_train = ri.path(layout.pstar("train", layout.pstar_seed(seed)))
  if k.data == TEACHER_SAMPLES:
    data = [ri.path(layout.teacher_samples(seed, t, "train", knob)) for _, t, _ in grid]
  elif k.data == OWN_SAMPLES:  # GKD's lambda < 1: the rest of each batch is p*'s sequences
    data = [pstar_train] if k.student_fraction < 1 else []
    extra.update(onpolicy=True, prompt=tuple(ri.prompt), max_new_tokens=cfg.max_new_tokens,
                 eos_id=-1 if ri.eos_id is None else int(ri.eos_id))
    if k.student_fraction < 1:
      extra["student_data_fraction"] = k.student_fraction
  else:  # one shared p* set: token-level students share its batches; direct's sweep repeats it
    data = [pstar_train] * (1 if k.distills_tokens else len(grid))
  return train_config(cfg, cfg.student, data, "", cfg.student_epochs, seed, ri.seq_len, **extra)


def training_runs(ri: RunInputs, teacher_spec: Optional[str] = None) -> dict[str, list]:
  """{stage: [TrainConfig]} of the teacher and of every student kind per seed. teacher_spec: the
  teacher the distilling students read (its checkpoint; the --teacher preset when checking inputs
  before the teacher exists)."""
  cfg, layout = ri.cfg, units.Layout(ri.cfg)
  teacher_spec = teacher_spec or cfg.teacher
  teachers = sorted({layout.teacher_seed(s) for s in cfg.seeds})
  return {"2_train_teacher": [teacher_run(ri, s) for s in teachers],
          "4_train_students": [student_run(ri, seed, kind, teacher_spec, knob)
                               for seed in cfg.seeds for kind, knob in cfg.student_runs()]}
