"""The GMM distillation study: one (seed, beta) configuration as a pure function, the grid by vmap.

Data flow of `run_config` (the paper's protocol, then four more students):
  p* --n_train samples--> teacher (EM, K' components) --sharpen(beta)--> teacher_beta
  students of K'' components:
    direct  EM on the p* training samples (the baseline; does not depend on beta)
    seqkd   EM on n_teacher_samples samples of teacher_beta (the paper's KD)
    fkl     Adam on forward KL(teacher_beta || student), fresh teacher samples each step
    rkl     Adam on reverse KL(student || teacher_beta), reparameterized student samples
    jsd     Adam on the generalized JSD with mixing `jsd_mix`
            (kdjax/gmm/train.py: whitened coordinates, cosine-decayed rate, convergence report)
    exact   (K'' = 1 only) moment matching of teacher_beta: the forward-KL optimum, i.e. seqkd's
            infinite-sample limit
  metrics: precision E_{student}[log p*], recall E_{p*}[log student] with n_eval samples each
  (and their Monte Carlo standard errors); the teacher's weight entropy at beta and its
  differential entropy (Monte Carlo, the same draws at every knob value); per student a
  convergence report (EM's own flag; the gradient students' objective and its change); with
  knn_samples > 0, the sample-based k-NN precision and recall (kdjax.sample_metrics) between the
  first knn_samples of the student's evaluation samples and of p*'s.

The teacher can also be made selective by truncation (issue 22: top_p / top_k of its components,
mx.truncate, after the sharpening): the knob values are array arguments too, laid along the same
axis as the betas (kdjax/gmm/knobs.py), so every knob runs in the one vmapped call.

Everything random comes from jax.random.PRNGKey(seed). The same seed uses the same random numbers at
every beta (common random numbers: curves over beta are smooth, differences are due to beta).
The seed and beta are array arguments; `StudyConfig` (shapes, objective list, optimiser settings)
is static. A configuration splits into `seed_part` (what does not depend on beta: training data,
teacher, direct student, p* evaluation samples, standard draws) and `beta_part`; `run_config` is
their composition. `run_grid` computes the seed parts of all seeds (vmapped), then a `lax.map` over
chunks of `seed_chunk` seeds runs the beta parts of a chunk vmapped over its seeds and all betas
(the chunk bounds memory: seed_chunk x num_betas x n_eval samples at once).
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from kdjax import compiled, metrics
from kdjax import mixture as mx
from kdjax import sample_metrics
from kdjax.cli import require
from kdjax.gmm import em
from kdjax.gmm import train
from kdjax.mixture import Mixture

OBJECTIVES = ("direct", "seqkd", "fkl", "rkl", "jsd")
GRADIENT_OBJECTIVES = ("fkl", "rkl", "jsd")
EXACT = "exact"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What is fixed across the grid (static under jit). Field names are the flag names."""
  n_train: int = 100
  teacher_components: int = 4
  student_components: int = 1
  covariance: str = "diag"
  n_teacher_samples: int = 1000
  n_eval: int = 10000
  objectives: tuple[str, ...] = OBJECTIVES
  em_init: str = "kmeans"
  em_max_iter: int = 100
  em_tol: float = 1e-3
  reg_covar: float = 1e-6
  steps: int = 300
  batch_size: int = 128
  learning_rate: float = 0.1
  jsd_mix: float = 0.5
  convergence_tol: float = 0.01
  seed_chunk: int = 16
  exact: bool = True  # add the exact forward-KL limit rows (one-Gaussian students only)
  knn_samples: int = 0  # > 0: k-NN precision / recall on this many student and p* samples
  knn_k: int = 3

  @property
  def knn(self) -> bool:
    return self.knn_samples > 0

  def __post_init__(self):
    for name in ("n_train", "teacher_components", "student_components", "n_teacher_samples",
                 "n_eval", "em_max_iter", "steps", "batch_size", "seed_chunk"):
      require(int(getattr(self, name)) >= 1, f"--{name}={getattr(self, name)}: must be >= 1")
    require(self.covariance in ("diag", "full"),
            f"--covariance={self.covariance!r}: expected diag or full")
    require(len(self.objectives) > 0, "--objectives: give at least one objective")
    for obj in self.objectives:
      require(obj in OBJECTIVES,
              f"--objectives: unknown objective {obj!r}; expected some of {','.join(OBJECTIVES)}")
    require(len(set(self.objectives)) == len(self.objectives),
            f"--objectives={','.join(self.objectives)}: an objective is repeated")
    require(self.em_init in em.INITS, f"--em_init={self.em_init!r}: expected one of {em.INITS}")
    require(self.em_tol >= 0, f"--em_tol={self.em_tol}: must be >= 0")
    require(self.reg_covar >= 0, f"--reg_covar={self.reg_covar}: must be >= 0")
    require(self.learning_rate > 0, f"--learning_rate={self.learning_rate}: must be > 0")
    require(0 < self.jsd_mix < 1, f"--jsd_mix={self.jsd_mix}: must be in (0, 1)")
    require(self.convergence_tol > 0, f"--convergence_tol={self.convergence_tol}: must be > 0")
    require(self.knn_k >= 1, f"--knn_k={self.knn_k}: must be >= 1")
    require(self.knn_samples == 0 or self.knn_k < self.knn_samples <= self.n_eval,
            f"--knn_samples={self.knn_samples}: 0 (off) or more than --knn_k={self.knn_k} and "
            f"at most --n_eval={self.n_eval}")
    require(self.teacher_components <= self.n_train,
            f"--teacher_components={self.teacher_components}: more than --n_train={self.n_train}")
    for name in ("n_train", "n_teacher_samples", "batch_size"):
      require(self.student_components <= getattr(self, name),
              f"--student_components={self.student_components}: more than --{name}="
              f"{getattr(self, name)}")

  @property
  def diag(self) -> bool:
    return self.covariance == "diag"

  @property
  def methods(self) -> tuple[str, ...]:
    """The objectives run, plus the exact forward-KL limit when the student is one Gaussian."""
    return self.objectives + ((EXACT,) if self.exact and self.student_components == 1 else ())

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["objectives"] = ",".join(self.objectives)
    return d


_KEY_NAMES = ("data", "teacher", "direct", "seq_x", "seq_init", "grad", "eval_star", "eval_student")


ENTROPY_STREAM = 1_000_003  # folded into PRNGKey(seed): the teacher-entropy draws' own stream


def _keys(seed) -> dict[str, jax.Array]:
  """The configuration's random keys, all from jax.random.PRNGKey(seed) (none depends on beta or
  any other knob). The entropy key is folded in apart, so the split's keys are today's."""
  root = jax.random.PRNGKey(seed)
  return dict(zip(_KEY_NAMES, jax.random.split(root, len(_KEY_NAMES))),
              entropy=jax.random.fold_in(root, ENTROPY_STREAM))


def _fit_info(cfg: StudyConfig, key, x_NxD, k) -> tuple[Mixture, train.TrainInfo]:
  """EM fit and its report: EM's own convergence flag, the negative mean log-likelihood of its
  data as the objective, no change (EM's stopping rule is its tolerance on that bound)."""
  m, info = em.fit(key, x_NxD, k, diag=cfg.diag, init=cfg.em_init, max_iter=cfg.em_max_iter,
                   tol=cfg.em_tol, reg_covar=cfg.reg_covar)
  nan = jnp.full((), jnp.nan, x_NxD.dtype)
  ok = info.converged & jnp.isfinite(info.lower_bound)
  return m, train.TrainInfo(ok, -info.lower_bound, nan, nan)


def _fit(cfg: StudyConfig, key, x_NxD, k):
  return _fit_info(cfg, key, x_NxD, k)[0]


def _train(cfg: StudyConfig, objective: str, teacher: Mixture, key):
  return train.train_student(objective, teacher, key, components=cfg.student_components,
                             steps=cfg.steps, batch_size=cfg.batch_size,
                             learning_rate=cfg.learning_rate, jsd_mix=cfg.jsd_mix,
                             tol=cfg.convergence_tol)


def _score(cfg: StudyConfig, p_star: Mixture, seed_part: dict, student: Mixture):
  """(precision, recall) of a student with the seed's evaluation draws and p* samples."""
  precision = metrics.precision(partial(mx.log_prob, p_star),
                                mx.sample_with(student, seed_part["eval_draws"]))
  recall = metrics.recall(partial(mx.log_prob, student), seed_part["x_star"])
  return precision, recall


KNN_BLOCK = 128  # query rows per distance block: a configuration holds KNN_BLOCK x knn_samples


def _knn(cfg: StudyConfig, seed_part: dict, student: Mixture):
  """(k-NN precision, k-NN recall) of a student: its first knn_samples evaluation samples against
  the first knn_samples of p*'s (whose k-NN radii the seed part holds)."""
  n = cfg.knn_samples
  fake_NxD = mx.sample_with(student, jax.tree.map(lambda a: a[:n], seed_part["eval_draws"]))
  return sample_metrics.knn_precision_recall(
      seed_part["x_star"][:n], fake_NxD, k=cfg.knn_k, block=KNN_BLOCK,
      real_r2_N=seed_part["knn_star_r2"])


def seed_part(cfg: StudyConfig, p_star: Mixture, seed) -> dict:
  """Everything of a configuration that does not depend on beta: the training data, the teacher,
  the direct student and its scores, the p* evaluation samples, and the standard random draws that
  beta_part turns into samples of each beta's sharpened teacher and students."""
  k = _keys(seed)
  d = p_star.means.shape[-1]
  x_train_NxD = mx.sample(p_star, k["data"], cfg.n_train)
  part = {"keys": k, "x_train": x_train_NxD,
          "teacher": _fit(cfg, k["teacher"], x_train_NxD, cfg.teacher_components),
          "x_star": mx.sample(p_star, k["eval_star"], cfg.n_eval),
          "eval_draws": mx.draws(k["eval_student"], cfg.n_eval, d),
          "seq_draws": mx.draws(k["seq_x"], cfg.n_teacher_samples, d)}
  if cfg.knn:
    part["knn_star_r2"] = sample_metrics.knn_radii(part["x_star"][:cfg.knn_samples], cfg.knn_k,
                                                   KNN_BLOCK)
  if "direct" in cfg.objectives:
    part["direct"], part["direct_info"] = _fit_info(cfg, k["direct"], x_train_NxD,
                                                    cfg.student_components)
    part["direct_scores"] = _score(cfg, p_star, part, part["direct"])
    if cfg.knn:
      part["direct_knn"] = _knn(cfg, part, part["direct"])
  return part


def beta_part(cfg: StudyConfig, p_star: Mixture, part: dict, beta, top_p=None, top_k=None
              ) -> dict:
  """The rest of a configuration, given its seed_part: sharpen (beta), truncate (top_p, top_k:
  mx.truncate; None: not at all), the students, their scores. "teacher_density_entropy" is the
  selective teacher's differential entropy by Monte Carlo on the seed's entropy draws (the same
  for every knob value); "teacher_entropy" stays its weights' entropy."""
  k = part["keys"]
  sharp = mx.sharpen(part["teacher"], beta)
  if top_p is not None:
    sharp = mx.truncate(sharp, top_p, top_k)
  students, scores, infos, knn = {}, {}, {}, {}
  for i, obj in enumerate(cfg.objectives):
    if obj == "direct":
      students[obj], scores[obj] = part["direct"], part["direct_scores"]
      infos[obj] = part["direct_info"]
      if cfg.knn:
        knn[obj] = part["direct_knn"]
      continue
    if obj == "seqkd":
      x_teacher_NxD = mx.sample_with(sharp, part["seq_draws"])
      students[obj], infos[obj] = _fit_info(cfg, k["seq_init"], x_teacher_NxD,
                                            cfg.student_components)
    else:
      students[obj], infos[obj] = _train(cfg, obj, sharp, jax.random.fold_in(k["grad"], i))
    scores[obj] = _score(cfg, p_star, part, students[obj])
    if cfg.knn:
      knn[obj] = _knn(cfg, part, students[obj])
  if EXACT in cfg.methods:
    students[EXACT] = mx.moment_match(sharp, cfg.diag)
    scores[EXACT] = _score(cfg, p_star, part, students[EXACT])
    if cfg.knn:
      knn[EXACT] = _knn(cfg, part, students[EXACT])
    nan = jnp.full((), jnp.nan, beta.dtype)
    infos[EXACT] = train.TrainInfo(jnp.ones((), bool), nan, nan, nan)  # closed form
    if "fkl" in students:
      infos["fkl"] = _against_the_optimum(cfg, infos["fkl"], sharp, students["fkl"],
                                          students[EXACT])
  out = {"knn_precision": {m: p for m, (p, _) in knn.items()},
         "knn_recall": {m: r for m, (_, r) in knn.items()}} if cfg.knn else {}
  return {**out, "teacher_entropy": mx.weight_entropy(sharp),
          "teacher_density_entropy": mx.entropy(sharp, k["entropy"], cfg.n_eval),
          "precision": {m: p for m, (p, _) in scores.items()},
          "recall": {m: r for m, (_, r) in scores.items()},
          "converged": {m: i.converged for m, i in infos.items()},
          "final_objective": {m: i.objective for m, i in infos.items()},
          "objective_change": {m: i.change for m, i in infos.items()},
          "objective_gap": {m: i.gap for m, i in infos.items()},
          "students": students, "teacher": part["teacher"]}


EXACT_TOL = 1e-4  # nats: the one-Gaussian fkl optimum is known exactly, so its check can be strict


def _against_the_optimum(cfg: StudyConfig, info, teacher: Mixture, student: Mixture,
                         optimum: Mixture):
  """A one-Gaussian fkl student's check against its known optimum, the moment match: its gap is
  at least the exact excess of its objective, KL(t || s) - KL(t || m) = CE(t, s) - CE(t, m) (closed
  form, no noise), and it has converged only when that excess is at most EXACT_TOL. The scores are
  far more sensitive than the objective along its flat directions: in 16-D a student 0.002 nats
  of KL from the optimum was 0.39 nats of precision from it."""
  excess = mx.gaussian_cross_entropy(teacher, student) - mx.gaussian_cross_entropy(teacher, optimum)
  gap = jnp.maximum(info.gap, excess)
  return info._replace(gap=gap, converged=info.converged & (excess <= EXACT_TOL))


def run_config(cfg: StudyConfig, p_star: Mixture, seed: jax.Array, beta: jax.Array,
               top_p: jax.Array | None = None, top_k: jax.Array | None = None) -> dict:
  """One (seed, beta) configuration end to end, for every objective in cfg (with top_p and
  top_k, the sharpened teacher truncated: beta_part).

  Returns {"teacher_entropy": [], "precision": {method: []}, "recall": {method: []},
  "students": {method: Mixture}, "teacher": Mixture (unsharpened), "x_train": [n_train, D]};
  with cfg.knn also "knn_precision" and "knn_recall": {method: []}.
  """
  part = seed_part(cfg, p_star, seed)
  return dict(beta_part(cfg, p_star, part, beta, top_p, top_k), x_train=part["x_train"])


def run_grid(cfg: StudyConfig, p_star: Mixture, seeds_S: jax.Array, betas_B: jax.Array,
             truncation: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> dict:
  """`run_config` over every (seed, beta): the outputs gain leading [S, B] axes, except the
  training samples, which are per seed: "x_train" [S, n_train, D]. With `truncation` = (beta_T,
  top_p_T, top_k_T int32), T more configurations follow the B betas along the same axis ([S, B+T]):
  the teacher sharpened by beta_T[t] then truncated by top_p_T[t] and top_k_T[t] (knobs.grid).
  The two are vmapped apart inside one call: the width of a vmap changes how XLA vectorizes the
  Monte Carlo means (their last bits), so the betas alone keep the beta-only sweep's numbers
  bit for bit.

  The seed parts of all seeds are computed first (vmapped), then a `lax.map` over chunks of seeds
  runs the beta parts of a chunk (vmapped over its seeds and all betas). The loop is also what keeps
  each seed's draws computed once: XLA fuses a cheap producer into every consumer, so without the
  loop boundary the random normals would be regenerated for each beta.
  """
  parts = jax.vmap(lambda seed: seed_part(cfg, p_star, seed))(seeds_S)

  def per_seed(part):
    out = jax.vmap(lambda beta: beta_part(cfg, p_star, part, beta))(betas_B)
    if truncation is None:
      return out
    more = jax.vmap(lambda *knob: beta_part(cfg, p_star, part, *knob))(*truncation)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, more)

  out = jax.lax.map(per_seed, parts, batch_size=seed_batch(cfg, seeds_S.shape[0]))
  return dict(out, x_train=parts["x_train"])


def seed_batch(cfg: StudyConfig, num_seeds: int) -> int:
  """Seeds vmapped together: the largest divisor of num_seeds <= seed_chunk (a divisor, so that
  lax.map does not compile a second body for a remainder)."""
  return max(c for c in range(1, min(cfg.seed_chunk, num_seeds) + 1) if num_seeds % c == 0)


grid_fn = jax.jit(run_grid, static_argnums=0)


def compiler_options() -> dict:
  """XLA options for compiling the grid, measured on the 2-core CPU this was built on (bench_gmm):

  - compiled.NO_YNN_FUSIONS: this jaxlib hands reductions to YNNPACK fusions by
    default, which ran the study's many small per-point reductions single-threaded, ~4x slower
    (the precision Monte Carlo went from 0.3 s to 1.1 s per 4096 configurations);
  - xla_backend_optimization_level=1, xla_cpu_use_fusion_emitters=False: LLVM's default -O3
    pipeline and the newer fusion emitters cost ~2.5 s of compilation for no measurable speed in
    this elementwise-bound sweep (compile 3.8 s -> 1.4 s, sweep unchanged at ~0.23 s).
  On other backends: none. An option the environment's XLA_FLAGS names is left to it (options
  given here would override the user's flag): e.g. the tests' xla_backend_optimization_level=0,
  which compiles the smoke grid in 6.7 s instead of 9.1.
  """
  if jax.default_backend() != "cpu":
    return {}
  options = {**compiled.NO_YNN_FUSIONS, "xla_backend_optimization_level": 1,
             "xla_cpu_use_fusion_emitters": False}
  named = os.environ.get("XLA_FLAGS", "")
  return {k: v for k, v in options.items() if f"--{k}=" not in named}


def geometric_betas(beta_min: float, beta_max: float, num: int) -> jax.Array:
  """num betas spaced geometrically from beta_min to beta_max, both included."""
  return jnp.geomspace(beta_min, beta_max, num, dtype=jnp.float32)


def compile_and_run(cfg: StudyConfig, p_star: Mixture, seeds_S, betas_B, truncation=None
                    ) -> tuple[dict, dict]:
  """Compile the grid once (timed apart) and run it; returns (outputs, timing)."""
  seeds_S = jnp.asarray(seeds_S, jnp.int32)
  args = (jnp.asarray(betas_B, jnp.float32),)
  if truncation is not None:
    beta_T, top_p_T, top_k_T = truncation
    args += ((jnp.asarray(beta_T, jnp.float32), jnp.asarray(top_p_T, jnp.float32),
              jnp.asarray(top_k_T, jnp.int32)),)
  t0 = time.perf_counter()
  program = grid_fn.lower(cfg, p_star, seeds_S, *args).compile(compiler_options())
  t1 = time.perf_counter()
  out = jax.block_until_ready(program(p_star, seeds_S, *args))
  n_configs = args[0].shape[0] + (0 if truncation is None else len(truncation[0]))
  t2 = time.perf_counter()
  timing = {"configs": int(seeds_S.shape[0] * n_configs), "compile_seconds": t1 - t0,
            "sweep_seconds": t2 - t1}
  return out, timing
