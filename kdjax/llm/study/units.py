"""The SmolLM2 study's units of work, each with one owner: its directory, its key, its random stream.

A unit (a dataset, a training run, a student's scores) lives in its own directory under the workdir,
named relative to it, with KEY.json: the digest of everything its output depends on (`what`): its
settings, the keys of its inputs (a chain, so a changed p* sample invalidates the teacher, its
samples, the students and their scores, and a changed --num_eval_samples only the scores), the
random stream it draws from, and the version of what its stage computes. A unit is
  * done when it holds DONE.json and its KEY.json is the key the current flags give;
  * resumed when its KEY.json matches but DONE.json is missing (a killed run: shards, checkpoints);
  * stale otherwise (another key, or none: an older layout), and then removed before it runs again.
So a rerun with changed --students, --num_seeds or scoring flags reuses the p* samples, the teacher
and the teacher's samples, and runs only what changed; no --overwrite is needed.

What a unit leaves on disk and how its outputs are checked: kdjax/llm/study/records.py.

Identity by name: a sampling unit's stream is a fold_in chain from the seed whose indices name it
(split, temperature, student name), and every student of a seed is trained with the seed's common
random numbers (kdjax.llm.train.config.TrainConfig.common_random_numbers: the same initialisation
and data order whatever its kind or temperature), so adding or reordering temperatures or kinds
leaves every other unit as it was.

VERSIONS: bump a stage's number whenever what it computes changes (a new sampler, another loss,
another initialisation): every workdir's units of that stage (and, through the key chain, everything
downstream) are then redone rather than reused with other semantics. Flags that change no number
(--checkpoint_every: only where a killed run resumes from) are in no key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Optional

from kdjax import cli
from kdjax.llm.model.embeddings import EMBEDDING
from kdjax.llm.study import inputs, kinds
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.study.kinds import TEACHER_SAMPLES
from kdjax.llm.study.layout import Layout
from kdjax.llm.study.records import read_record, status
from kdjax.llm.weights import digest as weight_digest

STAGES = ("1_sample_ground_truth", "2_train_teacher", "3_sample_teacher", "4_train_students",
          "5_score_students")
SPLITS = ("train", "val", "select")  # p*'s splits; a split's index names its random stream

# What each stage computes, versioned (see the module docstring). 2: the version field itself
# (keys before it had none); students 2: common random numbers (identity by seed, not position);
# samples 3: rows drawn in chunks of --sample_batch_size per device (kdjax.llm.model.sample_rows);
# selection 1: the students' select-split log-likelihoods, apart from their scores (--score_rates);
# samples 4: the sampler's programs changed on CPU (output-major kernels, keys as the scores dot's
# left operand, 64-slot KV blocks): the same distribution, rows that differ where a draw sits
# within rounding of a boundary.
# Not versioned: changes that only round differently, as another compiler release does (the fused
# heads' chunks sized by the platform, head_nll.chunk_rows: on CPU the same programs as before).
VERSIONS = {"pstar": 4, "teacher": 2, "teacher_samples": 4, "students": 2, "student_samples": 4,
            "pstar_embeddings": 2, "scores": 2, "teacher_entropy": 1, "selection": 1}

# fold_in tags of the sampling streams: seed_key(seed, tag, ...)
PSTAR_STREAM, TEACHER_STREAM, STUDENT_STREAM = 0, 2, 3


def digest(obj) -> str:
  """A short stable digest of a JSON-able object (sorted keys, so dict order does not matter)."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def stable_id(text: str) -> int:
  """A stable non-negative int32 of a name (a fold_in index that does not move when the flags
  list names in another order or add some)."""
  return zlib.crc32(text.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class Unit:
  """One unit of work. `rel`: its directory relative to the workdir; `what`: everything its output
  depends on (digested into its key); `stream`: its random stream (seed, tag, index, ...), part of
  `what`; `args`: what its stage function takes after the directory."""
  stage: str
  rel: str
  what: dict
  args: tuple = ()

  @property
  def key(self) -> str:
    return digest(self.what)

  @property
  def stream(self) -> tuple:
    return tuple(self.what.get("stream", ()))

  def dir(self, workdir: str) -> str:
    return os.path.join(workdir, self.rel)


def num_reference(cfg: StudyConfig) -> int:
  """p*'s reference set for the sample-based measures and the map: as many of its validation
  samples as each student has samples (k-NN precision and recall compare sets of one size)."""
  return min(cfg.num_val, cfg.num_eval_samples)


# ----------------------------------------------------------------------------- the units


def model_digests(cfg: StudyConfig) -> dict:
  """The content digests (kdjax.llm.weights.digest) of the study's model files: the ground truth
  and a tokenizer given by its own spec. A spec whose files are not on this machine (a dry run
  planning elsewhere) stands for itself."""
  out = {}
  for name in ("ground_truth", "tokenizer"):
    spec = inputs.resolve_spec(getattr(cfg, name))
    if spec in ("", "bytes"):
      continue
    try:
      out[name] = weight_digest.spec_digest(spec)
    except cli.UserError:
      out[name] = spec
  return out


class StudyUnits:
  """Every unit of a study configuration, from the flags and the model files' digests (no model
  is loaded: the dry run uses this to say what is cached)."""

  def __init__(self, cfg: StudyConfig, digests: Optional[dict] = None):
    self.cfg = cfg
    self.layout = Layout(cfg)
    self.digests = model_digests(cfg) if digests is None else digests

  def _sampling(self) -> dict:
    c = self.cfg
    return {"prompt": c.prompt, "tokenizer": self.digests.get("tokenizer", c.tokenizer),
            "max_new_tokens": c.max_new_tokens,
            "sample_batch_size": c.sample_batch_size, "shard_size": c.shard_size, "dtype": c.dtype}

  def _training(self) -> dict:
    c = self.cfg
    what = {"batch_size": c.batch_size, "learning_rate": c.learning_rate,
            "warmup_fraction": c.warmup_fraction, "decay_fraction": c.decay_fraction,
            "weight_decay": c.weight_decay, "dtype": c.dtype, "mesh": c.mesh,
            "eval_batch_size": c.eval_batch_size}
    if c.attention != "einsum":  # a later flag: in the key only when set
      what["attention"] = c.attention
    if c.remat != "none":  # likewise (recomputation may round differently)
      what["remat"] = c.remat
    return what

  @staticmethod
  def _unit(stage: str, rel: str, unit: str, args: tuple = (), **what) -> Unit:
    return Unit(stage, rel, {"unit": unit, "version": VERSIONS[unit], **what}, args)

  def pstar(self, split: str, seed: Optional[int] = None) -> Unit:
    """p*'s samples of a split that seed `seed`'s units read (the study's seed by default)."""
    c = self.cfg
    s = self.layout.pstar_seed(c.seed if seed is None else seed)
    n = {"train": c.num_train, "val": c.num_val, "select": c.num_select}[split]
    return self._unit("1_sample_ground_truth", self.layout.pstar(split, s), "pstar", (n,),
                      ground_truth=self.digests.get("ground_truth", c.ground_truth),
                      seed=s, split=split, num=n, sampling=self._sampling(),
                      stream=[s, PSTAR_STREAM, SPLITS.index(split)])

  def teacher(self, seed: Optional[int] = None) -> Unit:
    """The teacher seed `seed`'s units read (trained with its teacher seed, Layout)."""
    c = self.cfg
    s = self.layout.teacher_seed(c.seed if seed is None else seed)
    extra = {"eval_sequences": c.eval_sequences} if c.eval_sequences else {}
    return self._unit("2_train_teacher", self.layout.teacher(s), "teacher", (s,),
                      teacher=c.teacher, seed=s, epochs=c.teacher_epochs,
                      eval_every=c.eval_every, train=self.pstar("train", s).key,
                      select=self.pstar("select", s).key, training=self._training(), **extra)

  def teacher_samples(self, seed: int, t: float, split: str, knob: str = "temperature") -> Unit:
    """The teacher's samples at T, or under a truncation knob at its value t (T = 1): another
    stream, directory and key (`knob`, `knob_value`) than any temperature's."""
    c = self.cfg
    n = c.teacher_num_train if split == "train" else c.teacher_num_val
    label = kinds.setting_label(t, knob)
    stream = [seed, TEACHER_STREAM, stable_id(label), ("train", "val").index(split)]
    setting = ({"temperature": t} if knob == "temperature" else
               {"temperature": 1.0, "knob": knob, "knob_value": t})
    return self._unit("3_sample_teacher", self.layout.teacher_samples(seed, t, split, knob),
                      "teacher_samples", (seed, n, t, f"teacher {label} {split} seed {seed}", knob),
                      teacher=self.teacher(seed).key, seed=seed, **setting, split=split,
                      num=n, sampling=self._sampling(), stream=stream)

  def students(self, seed: int, kind: str, knob: str = "temperature") -> Unit:
    """One kind's training run of a seed under a knob (all its values: they train together)."""
    c, k = self.cfg, kinds.get(kind)
    what = {"kind": kind, "student": c.student, "seed": seed, "steps": c.student_steps,
            "training": self._training()}
    values = c.knob_values_of(knob)
    if knob != "temperature":
      what["knob"] = knob
    if k.data == TEACHER_SAMPLES:
      what["data"] = [self.teacher_samples(seed, t, "train", knob).key for t in values]
    else:
      what["data"] = self.pstar("train", seed).key
    if k.distills_tokens:
      what["teacher"] = self.teacher(seed).key
      what["temperatures" if knob == "temperature" else "knob_values"] = list(values)
    if c.lr_sweep:
      what["learning_rates"] = list(c.student_learning_rates)
    if k.onpolicy:
      what["sampling"] = self._sampling()
    return self._unit("4_train_students", self.layout.students(seed, kind, knob), "students",
                      (seed, kind, knob), **what)

  def student_samples(self, seed: int, kind: str, name: str, knob: str = "temperature") -> Unit:
    c = self.cfg
    return self._unit("5_score_students", self.layout.student_samples(seed, name),
                      "student_samples",
                      students=self.students(seed, kind, knob).key, name=name,
                      num=c.num_eval_samples, sampling=self._sampling(),
                      stream=[seed, STUDENT_STREAM, stable_id(name)])

  def pstar_embeddings(self, seed: Optional[int] = None) -> Unit:
    """The embeddings of p*'s reference samples: the first num_reference(cfg) of its val split."""
    c = self.cfg
    s = self.layout.pstar_seed(c.seed if seed is None else seed)
    return self._unit("5_score_students", self.layout.pstar_embeddings(s), "pstar_embeddings",
                      ("pstar_val", s), val=self.pstar("val", s).key, num=num_reference(c),
                      eval_batch_size=c.eval_batch_size, embedding=EMBEDDING)

  def teacher_entropy(self, seed: int, value: float, knob: str = "temperature") -> Unit:
    """The mean per-token entropy of the teacher seed `seed`'s units read, on p*'s select split,
    under a knob's value (kdjax.llm.study.entropy)."""
    c = self.cfg
    s = self.layout.teacher_seed(seed)
    return self._unit("5_score_students", self.layout.teacher_entropy(s, value, knob),
                      "teacher_entropy", ("teacher_entropy", s, value, knob),
                      teacher=self.teacher(s).key, select=self.pstar("select", s).key,
                      knob=knob, value=value, eval_batch_size=c.eval_batch_size)

  def scores(self, seed: int, kind: str, j: int, name: str, t: Optional[float],
             knob: str = "temperature") -> Unit:
    """A student's precision, recall, validation perplexity and its samples' embeddings (j: its
    index among its run's students, whose checkpoints the training run lists in that order)."""
    c = self.cfg
    what = {"samples": self.student_samples(seed, kind, name, knob).key,
            "val": self.pstar("val", seed).key,
            "eval_batch_size": c.eval_batch_size, "embedding": EMBEDDING}
    if kinds.get(kind).held_out == TEACHER_SAMPLES:
      what["own_val"] = self.teacher_samples(seed, t, "val", knob).key
    return self._unit("5_score_students", self.layout.scores(seed, name), "scores",
                      ("student", seed, kind, j, name, t, knob), **what)

  def selection(self, seed: int, kind: str, knob: str = "temperature") -> Unit:
    """A training run's students (every value and rate of a --student_learning_rates sweep)
    measured on p*'s select split: DONE.json holds each one's log-likelihood and the chosen
    student of each value (stats.best_per_group), whose rate the study reports."""
    c = self.cfg
    return self._unit("5_score_students", self.layout.selection(seed, kind, knob), "selection",
                      ("selection", seed, kind, knob), students=self.students(seed, kind, knob).key,
                      select=self.pstar("select", seed).key, eval_batch_size=c.eval_batch_size)

  def chosen(self, seed: int, kind: str, knob: str, workdir: Optional[str]) -> Optional[list]:
    """The names a run's selection chose, when that unit is done in `workdir` for its key
    (its outputs checked); None before (or without a workdir)."""
    unit = self.selection(seed, kind, knob)
    if workdir is None or status(unit, workdir)[0] != "cached":
      return None
    return list(read_record(unit.dir(workdir))["chosen"])

  def _scored(self, seed: int, kind: str, knob: str, workdir: Optional[str]) -> list[Unit]:
    """The scores units of a run: every student's, or with --score_rates=chosen the chosen
    students' once its selection is done (none before: listed then, see pending_scores)."""
    grid = list(enumerate(self.cfg.student_grid(kind, knob)))
    if self.cfg.scores_chosen_only:
      chosen = self.chosen(seed, kind, knob, workdir) or []
      grid = [(j, g) for j, g in grid if g[0] in chosen]
    return [self.scores(seed, kind, j, name, t, knob) for j, (name, t, _) in grid]

  def pending_scores(self, workdir: Optional[str]) -> int:
    """Scores units by_stage cannot list yet: the chosen students of runs not yet selected."""
    c = self.cfg
    if not c.scores_chosen_only:
      return 0
    return sum(c.num_scored(len(c.student_grid(kind, knob)))
               for seed in c.seeds for kind, knob in c.student_runs()
               if self.chosen(seed, kind, knob, workdir) is None)

  def by_stage(self, workdir: Optional[str] = None) -> dict[str, list[Unit]]:
    """Every unit of every stage, in the order the stages run them. With --score_rates=chosen a
    run's scores follow its selection (done in `workdir`): a study lists them again after it."""
    c = self.cfg
    out = {name: [] for name in STAGES}
    pstar_seeds = sorted({self.layout.pstar_seed(s) for s in c.seeds})
    out["1_sample_ground_truth"] = [self.pstar(split, s) for s in pstar_seeds for split in SPLITS]
    out["2_train_teacher"] = [self.teacher(s) for s in
                              sorted({self.layout.teacher_seed(s) for s in c.seeds})]
    out["5_score_students"] += [self.pstar_embeddings(s) for s in pstar_seeds]
    out["5_score_students"] += [self.teacher_entropy(s, v, knob) for s in
                                sorted({self.layout.teacher_seed(s) for s in c.seeds})
                                for knob in c.knobs for v in c.knob_values_of(knob)]
    seqkd = any(kinds.get(k).data == TEACHER_SAMPLES for k in c.students)
    for seed in c.seeds:
      for knob in (c.knobs if seqkd else ()):  # seqkd's data only
        out["3_sample_teacher"] += [self.teacher_samples(seed, t, s, knob)
                                    for t in c.knob_values_of(knob) for s in ("train", "val")]
      for kind, knob in c.student_runs():
        out["4_train_students"].append(self.students(seed, kind, knob))
        if c.lr_sweep:
          out["5_score_students"].append(self.selection(seed, kind, knob))
        out["5_score_students"] += self._scored(seed, kind, knob, workdir)
    return out
