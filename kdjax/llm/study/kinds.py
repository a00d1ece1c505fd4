"""The student kinds of the SmolLM2 study, as one table every other module reads.

A kind says where a student's training sequences come from, what it is trained to match, how many
students it has per seed, what its training costs beyond its own forward and backward pass, and
which held-out set measures its fit. The pipeline, the cache keys, the plan and the hardware
estimate all read `KINDS` instead of branching on names.

  direct         p*'s training samples, next-token NLL: the baseline (one student per seed)
  seqkd          the teacher's samples at T, next-token NLL: the paper's sequence-level KD
  fkl ... tvd    p*'s training sequences; at every position the target softmax(teacher logits / T)
                 (student untempered; kdjax.objectives.tokens): token-level KD, one kind per
                 loss of TOKEN_LOSSES (fkl, rkl, jsd, skl, srkl, tvd)
  onpolicy_*     the student's own samples (T = 1, from the prompt) each step, the same target
                 (GKD with student-data fraction 1)
  onpolicy_<loss>@<lambda>  GKD's student-data fraction lambda in [0, 1) (get() parses the name,
                 e.g. onpolicy_fkl@0.5): each batch's first round(lambda B) rows the student's own
                 samples, the rest p*'s training sequences (kdjax.llm.train.batches); lambda 0
                 is token-level KD on p*'s sequences, one teacher forward per student

Every kind but direct also has students under a truncation knob of the teacher when the study
sets --teacher_knob (top_p, min_p, top_k at T = 1; kdjax.llm.model.truncation): named with the
knob's label instead of T (seqkd_topp0.9, fkl_minp0.1, fkl_topk20: setting_label), trained in a
run of their own (StudyConfig.student_runs); rkl-based kinds are refused there (infinite).
"""

from __future__ import annotations

import dataclasses

from kdjax.cli import UserError

# where a kind's training sequences come from
PSTAR, TEACHER_SAMPLES, OWN_SAMPLES = "pstar", "teacher_samples", "own_samples"


@dataclasses.dataclass(frozen=True)
class StudentKind:
  name: str
  data: str                 # PSTAR, TEACHER_SAMPLES (at each T) or OWN_SAMPLES (each step)
  objective: str            # "nll" (maximum likelihood on the data) or a token-level KD loss
  per_temperature: bool     # one student per teacher temperature (all but direct)
  teacher_forwards: int     # teacher forward passes per training batch: 0, 1 (one serves every T)
  #                           or -1 (one per student: each student's own sequences)
  student_fraction: float = 1.0  # on-policy kinds: GKD's lambda, the share of own-sample rows

  @property
  def distills_tokens(self) -> bool:
    """Trained against the teacher's next-token distributions (reads the teacher's weights)."""
    return self.objective != "nll"

  @property
  def onpolicy(self) -> bool:
    return self.data == OWN_SAMPLES

  @property
  def held_out(self) -> str:
    """The held-out samples of its training distribution (validation perplexity): the teacher's
    at T for seqkd; p*'s validation set for every other kind (an on-policy student's data have no
    held-out set: p*'s stands in)."""
    return TEACHER_SAMPLES if self.data == TEACHER_SAMPLES else PSTAR

  def grid(self, temperatures, learning_rates=(), knob: str = "temperature"
           ) -> list[tuple[str, float | None, float | None]]:
    """[(student name, T, learning rate)] in the order its training run vmaps them: T-major
    (under a truncation `knob`, its values stand for the temperatures: names student_name's),
    then each learning rate of a sweep (--student_learning_rates with more than one rate, each
    name suffixed `_lr<rate>`; lr None: --learning_rate). ('direct', None, lr) for direct."""
    temps = list(temperatures) if self.per_temperature else [None]
    lrs = list(learning_rates) if len(learning_rates) > 1 else [None]
    out = []
    for t in temps:
      base = self.name if t is None else student_name(self.name, t, knob)
      out += [(base if lr is None else f"{base}_lr{lr:g}", t, lr) for lr in lrs]
    return out

  def names(self, temperatures, learning_rates=()) -> list[tuple[str, float | None]]:
    """[(student name, T)] of grid()."""
    return [(n, t) for n, t, _ in self.grid(temperatures, learning_rates)]


TOKEN_LOSSES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")

KINDS: dict[str, StudentKind] = {k.name: k for k in (
    StudentKind("direct", PSTAR, "nll", per_temperature=False, teacher_forwards=0),
    StudentKind("seqkd", TEACHER_SAMPLES, "nll", per_temperature=True, teacher_forwards=0),
    *(StudentKind(loss, PSTAR, loss, per_temperature=True, teacher_forwards=1)
      for loss in TOKEN_LOSSES),
    *(StudentKind(f"onpolicy_{loss}", OWN_SAMPLES, loss, per_temperature=True, teacher_forwards=-1)
      for loss in ("fkl", "rkl", "jsd", "srkl")),
)}


def get(name: str) -> StudentKind:
  """The kind called `name`: a row of KINDS, or `onpolicy_<loss>@<lambda>` (an on-policy row with
  GKD's student-data fraction lambda in [0, 1), spelled as f"{lambda:g}"); one-line errors."""
  if name in KINDS:
    return KINDS[name]
  base, at, value = name.partition("@")
  if not at or base not in KINDS or not KINDS[base].onpolicy:
    raise UserError(f"--students: unknown kind {name!r}; known: {', '.join(KINDS)}, and "
                    "onpolicy_<loss>@<lambda> (GKD's student-data fraction)")
  try:
    lam = float(value) + 0.0  # -0 is 0
  except ValueError:
    raise UserError(f"--students: {name!r}: the student-data fraction after @ must be a number "
                    f"in [0, 1), got {value!r}") from None
  if lam == 1:
    raise UserError(f"--students: {name!r} is {base} (student-data fraction 1): name it so")
  if not 0 <= lam < 1:
    raise UserError(f"--students: {name!r}: the student-data fraction must be in [0, 1), "
                    f"got {value}")
  if value != f"{lam:g}":
    raise UserError(f"--students: {name!r}: spell it {base}@{lam:g} (one name per student)")
  return dataclasses.replace(KINDS[base], name=name, student_fraction=lam)


# a knob's label in student and directory names: <kind>_T0.8, <kind>_topp0.9, <kind>_minp0.1, ...
KNOB_LABELS = {"temperature": "T", "top_p": "topp", "min_p": "minp", "top_k": "topk"}


def setting_label(value: float, knob: str = "temperature") -> str:
  """'T0.8', 'topp0.9', 'minp0.1', 'topk20': a knob's value in names."""
  return f"{KNOB_LABELS[knob]}{value:g}"


def student_name(kind: str, temperature: float, knob: str = "temperature") -> str:
  return f"{kind}_{setting_label(temperature, knob)}"
