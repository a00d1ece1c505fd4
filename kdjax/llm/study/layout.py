"""Where the study's units live, relative to the workdir (kdjax/llm/study/units.py builds the units
on it): one place for every path, and for which units each seed owns (--seed_scope)."""

from __future__ import annotations

import os
from typing import Optional

from kdjax.llm.study import kinds
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.study.kinds import TEACHER_SAMPLES


class Layout:
  """Where every unit lives, relative to the workdir. --seed_scope says which units each seed
  owns: `students` (p*'s samples, the teacher and p*'s embeddings shared: pstar/, teacher/,
  embeddings/), `teacher` (each seed its own teacher), `all` (each seed its own p* samples too);
  the first seed's keep the shared paths (a wider scope reuses them), another seed's live under
  seed_S/. The teacher's samples, the students and their scores always belong to a seed."""

  def __init__(self, cfg: StudyConfig):
    self.cfg = cfg

  def pstar_seed(self, seed: int) -> int:
    """The seed p*'s samples of a seed's units are drawn with."""
    return seed if self.cfg.seed_scope == "all" else self.cfg.seed

  def teacher_seed(self, seed: int) -> int:
    """The seed the teacher a seed's students read is trained with."""
    return seed if self.cfg.seed_scope in ("teacher", "all") else self.cfg.seed

  def sample_sets_and_teachers(self) -> tuple[int, int]:
    """(p* sample sets, teachers) the study makes over its seeds: one each, or one per seed by
    --seed_scope."""
    seeds = self.cfg.seeds
    return len({self.pstar_seed(s) for s in seeds}), len({self.teacher_seed(s) for s in seeds})

  def _prefix(self, seed: int) -> list:
    """The first seed's shared units stay at the top (so a wider scope reuses them), another
    seed's own units live under seed_S/."""
    return [] if seed == self.cfg.seed else [f"seed_{seed}"]

  def pstar(self, split: str, seed: int) -> str:
    """p*'s samples drawn with `seed` (a Layout.pstar_seed)."""
    return os.path.join(*self._prefix(seed), "pstar", split)

  def teacher(self, seed: int) -> str:
    """The teacher trained with `seed` (a Layout.teacher_seed)."""
    return os.path.join(*self._prefix(seed), "teacher")

  def pstar_embeddings(self, seed: int) -> str:
    return os.path.join(*self._prefix(seed), "embeddings", "pstar_val")

  def teacher_entropy(self, seed: int, value: float, knob: str = "temperature") -> str:
    """The teacher's (trained with `seed`, a Layout.teacher_seed) mean per-token entropy on p*'s
    select split under a knob's value."""
    return os.path.join(*self._prefix(seed), "teacher_entropy", kinds.setting_label(value, knob))

  @staticmethod
  def teacher_samples(seed: int, t: float, split: str, knob: str = "temperature") -> str:
    """The teacher's samples at T (teacher_T<t>), or at a truncation knob's value
    (teacher_topp0.9, ...)."""
    return os.path.join(f"seed_{seed}", f"teacher_{kinds.setting_label(t, knob)}", split)

  @staticmethod
  def students(seed: int, kind: str, knob: str = "temperature") -> str:
    """A kind's training run (its students at every temperature: students/KIND), or under a
    truncation knob (students/KIND_top_p, ...)."""
    return os.path.join(f"seed_{seed}", "students",
                        kind if knob == "temperature" else f"{kind}_{knob}")

  @staticmethod
  def student_samples(seed: int, name: str) -> str:
    return os.path.join(f"seed_{seed}", "student_samples", name)

  @staticmethod
  def selection(seed: int, kind: str, knob: str = "temperature") -> str:
    """A training run's students measured on p*'s select split (a learning-rate sweep's choice)."""
    return os.path.join(f"seed_{seed}", "selection",
                        kind if knob == "temperature" else f"{kind}_{knob}")

  @staticmethod
  def scores(seed: int, name: str) -> str:
    return os.path.join(f"seed_{seed}", "scores", name)

  def held_out(self, seed: int, kind: str, t: Optional[float], knob: str = "temperature") -> str:
    """A student's validation set (its training distribution's held-out samples,
    kinds.held_out)."""
    if kinds.get(kind).held_out == TEACHER_SAMPLES:
      return self.teacher_samples(seed, t, "val", knob)
    return self.pstar("val", self.pstar_seed(seed))
