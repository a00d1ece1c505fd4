"""The SmolLM2 study end to end, as stages over a workdir (paper/NOTES.md, "LLM protocol").

  1. sample p* (prompt, full vocabulary, T=1) -> pstar/{train,val,select}
  2. train the teacher from scratch on pstar/train, keeping its checkpoint of best perplexity on
     pstar/select -> teacher/
  3. sample the teacher at each temperature, per seed -> seed_S/teacher_T<t>/{train,val}
     (only when --students has seqkd)
  4. train the students from scratch per seed, one training run per kind (--students; plan.KINDS):
     direct on p*'s samples; seqkd on the teacher's samples at each T; token-level kinds on p*'s
     samples against softmax(teacher logits / T); on-policy kinds on their own samples against the
     same target. Each kind's students (one per T) train together, vmapped -> seed_S/students/KIND
  5. sample each student (T=1) and score: precision = mean per-token log p*(student samples),
     recall = mean per-token log p''(p* validation samples) -> seed_S/scores/NAME/DONE.json; the
     samples' embeddings by p* come from precision's forward pass (kdjax.llm.model.embeddings) ->
     seed_S/scores/NAME/embeddings.npy, and p*'s reference samples' -> embeddings/pstar_val
  6. results.json (these flags, rows with the sample-based measures of kdjax.sample_metrics,
     summary: mean and standard error over seeds), results.csv, figures, embedding_map.png.

p*'s splits serve one purpose each: train (the teacher's and the direct and token-level students'
training set), select (held out; selects the teacher's checkpoint) and val (recall's test set and
nothing else: no model is selected on it). Students are not selected at all: each keeps its final
parameters. Before any stage runs, `preflight` checks every input the stages will meet (specs,
tokenizer, each training run's mesh, batch sizes and distillation settings).

The workdir is a cache (kdjax.llm.study.units): every unit of work records the key of what it depends on,
writes its outputs, then an atomic DONE.json; a rerun skips units done for their current key,
resumes units of the same key (datasets shard by shard, training from its last checkpoint) and
redoes stale ones. Randomness is derived from the seed by fold_in (per dataset, per shard, indices
naming the unit), so a resumed run reproduces an uninterrupted one exactly. Wall-clock times go to
timings.json, never to results.json (which is deterministic).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax import cli
from kdjax.cli import require
from kdjax.llm.model import embeddings
from kdjax.llm.study import plots
from kdjax.llm.study import units as stages
from kdjax.llm.study.plan import (TOKEN_KINDS, StudyConfig, check_inputs,
                            load_tokenizer, prompt_ids, resolve_spec, train_config, validate)
# the work of one unit; DONE and data_parallel re-exported (callers name them through the pipeline)
from kdjax.llm.study.work import (DONE, data_parallel, is_done, load_dataset,  # noqa: F401
                                  loglik_and_embeddings, mark_done, mean_loglik, read_done,
                                  sample_dataset, seed_key, stage, train_models)

# ----------------------------------------------------------------------------- the study


def for_inference(config, params, dtype: str):
  """A model as sampling and scoring run it: computing in `dtype`; with bfloat16 its weights
  stored in bfloat16 too (the sampler's KV cache follows the compute dtype), half the memory and
  half the bytes each decode step reads; with float32 both stay float32."""
  config = config.replace(dtype=dtype)
  if dtype == "bfloat16":
    config = config.replace(param_dtype="bfloat16")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  return config, params


class Study:
  """Shared state of one run: the config, workdir, tokenizer, prompt, and a one-model cache."""

  def __init__(self, cfg: StudyConfig, workdir: str):
    from kdjax.llm.weights import loading
    validate(cfg)
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    self.keys = stages.StudyKeys(cfg)
    self.gt_spec = resolve_spec(cfg.ground_truth)
    self.eos_id = loading.describe_spec(self.gt_spec)[0].eos_token_id
    self.tokenizer = load_tokenizer(cfg)
    self.prompt = prompt_ids(cfg, self.tokenizer)
    self.seq_len = len(self.prompt) + cfg.max_new_tokens
    self.timings: dict = {}
    self._models: dict = {}

  def path(self, *parts) -> str:
    return study_path(self.workdir, *parts)

  def model(self, spec: str):
    """(config, params) of a spec for sampling and scoring (for_inference), keeping the two last
    used (p* and one student while scoring)."""
    from kdjax.llm.weights import loading
    if spec not in self._models:
      while len(self._models) >= 2:
        self._models.pop(next(iter(self._models)))
      self._models[spec] = for_inference(*loading.load_model(spec), self.cfg.dtype)
    self._models[spec] = self._models.pop(spec)  # most recently used last
    return self._models[spec]

  def sample(self, out_dir, spec, key, num, temperature, desc):
    if not is_done(out_dir):
      sample_dataset(out_dir, *self.model(spec), self.prompt, self.tokenizer, key, num=num,
                     temperature=temperature, cfg=self.cfg, eos_id=self.eos_id, desc=desc)

  def run(self, name: str, units: list, fn) -> None:
    """Run fn(*unit.args) for the units not done for their key (kdjax.llm.study.units: a stale unit is
    removed first, a partial one of the same key resumed), timed as stage `name`."""
    from kdjax import distributed
    todo = [u for u in units if not stages.is_current(u.out, u.key)]
    distributed.sync("kdjax_stage_listed")  # every process has its list before any unit changes
    if not todo:
      logging.info("stage %s: done already", name)
      return
    logging.info("stage %s: %d of %d units to run (%s)", name, len(todo), len(units),
                 ", ".join(os.path.relpath(u.out, self.workdir) for u in todo[:6])
                 + (", ..." if len(todo) > 6 else ""))
    with stage(self.workdir, name, self.timings):
      for u in todo:
        claim(u.out, u.key, u.what)
        fn(u.out, *u.args)
        distributed.sync("kdjax_unit_done")  # its DONE.json is written before anyone reads it


def claim(path: str, key: str, what: dict) -> None:
  """stages.claim by process 0, the others waiting until the unit's directory is ready."""
  from kdjax import distributed
  if jax.process_index() == 0:
    stages.claim(path, key, what)
  distributed.sync("kdjax_claimed")


def study_path(workdir: str, *parts) -> str:
  return os.path.join(workdir, *[str(p) for p in parts])


def pstar_dir(study: Study, split: str) -> str:
  return study.path("pstar", split)


def teacher_sample_dir(study: Study, seed: int, t: float, split: str) -> str:
  return study.path(f"seed_{seed}", f"teacher_T{t:g}", split)


def check_prompt_lens(st: Study) -> None:
  """Refuse datasets sampled before rows recorded their prompt length, when the prompt has more
  than one token: they read as prompt length 1, so the rest of their prompt would be scored."""
  import glob
  from kdjax.llm import data
  if len(st.prompt) == 1:
    return
  for pattern in (("pstar", "*"), ("seed_*", "teacher_T*", "*"), ("seed_*", "student_samples", "*")):
    for d in sorted(glob.glob(st.path(*pattern))):
      require(data.has_prompt_lens(d), f"{d} was sampled before datasets recorded their prompt "
              f"length (its {len(st.prompt)}-token prompt would be scored): use a new --workdir")


# ----------------------------------------------------------------------------- units of work


class Unit(NamedTuple):
  """One unit of work: its directory, its key (kdjax.llm.study.units), what the key digests, and the
  arguments its stage function takes after the directory."""
  out: str
  key: str
  what: dict
  args: tuple = ()


SPLITS = ("train", "val", "select")
STAGES = ("1_sample_ground_truth", "2_train_teacher", "3_sample_teacher", "4_train_students",
          "5_score_students")


def units(cfg: StudyConfig, workdir: str) -> dict[str, list[Unit]]:
  """Every unit of every stage with its key, from the flags alone (no model, no tokenizer: the
  dry run uses this to say what is cached). Sampling keys are fold_in chains from the seed whose
  indices name the unit (split, temperature, student), so adding a temperature or a student kind
  leaves every other unit's samples as they were."""
  keys, path = stages.StudyKeys(cfg), functools.partial(study_path, workdir)
  nums = {"train": cfg.num_train, "val": cfg.num_val, "select": cfg.num_select}
  out = {name: [] for name in STAGES}
  for i, split in enumerate(SPLITS):
    out["1_sample_ground_truth"].append(Unit(path("pstar", split), *keys.pstar(split),
                                             (i, nums[split])))
  out["2_train_teacher"].append(Unit(path("teacher"), *keys.teacher()))
  for seed in cfg.seeds:
    for t in (cfg.temperatures if "seqkd" in cfg.students else ()):  # seqkd's data only
      for i, (split, n) in enumerate((("train", cfg.teacher_num_train),
                                      ("val", cfg.teacher_num_val))):
        out["3_sample_teacher"].append(Unit(
            path(f"seed_{seed}", f"teacher_T{t:g}", split), *keys.teacher_samples(seed, t, split),
            (seed_key(seed, 2, stages.stable_id(f"T{t:g}"), i), n, t,
             f"teacher T={t:g} {split} seed {seed}")))
    for kind, group in cfg.student_groups():
      out["4_train_students"].append(Unit(path(f"seed_{seed}", "students", kind),
                                          *keys.students(seed, kind), (seed, kind)))
      for j, (name, t) in enumerate(group):
        out["5_score_students"].append(Unit(path(f"seed_{seed}", "scores", name),
                                            *keys.scores(seed, kind, name, t),
                                            ("student", seed, kind, j, name, t)))
  out["5_score_students"].insert(0, Unit(path("embeddings", "pstar_val"), *keys.pstar_embeddings(),
                                         ("pstar_val",)))
  return out


def cache_report(cfg: StudyConfig, workdir: str) -> str:
  """What a run in `workdir` would reuse and what it would run, per stage (for --dry_run)."""
  lines = [f"workdir {workdir}:"]
  for name, us in units(cfg, os.path.abspath(workdir)).items():
    by = {"cached": [], "resume": [], "run": []}
    for u in us:
      by[stages.status(u.out, u.key)].append(os.path.relpath(u.out, os.path.abspath(workdir)))
    parts = [f"{len(by['cached'])} cached"]
    for what, label in (("resume", "to resume"), ("run", "to run")):
      if by[what]:
        names = by[what][:8] + ([f"... {len(by[what]) - 8} more"] if len(by[what]) > 8 else [])
        parts.append(f"{len(by[what])} {label} ({', '.join(names)})")
    lines.append(f"  {name}: {'; '.join(parts)}")
  lines.append("  6_results: rewritten from the scores")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- training runs


def student_run(st: Study, seed: int, kind: str, teacher_spec: str):
  """The TrainConfig of one kind's students of a seed: direct on p*'s train set (one model);
  seqkd on the teacher's samples at each temperature; token-level kinds on p*'s train set against
  the teacher's next-token distribution at each T; on-policy kinds on their own samples, as many
  steps as the token-level kinds. All but direct: one student per temperature, vmapped."""
  cfg, train = st.cfg, [pstar_dir(st, "train")]
  run = functools.partial(train_config, cfg, cfg.student, val_dir="", epochs=cfg.student_epochs,
                          seed=seed, seq_len=st.seq_len)
  if kind == "direct":
    return run(train)
  if kind == "seqkd":
    return run([teacher_sample_dir(st, seed, t, "train") for t in cfg.temperatures])
  distill = dict(teacher=teacher_spec, teacher_temperatures=tuple(cfg.temperatures))
  if kind in TOKEN_KINDS:
    return run(train, objective=kind, **distill)
  steps = cfg.student_epochs * (cfg.num_train // cfg.batch_size)
  return run([], objective=kind[len("onpolicy_"):], onpolicy=True, prompt=tuple(st.prompt),
             max_new_tokens=cfg.max_new_tokens,
             eos_id=-1 if st.eos_id is None else int(st.eos_id), steps=steps, **distill)


def training_runs(st: Study, teacher_spec: Optional[str] = None) -> dict[str, list]:
  """{stage: [TrainConfig]} of the teacher (pstar/train, selected on pstar/select) and of every
  student kind per seed (final parameters kept). teacher_spec: the teacher the distilling students
  read (its checkpoint; the --teacher preset when checking inputs before the teacher exists)."""
  cfg = st.cfg
  teacher_spec = teacher_spec or cfg.teacher
  teacher = train_config(cfg, cfg.teacher, [pstar_dir(st, "train")], pstar_dir(st, "select"),
                         cfg.teacher_epochs, cfg.seed, st.seq_len)
  return {"2_train_teacher": [teacher],
          "4_train_students": [student_run(st, seed, kind, teacher_spec)
                               for seed in cfg.seeds for kind in cfg.students]}


def preflight(cfg: StudyConfig, workdir: str) -> Study:
  """Every input the stages will meet, checked before any runs (and before the workdir is touched):
  the models as their loaders will find them, vocabularies, tokenizer, prompt and lengths
  (plan.check_inputs), then each training run's own checks (kdjax.llm.train.loop.preflight: mesh,
  batch sizes, specs, distillation settings). Returns the Study."""
  from kdjax.llm.train import loop as trainlib
  st = Study(cfg, workdir)
  check_inputs(cfg, st.tokenizer)
  for runs in training_runs(st).values():
    for tc in runs:
      trainlib.preflight(tc)
  return st


# ----------------------------------------------------------------------------- the study


def run_study(cfg: StudyConfig, workdir: str) -> list[dict]:
  """Run (or resume) every stage not cached for these flags, after the pre-flight check; write
  results.json (these flags' rows and summary) and return its rows."""
  st = preflight(cfg, workdir)
  todo = units(cfg, st.workdir)
  check_prompt_lens(st)
  st.run("1_sample_ground_truth", todo["1_sample_ground_truth"],
         lambda out, i, n: st.sample(out, st.gt_spec, seed_key(cfg.seed, 0, i), n, 1.0,
                                     f"p* {os.path.basename(out)}"))

  teacher_run = training_runs(st)["2_train_teacher"][0]
  st.run("2_train_teacher", todo["2_train_teacher"], lambda out: train_models(out, teacher_run))
  teacher_ckpt = read_done(st.path("teacher"))["models"][0]["checkpoint"]

  st.run("3_sample_teacher", todo["3_sample_teacher"],
         lambda out, *a: st.sample(out, teacher_ckpt, *a))

  # Students keep their final parameters (one epoch ending in the WSD decay); each one's validation
  # perplexity, on held-out samples of its own training distribution, is measured in stage 5.
  st.run("4_train_students", todo["4_train_students"],
         lambda out, seed, kind: train_models(out, student_run(st, seed, kind, teacher_ckpt)))

  scorers = {"pstar_val": embed_pstar_val, "student": score_student}
  st.run("5_score_students", todo["5_score_students"],
         lambda out, what, *a: scorers[what](st, out, *a))

  with stage(workdir, "6_results", st.timings):
    rows = results_rows(st)
    if jax.process_index() == 0:  # the files are the same on every process: one writes them
      write_results(workdir, rows, cfg)
      write_embedding_map(st, rows)
  return rows


def student_val_dir(st: Study, seed: int, kind: str, t: Optional[float]) -> str:
  """Held-out samples of a student's training distribution: the teacher's at T for seqkd, p*'s for
  every other kind (their data are p*'s sequences, or for on-policy students their own samples,
  which have no held-out set: p*'s validation set stands in)."""
  return teacher_sample_dir(st, seed, t, "val") if kind == "seqkd" else pstar_dir(st, "val")


def score_student(st: Study, out: str, seed: int, kind: str, j: int, name: str,
                  t: Optional[float]) -> None:
  """Sample student `name` at T=1, score the samples under p* (precision), score p*'s validation
  samples under the student (recall); DONE.json holds the three numbers."""
  cfg = st.cfg
  student = read_done(st.path(f"seed_{seed}", "students", kind))["models"][j]["checkpoint"]
  samples = st.path(f"seed_{seed}", "student_samples", name)
  claim(samples, *st.keys.student_samples(seed, kind, name))
  st.sample(samples, student, seed_key(seed, 3, stages.stable_id(name)), cfg.num_eval_samples,
            1.0, f"student {name} seed {seed}")
  b, n = cfg.eval_batch_size, st.seq_len
  recall = mean_loglik(*st.model(student), load_dataset(pstar_dir(st, "val")), b, n,
                       f"recall {name} seed {seed}")
  own_val = student_val_dir(st, seed, kind, t)
  val = recall if own_val == pstar_dir(st, "val") else mean_loglik(
      *st.model(student), load_dataset(own_val), b, n, f"val {name} seed {seed}")
  precision, emb_NxD = loglik_and_embeddings(*st.model(st.gt_spec), load_dataset(samples), b, n,
                                             f"precision {name} seed {seed}")
  mark_done(out, {"precision": precision, "recall": recall, "val_perplexity": math.exp(-val),
                  "val_data": own_val, "embeddings": embeddings.save(out, emb_NxD)})


def embed_pstar_val(st: Study, out: str) -> None:
  """p*'s reference samples for the sample-based measures and the map (the first
  stages.num_reference of its validation split), embedded by p* -> out/embeddings.npy."""
  ds = load_dataset(pstar_dir(st, "val"))
  ds = ds.select(range(stages.num_reference(st.cfg)))
  _, emb_NxD = loglik_and_embeddings(*st.model(st.gt_spec), ds, st.cfg.eval_batch_size,
                                     st.seq_len, "embed p* val", loglik=False)
  mark_done(out, {"sequences": len(ds), "embeddings": embeddings.save(out, emb_NxD)})


def generated_tokens(path: str) -> list[list[int]]:
  """Each sampled row's generated tokens (after its prompt; the EOS included when sampled)."""
  from kdjax.llm import data
  rows = data.TokenRows(load_dataset(path))
  return [rows.row(i)[rows.prompt_lens[i]:].tolist() for i in range(len(rows))]


def results_rows(st: Study) -> list[dict]:
  """One row per seed and student: objective (the kind), temperature (None for direct), seed,
  precision, recall, val_perplexity, and the sample-based measures of its samples
  (kdjax.sample_metrics.sample_measures: knn_precision, knn_recall and mauve against p*'s
  reference samples in p*'s embedding space; distinct_1/2/3 and mean_length of its tokens)."""
  from kdjax import sample_metrics
  reference = embeddings.load(st.path("embeddings", "pstar_val"))
  rows = []
  for seed in st.cfg.seeds:
    for kind, group in st.cfg.student_groups():
      for name, t in group:
        s = read_done(st.path(f"seed_{seed}", "scores", name))
        rows.append({"objective": kind, "temperature": t, "seed": seed,
                     "precision": s["precision"], "recall": s["recall"],
                     "val_perplexity": s["val_perplexity"],
                     **sample_metrics.sample_measures(
                         reference, embeddings.load(st.path(f"seed_{seed}", "scores", name)),
                         generated_tokens(st.path(f"seed_{seed}", "student_samples", name)),
                         k=st.cfg.knn_k, seed=st.cfg.seed)})
  return rows


def write_results(workdir: str, rows: list[dict], cfg: StudyConfig) -> None:
  """results.csv and figures first, results.json last. results.json holds the flags of the run that
  wrote it, its rows, and the summary (mean and standard error over seeds per objective and T)."""
  summary = plots.summarize(rows)
  plots.write_csv(rows, os.path.join(workdir, "results.csv"))
  plots.write_figures(rows, workdir, title=f"p* = {cfg.ground_truth}, teacher {cfg.teacher}, "
                      f"students {cfg.student}")
  cli.atomic_write_json(os.path.join(workdir, "results.json"),
                        {"config": cfg.to_dict(), "rows": rows, "summary": summary})


def write_embedding_map(st: Study, rows: list[dict]) -> None:
  """embedding_map.png (--embedding_map: umap, pca; none removes a previous run's map): p*'s
  reference samples and every student's (all seeds) in one 2-D map fitted on p*'s, seeded by
  --seed; each panel's title gives the student's k-NN precision and recall (mean over seeds)."""
  from kdjax.llm.study import embedding_map
  path = os.path.join(st.workdir, embedding_map.FIGURE)
  cfg = st.cfg
  if cfg.embedding_map == "none":
    if os.path.exists(path):
      os.remove(path)
    return
  panels = []
  for e in plots.summarize(rows):
    names = [n for kind, group in cfg.student_groups() if kind == e["objective"]
             for n, t in group if t == e["temperature"]]
    emb = [embeddings.load(st.path(f"seed_{seed}", "scores", names[0])) for seed in cfg.seeds]
    panels.append(embedding_map.Panel(e["objective"], e["temperature"], np.concatenate(emb),
                                      e["knn_precision_mean"], e["knn_recall_mean"]))
  written = embedding_map.write(
      path, embeddings.load(st.path("embeddings", "pstar_val")), panels, method=cfg.embedding_map,
      seed=cfg.seed, title=f"p* = {cfg.ground_truth}; students {cfg.student}, seeds {cfg.seeds}")
  if not written and os.path.exists(path):
    os.remove(path)


# ----------------------------------------------------------------------------- overwrite


OUTPUTS = ("pstar", "teacher", "embeddings", "results.json", "results.csv", "timings.json",
           "embedding_map.png") + plots.FIGURES


def clear_outputs(workdir: str) -> None:
  """Remove a previous configuration's outputs (only the names this pipeline writes)."""
  import shutil
  names = list(OUTPUTS) + [n for n in os.listdir(workdir) if n.startswith("seed_")]
  for n in names:
    p = os.path.join(workdir, n)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)
