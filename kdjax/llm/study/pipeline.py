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

A truncation knob (--teacher_knob=top_p|min_p|top_k, --knob_values; kdjax.llm.model.truncation)
adds, beside the temperatures' units (their keys unchanged), the teacher's samples at T = 1
truncated at each value (seed_S/teacher_topp0.9/...), one training run per kind under the knob
(seed_S/students/KIND_top_p: seqkd on those samples, token-level kinds against the truncated,
renormalised target) and their scores. Stage 5 also measures the teacher's mean per-token entropy
on p*'s select split under every setting (teacher_entropy/<setting>: kdjax.llm.study.entropy);
results.json's rows carry knob, knob_value and teacher_entropy, and entropy_slopes the slope of
precision and recall per nat of it per kind and knob (kdjax.llm.study.stats.entropy_slopes).

p*'s splits serve one purpose each: train (the teacher's and the direct and token-level students'
training set), select (held out; selects the teacher's checkpoint) and val (recall's test set and
nothing else: no model is selected on it). Students are not selected at all: each keeps its final
parameters. Before any stage runs, `preflight` checks every input the stages will meet (specs,
tokenizer, each training run's mesh, batch sizes and distillation settings).

The workdir is a cache of units (kdjax.llm.study.units): every unit of work records the key of what it depends on,
writes its outputs, then an atomic DONE.json; a rerun skips units done for their current key,
resumes units of the same key (datasets shard by shard, training from its last checkpoint) and
redoes stale ones. Randomness is derived from the seed by fold_in (per dataset, per shard, indices
naming the unit), so a resumed run reproduces an uninterrupted one exactly. Wall-clock times go to
timings.json, never to results.json (which is deterministic).
"""

from __future__ import annotations

import glob
import math
import os
import shutil

import jax
import jax.numpy as jnp
from absl import logging

from kdjax import cli, distributed
from kdjax.cli import require
from kdjax.llm import data
from kdjax.llm.model import embeddings, truncation
from kdjax.llm.study import entropy, inputs, plots, records, report, runs, stats, units
from kdjax.llm.study.config import StudyConfig, validate
from kdjax.llm.study.units import Unit
from kdjax.llm.study.work import (is_done, load_dataset, loglik_and_embeddings, mark_done,
                                  mean_loglik, sample_dataset, seed_key, stage, train_models)
from kdjax.llm.train import loop as trainlib
from kdjax.llm.weights import loading


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
  """Shared state of one run: the config, workdir, tokenizer, prompt, its units, and a two-model
  cache."""

  def __init__(self, cfg: StudyConfig, workdir: str):
    validate(cfg)
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    self.units = units.StudyUnits(cfg)
    self.gt_spec = inputs.resolve_spec(cfg.ground_truth)
    self.eos_id = loading.describe_spec(self.gt_spec)[0].eos_token_id
    self.tokenizer = inputs.load_tokenizer(cfg)
    self.prompt = inputs.prompt_ids(cfg, self.tokenizer)
    self.runs = runs.RunInputs(cfg, self.workdir, tuple(self.prompt), self.eos_id)
    self.seq_len = self.runs.seq_len
    self.timings: dict = {}
    self._models: dict = {}

  def path(self, rel: str) -> str:
    return os.path.join(self.workdir, rel)

  def model(self, spec: str):
    """(config, params) of a spec for sampling and scoring (for_inference), keeping the two last
    used (p* and one student while scoring)."""
    if spec not in self._models:
      while len(self._models) >= 2:
        self._models.pop(next(iter(self._models)))
      self._models[spec] = for_inference(*loading.load_model(spec), self.cfg.dtype)
    self._models[spec] = self._models.pop(spec)  # most recently used last
    return self._models[spec]

  def sample(self, unit: Unit, spec: str, num: int, temperature: float, desc: str,
             knob: str = "temperature") -> None:
    """Sample a dataset unit at `temperature`, or under a truncation knob at its value
    `temperature` (T = 1: kdjax.llm.model.truncation.sampler_kwargs)."""
    out = unit.dir(self.workdir)
    if not is_done(out):
      kw = truncation.sampler_kwargs(knob, temperature)
      sample_dataset(out, *self.model(spec), self.prompt, self.tokenizer,
                     seed_key(*unit.stream), num=num, temperature=kw.pop("temperature"),
                     cfg=self.cfg, eos_id=self.eos_id, desc=desc, draw_kwargs=kw or None)

  def run(self, name: str, todo: list[Unit], fn) -> None:
    """Run fn(unit, *unit.args) for the units not done for their key (a stale unit is removed
    first, a partial one of the same key resumed), timed as stage `name`."""
    verdicts = {u.rel: records.status(u, self.workdir) for u in todo}
    todo_now = [u for u in todo if verdicts[u.rel][0] != "cached"]
    distributed.sync("kdjax_stage_listed")  # every process has its list before any unit changes
    if not todo_now:
      logging.info("stage %s: done already", name)
      return
    logging.info("stage %s: %d of %d units to run (%s)", name, len(todo_now), len(todo),
                 ", ".join(u.rel for u in todo_now[:6]) + (", ..." if len(todo_now) > 6 else ""))
    with stage(self.workdir, name, self.timings):
      for u in todo_now:
        verdict, reason = verdicts[u.rel]
        if verdict == "redo":
          logging.warning("%s: %s; redoing it", u.rel, reason)
        claim(u, self.workdir, redo=verdict == "redo")
        fn(u, *u.args)
        distributed.sync("kdjax_unit_done")  # its DONE.json is written before anyone reads it


def claim(unit: Unit, workdir: str, redo: bool = False) -> None:
  """records.claim by process 0, the others waiting until the unit's directory is ready."""
  if jax.process_index() == 0:
    records.claim(unit, workdir, redo)
  distributed.sync("kdjax_claimed")


def check_prompt_lens(st: Study) -> None:
  """Refuse datasets sampled before rows recorded their prompt length, when the prompt has more
  than one token: they read as prompt length 1, so the rest of their prompt would be scored."""
  if len(st.prompt) == 1:
    return
  for pattern in (("pstar", "*"), ("seed_*", "teacher_T*", "*"), ("seed_*", "student_samples", "*")):
    for d in sorted(glob.glob(os.path.join(st.workdir, *pattern))):
      require(data.has_prompt_lens(d), f"{d} was sampled before datasets recorded their prompt "
              f"length (its {len(st.prompt)}-token prompt would be scored): use a new --workdir")


def cache_report(cfg: StudyConfig, workdir: str) -> str:
  """What a run in `workdir` would reuse and what it would run, per stage (for --dry_run)."""
  workdir = os.path.abspath(workdir)
  lines = [f"workdir {workdir}:"]
  study_units = units.StudyUnits(cfg)
  for name, us in study_units.by_stage(workdir).items():
    by = {"cached": [], "resume": [], "run": [], "redo": []}
    for u in us:
      verdict, reason = records.status(u, workdir)
      by[verdict].append(f"{u.rel}: {reason}" if reason else u.rel)
    parts = [f"{len(by['cached'])} cached"]
    for what, label in (("redo", "to redo"), ("resume", "to resume"), ("run", "to run")):
      if by[what]:
        names = by[what][:8] + ([f"... {len(by[what]) - 8} more"] if len(by[what]) > 8 else [])
        parts.append(f"{len(by[what])} {label} ({', '.join(names)})")
    pending = study_units.pending_scores(workdir) if name == "5_score_students" else 0
    if pending:
      parts.append(f"{pending} chosen students' scores after their run's selection")
    lines.append(f"  {name}: {'; '.join(parts)}")
  lines.append("  6_results: rewritten from the scores")
  return "\n".join(lines)


def preflight(cfg: StudyConfig, workdir: str) -> Study:
  """Every input the stages will meet, checked before any runs (and before the workdir is touched):
  the models as their loaders will find them, vocabularies, tokenizer, prompt and lengths
  (inputs.check_inputs), then each training run's own checks (kdjax.llm.train.loop.preflight:
  mesh, batch sizes, specs, distillation settings). Returns the Study."""
  st = Study(cfg, workdir)
  inputs.check_inputs(cfg, st.tokenizer)
  for tcs in runs.training_runs(st.runs).values():
    for tc in tcs:
      trainlib.preflight(tc)
  return st


# ----------------------------------------------------------------------------- the study


def run_study(cfg: StudyConfig, workdir: str, st: Study | None = None) -> list[dict]:
  """Run (or resume) every stage not cached for these flags, after the pre-flight check (unless
  `st`, a Study preflight returned, is given); write results.json and return its rows."""
  st = st or preflight(cfg, workdir)
  todo = st.units.by_stage(st.workdir)
  check_prompt_lens(st)
  st.run("1_sample_ground_truth", todo["1_sample_ground_truth"],
         lambda u, n: st.sample(u, st.gt_spec, n, 1.0, f"p* {os.path.basename(u.rel)}"))
  st.run("2_train_teacher", todo["2_train_teacher"],
         lambda u, seed: train_models(u.dir(st.workdir), runs.teacher_run(st.runs, seed)))
  st.run("3_sample_teacher", todo["3_sample_teacher"],
         lambda u, seed, n, t, desc, knob: st.sample(u, teacher_spec(st, seed), n, t, desc, knob))
  # Students keep their final parameters (one epoch ending in the WSD decay); each one's validation
  # perplexity, on held-out samples of its own training distribution, is measured in stage 5.
  st.run("4_train_students", todo["4_train_students"],
         lambda u, seed, kind, knob: train_models(
             u.dir(st.workdir),
             runs.student_run(st.runs, seed, kind, teacher_spec(st, seed), knob)))
  scorers = {"pstar_val": embed_pstar_val, "student": score_student,
             "teacher_entropy": measure_entropy, "selection": select_students}
  score = lambda u, what, *a: scorers[what](st, u, *a)  # noqa: E731
  st.run("5_score_students", todo["5_score_students"], score)
  listed = {u.rel for u in todo["5_score_students"]}  # --score_rates=chosen: the chosen students'
  late = [u for u in st.units.by_stage(st.workdir)["5_score_students"] if u.rel not in listed]
  if late:  # scores, known once their run's selection is done
    st.run("5_score_students", late, score)
  with stage(st.workdir, "6_results", st.timings):
    rows = report.results_rows(cfg, st.workdir, st.seq_len)
    if jax.process_index() == 0:  # the files are the same on every process: one writes them
      report.write_results(st.workdir, rows, cfg)
      report.write_embedding_map(cfg, st.workdir, rows)
  return report.choose_rates(rows)[0]


def teacher_spec(st: Study, seed: int) -> str:
  """The `ckpt:` spec of the teacher seed `seed`'s units read."""
  return checkpoint_spec(st, st.units.teacher(seed).rel, 0)


def checkpoint_spec(st: Study, rel: str, j: int) -> str:
  """The `ckpt:` spec of model j of the training run at `rel` (its DONE.json names checkpoints
  relative to the run's directory)."""
  model = records.read_record(st.path(rel))["models"][j]
  return "ckpt:" + os.path.join(st.path(rel), model["checkpoint"])


def measure_entropy(st: Study, unit: Unit, seed: int, value: float, knob: str) -> None:
  """The teacher's mean per-token entropy on p*'s select split under a knob's value
  (kdjax.llm.study.entropy) -> DONE.json {"entropy", "knob", "value"}."""
  select = load_dataset(st.path(st.units.pstar("select", seed).rel))
  batches = data.eval_batches(select, st.cfg.eval_batch_size, st.seq_len)
  h = entropy.mean_entropy(*st.model(teacher_spec(st, seed)), batches, knob, value)
  logging.info("teacher entropy %s=%g seed %d: %.4f nats per token", knob, value, seed, h)
  mark_done(unit.dir(st.workdir), {"entropy": h, "knob": knob, "value": value})


def select_students(st: Study, unit: Unit, seed: int, kind: str, knob: str) -> None:
  """Every student of a training run (each value and learning rate) measured on p*'s select split
  (held out from every training run, never recall's val set); the best of each value is chosen
  (stats.best_per_group) -> DONE.json {"select_loglik": {name: ...}, "chosen": [names]}."""
  select = load_dataset(st.path(st.units.pstar("select", seed).rel))
  grid = st.cfg.student_grid(kind, knob)
  lls = {name: mean_loglik(*st.model(checkpoint_spec(st, st.units.layout.students(seed, kind, knob),
                                                     j)),
                           select, st.cfg.eval_batch_size, st.seq_len, f"select {name} seed {seed}")
         for j, (name, _, _) in enumerate(grid)}
  chosen = stats.best_per_group((t, name, lls[name]) for name, t, _ in grid)
  logging.info("%s seed %d: chosen %s", kind, seed, ", ".join(chosen))
  mark_done(unit.dir(st.workdir), {"select_loglik": lls, "chosen": chosen})


def score_student(st: Study, unit: Unit, seed: int, kind: str, j: int, name: str, t,
                  knob: str = "temperature") -> None:
  """Sample student `name` at T=1, score the samples under p* (precision), score p*'s validation
  samples under the student (recall); DONE.json holds the three numbers."""
  cfg, out = st.cfg, unit.dir(st.workdir)
  layout = st.units.layout
  student = checkpoint_spec(st, layout.students(seed, kind, knob), j)
  samples_unit = st.units.student_samples(seed, kind, name, knob)
  claim(samples_unit, st.workdir)
  st.sample(samples_unit, student, cfg.num_eval_samples, 1.0, f"student {name} seed {seed}")
  b, n = cfg.eval_batch_size, st.seq_len
  pstar_val = st.units.pstar("val", seed).rel
  recall = mean_loglik(*st.model(student), load_dataset(st.path(pstar_val)), b, n,
                       f"recall {name} seed {seed}")
  own_val = layout.held_out(seed, kind, t, knob)
  val = recall if own_val == pstar_val else mean_loglik(
      *st.model(student), load_dataset(st.path(own_val)), b, n, f"val {name} seed {seed}")
  precision, emb_NxD = loglik_and_embeddings(*st.model(st.gt_spec),
                                             load_dataset(samples_unit.dir(st.workdir)), b, n,
                                             f"precision {name} seed {seed}")
  mark_done(out, {"precision": precision, "recall": recall, "val_perplexity": math.exp(-val),
                  "val_data": own_val, "embeddings": embeddings.save(out, emb_NxD),
                  "rows": int(emb_NxD.shape[0])})


def embed_pstar_val(st: Study, unit: Unit, seed: int) -> None:
  """p*'s reference samples for the sample-based measures and the map (the first
  units.num_reference of its validation split), embedded by p* -> out/embeddings.npy."""
  out = unit.dir(st.workdir)
  ds = load_dataset(st.path(st.units.pstar("val", seed).rel))
  ds = ds.select(range(units.num_reference(st.cfg)))
  _, emb_NxD = loglik_and_embeddings(*st.model(st.gt_spec), ds, st.cfg.eval_batch_size,
                                     st.seq_len, "embed p* val", loglik=False)
  mark_done(out, {"sequences": len(ds), "embeddings": embeddings.save(out, emb_NxD)})


# ----------------------------------------------------------------------------- the workdir


def prepare_workdir(cfg: StudyConfig, workdir: str, overwrite: bool) -> None:
  """Make the workdir (every process has looked at it first): with `overwrite` a previous run's
  outputs are removed; config.json records the flags of the last run."""
  existed = os.path.exists(os.path.join(workdir, cli.CONFIG_NAME))
  distributed.sync("kdjax_study_start")  # every process has looked before the workdir changes
  if jax.process_index() == 0:
    if existed and overwrite:
      clear_outputs(workdir)
    os.makedirs(workdir, exist_ok=True)
    cli.atomic_write_json(os.path.join(workdir, cli.CONFIG_NAME), cfg.to_dict())
  distributed.sync("kdjax_study_workdir")
  logging.info("%s %s", "reusing" if existed and not overwrite else "starting", workdir)


OUTPUTS = (("pstar", "teacher", "embeddings", "teacher_entropy", "results.json", "results.csv",
           "comparisons.csv", "timings.json", "embedding_map.png") + plots.FIGURES
           + plots.ENTROPY_FIGURES)


def clear_outputs(workdir: str) -> None:
  """Remove a previous configuration's outputs (only the names this pipeline writes)."""
  names = list(OUTPUTS) + [n for n in os.listdir(workdir) if n.startswith("seed_")]
  for n in names:
    p = os.path.join(workdir, n)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)
