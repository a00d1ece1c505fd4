"""The SmolLM2 study's workdir as a cache of stage outputs, keyed by what each output depends on.

Every unit of work (a dataset, a training run, a student's scores) lives in its own directory with
KEY.json: the digest of everything its output depends on, the keys of its inputs included (a chain,
so a changed p* sample invalidates the teacher, its samples, the students and their scores, and a
changed --num_eval_samples only the scores). A unit is
  * done when it holds DONE.json and its KEY.json is the key the current flags give;
  * resumed when its KEY.json matches but DONE.json is missing (a killed run: shards, checkpoints);
  * stale otherwise (another key, or none: an older layout), and then removed before it runs again.
So a rerun with changed --students, --num_seeds or scoring flags reuses the p* samples, the teacher
and the teacher's samples, and runs only what changed; no --overwrite is needed.

`StudyKeys` spells out the dependencies; flags that change no number (--checkpoint_every: only
where a killed run resumes from) are not in any key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from typing import Optional

from kdjax import cli
from kdjax.llm.model.embeddings import EMBEDDING
from kdjax.llm.study.plan import ONPOLICY_KINDS, TOKEN_KINDS, StudyConfig

KEY = "KEY.json"
DONE = "DONE.json"


def digest(obj) -> str:
  """A short stable digest of a JSON-able object (sorted keys, so dict order does not matter)."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def stable_id(text: str) -> int:
  """A stable non-negative int32 of a name (a fold_in index that does not move when the flags
  list names in another order or add some)."""
  return zlib.crc32(text.encode()) & 0x7FFFFFFF


def read_key(path: str) -> Optional[dict]:
  try:
    return cli.read_json(os.path.join(path, KEY))
  except (OSError, ValueError):
    return None


def is_current(path: str, key: str) -> bool:
  """The unit at `path` is done for `key`."""
  k = read_key(path)
  return (k is not None and k.get("key") == key and os.path.exists(os.path.join(path, DONE)))


def status(path: str, key: str) -> str:
  """'cached', 'resume' (same key, not done: a killed run's partial output), or 'run'."""
  k = read_key(path)
  if k is None or k.get("key") != key:
    return "run"
  return "cached" if os.path.exists(os.path.join(path, DONE)) else "resume"


def claim(path: str, key: str, what: dict) -> None:
  """Make `path` the unit for `key`: a directory of another key (or without one) is removed first,
  then KEY.json records the key and what it was computed from (for people reading the workdir)."""
  k = read_key(path)
  if os.path.isdir(path) and (k is None or k.get("key") != key):
    shutil.rmtree(path)
  if k is None or k.get("key") != key:
    os.makedirs(path, exist_ok=True)
    cli.atomic_write_json(os.path.join(path, KEY), {"key": key, "depends_on": what})


def num_reference(cfg: StudyConfig) -> int:
  """p*'s reference set for the sample-based measures and the map: as many of its validation
  samples as each student has samples (k-NN precision and recall compare sets of one size)."""
  return min(cfg.num_val, cfg.num_eval_samples)


class StudyKeys:
  """The key of every unit of a study configuration (pure functions of the flags)."""

  def __init__(self, cfg: StudyConfig):
    self.cfg = cfg

  def _sampling(self) -> dict:
    c = self.cfg
    return {"prompt": c.prompt, "tokenizer": c.tokenizer, "max_new_tokens": c.max_new_tokens,
            "sample_batch_size": c.sample_batch_size, "shard_size": c.shard_size, "dtype": c.dtype}

  def _training(self) -> dict:
    c = self.cfg
    what = {"batch_size": c.batch_size, "learning_rate": c.learning_rate,
            "warmup_fraction": c.warmup_fraction, "decay_fraction": c.decay_fraction,
            "weight_decay": c.weight_decay, "dtype": c.dtype, "mesh": c.mesh,
            "eval_batch_size": c.eval_batch_size}
    if c.attention != "einsum":  # a later flag: in the key only when set (older keys unchanged)
      what["attention"] = c.attention
    if c.remat != "none":  # likewise (recomputation may round differently)
      what["remat"] = c.remat
    return what

  def _keyed(self, what: dict) -> tuple[str, dict]:
    return digest(what), what

  def pstar(self, split: str) -> tuple[str, dict]:
    c = self.cfg
    n = {"train": c.num_train, "val": c.num_val, "select": c.num_select}[split]
    return self._keyed({"unit": "pstar", "ground_truth": c.ground_truth, "seed": c.seed,
                        "split": split, "num": n, "sampling": self._sampling()})

  def teacher(self) -> tuple[str, dict]:
    c = self.cfg
    what = {"unit": "teacher", "teacher": c.teacher, "seed": c.seed,
            "epochs": c.teacher_epochs, "eval_every": c.eval_every,
            "train": self.pstar("train")[0], "select": self.pstar("select")[0],
            "training": self._training()}
    if c.eval_sequences:  # a later flag: in the key only when set (older keys unchanged)
      what["eval_sequences"] = c.eval_sequences
    return self._keyed(what)

  def teacher_samples(self, seed: int, t: float, split: str) -> tuple[str, dict]:
    c = self.cfg
    n = c.teacher_num_train if split == "train" else c.teacher_num_val
    return self._keyed({"unit": "teacher_samples", "teacher": self.teacher()[0], "seed": seed,
                        "temperature": t, "split": split, "num": n, "sampling": self._sampling()})

  def students(self, seed: int, kind: str) -> tuple[str, dict]:
    """One kind's training run (all its temperatures: they train together)."""
    c = self.cfg
    what = {"unit": "students", "kind": kind, "student": c.student, "seed": seed,
            "epochs": c.student_epochs, "training": self._training()}
    if kind == "seqkd":
      what["data"] = [self.teacher_samples(seed, t, "train")[0] for t in c.temperatures]
    else:
      what["data"] = self.pstar("train")[0]
    if kind in TOKEN_KINDS or kind in ONPOLICY_KINDS:
      what["teacher"] = self.teacher()[0]
      what["temperatures"] = list(c.temperatures)
    if kind in ONPOLICY_KINDS:
      what["sampling"] = self._sampling()
    return self._keyed(what)

  def student_samples(self, seed: int, kind: str, name: str) -> tuple[str, dict]:
    c = self.cfg
    return self._keyed({"unit": "student_samples", "students": self.students(seed, kind)[0],
                        "name": name, "num": c.num_eval_samples, "sampling": self._sampling()})

  def pstar_embeddings(self) -> tuple[str, dict]:
    """The embeddings of p*'s reference samples: the first num_reference(cfg) of its val split."""
    c = self.cfg
    return self._keyed({"unit": "pstar_embeddings", "val": self.pstar("val")[0],
                        "num": num_reference(c), "eval_batch_size": c.eval_batch_size,
                        "embedding": EMBEDDING})

  def scores(self, seed: int, kind: str, name: str, t: Optional[float]) -> tuple[str, dict]:
    """A student's precision, recall, validation perplexity and its samples' embeddings."""
    c = self.cfg
    what = {"unit": "scores", "samples": self.student_samples(seed, kind, name)[0],
            "val": self.pstar("val")[0], "eval_batch_size": c.eval_batch_size,
            "embedding": EMBEDDING}
    if kind == "seqkd":
      what["own_val"] = self.teacher_samples(seed, t, "val")[0]
    return self._keyed(what)
