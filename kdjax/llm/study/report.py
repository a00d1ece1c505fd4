"""The study's results: one row per seed and student from the units' scores, results.json /
results.csv / figures (kdjax/llm/study/plots.py), and the embedding map."""

from __future__ import annotations

import os

import numpy as np

from kdjax import cli, sample_metrics
from kdjax.llm import data
from kdjax.llm.model import embeddings
from kdjax.llm.study import cost, embedding_map, inputs, plots, records, stats, units
from kdjax.llm.study.config import StudyConfig


def generated_tokens(path: str) -> list[list[int]]:
  """Each sampled row's generated tokens (after its prompt; the EOS included when sampled)."""
  rows = data.TokenRows(data.load_dataset_dir(path))
  return [rows.row(i)[rows.prompt_lens[i]:].tolist() for i in range(len(rows))]


def _budgets(cfg: StudyConfig, seq_len: int) -> dict:
  """{kind: cost.student_budget} (every student of a kind has the same)."""
  student, teacher = (inputs.describe(s).replace(dtype=cfg.dtype) for s in (cfg.student,
                                                                             cfg.teacher))
  return {k: cost.student_budget(cfg, k, student, teacher, seq_len) for k in cfg.students}


def results_rows(cfg: StudyConfig, workdir: str, seq_len: int) -> list[dict]:
  """One row per seed and student: objective (the kind), temperature (None for direct), seed,
  precision, recall, val_perplexity, the sample-based measures of its samples
  (kdjax.sample_metrics.sample_measures: knn_precision, knn_recall and mauve against p*'s
  reference samples in p*'s embedding space; distinct_1/2/3 and mean_length of its tokens), and
  its training budget: steps (as trained), train_sequences, train_tokens, train_flops and
  sampling_flops (on-policy; cost.student_budget); `student` (its name) and `learning_rate`;
  `knob` and `knob_value` (its teacher's setting: temperature and T, or a truncation at T = 1,
  whose rows have temperature 1.0; None for direct) and `teacher_entropy` (the teacher's mean
  per-token entropy on p*'s select split under that setting, kdjax.llm.study.entropy); with
  a --student_learning_rates sweep, every rate's student and its `select_loglik` (choose_rates
  keeps one per kind, T and seed); with --score_rates=chosen the rates not chosen have no
  scores and no sample measures (`scored`: False)."""
  path = lambda rel: os.path.join(workdir, rel)  # noqa: E731
  layout, budgets = units.Layout(cfg), _budgets(cfg, seq_len)
  rows = []
  for seed in cfg.seeds:
    reference = embeddings.load(path(layout.pstar_embeddings(layout.pstar_seed(seed))))
    for kind, knob in cfg.student_runs():
      trained = records.read_record(path(layout.students(seed, kind, knob)))["steps"]
      selection = (records.read_record(path(layout.selection(seed, kind, knob)))
                   if cfg.lr_sweep else {})
      for name, t, lr in cfg.student_grid(kind, knob):
        b = budgets[kind]
        entropy = None if t is None else records.read_record(path(layout.teacher_entropy(
            layout.teacher_seed(seed), t, knob)))["entropy"]
        row = {"objective": kind, "temperature": t if t is None or knob == "temperature" else 1.0,
               "knob": None if t is None else knob, "knob_value": t, "teacher_entropy": entropy,
               "seed": seed, "student": name, "learning_rate": lr or cfg.learning_rate,
               **({"select_loglik": selection["select_loglik"][name]} if cfg.lr_sweep else {}),
               "steps": trained, "train_sequences": b["sequences"], "train_tokens": b["tokens"],
               "train_flops": b["train_flops"], "sampling_flops": b["sampling_flops"]}
        if cfg.scores_chosen_only and name not in selection["chosen"]:
          rows.append({**row, "scored": False})  # a rate not chosen: measured on select only
          continue
        scores = path(layout.scores(seed, name))
        s = records.read_record(scores)
        rows.append({**row, "precision": s["precision"], "recall": s["recall"],
                     "val_perplexity": s["val_perplexity"],
                     **sample_metrics.sample_measures(
                         reference, embeddings.load(scores),
                         generated_tokens(path(layout.student_samples(seed, name))),
                         k=cfg.knn_k, seed=cfg.seed)})
  return rows


def choose_rates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
  """(chosen, sweep): per (objective, temperature, seed) the row of best `select_loglik` (p*'s
  select split, held out from every training run and never recall's val set); `sweep` is every
  row with `chosen` marked ([] without a sweep: rows are returned as they are)."""
  if not rows or "select_loglik" not in rows[0]:
    return rows, []
  chosen_ids = set(stats.best_per_group(
      ((r["objective"], r.get("knob"), r.get("knob_value", r["temperature"]), r["seed"]), id(r),
       r["select_loglik"]) for r in rows))
  return ([r for r in rows if id(r) in chosen_ids],
          [{**r, "chosen": id(r) in chosen_ids} for r in rows])


def write_results(workdir: str, rows: list[dict], cfg: StudyConfig) -> None:
  """results.csv and figures first, results.json last. results.json holds the flags of the run that
  wrote it, its rows (with a learning-rate sweep: the chosen student of each kind, T and seed;
  `lr_sweep` lists every rate's), and the summary (mean and standard error over seeds per
  objective and T)."""
  rows, sweep = choose_rates(rows)
  summary = plots.summarize(rows)
  comparisons = stats.comparisons(stats.temperature_rows(rows))
  plots.write_csv(rows, os.path.join(workdir, "results.csv"))
  stats.write_csv(comparisons, os.path.join(workdir, "comparisons.csv"))
  plots.write_figures(rows, workdir, title=f"p* = {cfg.ground_truth}, teacher {cfg.teacher}, "
                      f"students {cfg.student}")
  cli.atomic_write_json(os.path.join(workdir, "results.json"),
                        {"config": cfg.to_dict(), "rows": rows, "summary": summary,
                         "comparisons": comparisons, "lr_sweep": sweep,
                         "entropy_slopes": stats.entropy_slopes(rows)})


def write_embedding_map(cfg: StudyConfig, workdir: str, rows: list[dict]) -> None:
  """embedding_map.png (--embedding_map: umap, pca; none removes a previous run's map): p*'s
  reference samples and every student's (all seeds) in one 2-D map fitted on p*'s, seeded by
  --seed; each panel's title gives the student's k-NN precision and recall (mean over seeds)."""
  path = os.path.join(workdir, embedding_map.FIGURE)
  if cfg.embedding_map == "none":
    if os.path.exists(path):
      os.remove(path)
    return
  layout, panels = units.Layout(cfg), []
  rows = stats.temperature_rows(choose_rates(rows)[0])  # the temperature students' panels
  for e in plots.summarize(rows):
    mine = [r for r in rows if (r["objective"], r["temperature"]) ==
            (e["objective"], e["temperature"])]
    emb = [embeddings.load(os.path.join(workdir, layout.scores(r["seed"], r["student"])))
           for r in mine]
    panels.append(embedding_map.Panel(e["objective"], e["temperature"], np.concatenate(emb),
                                      e["knn_precision_mean"], e["knn_recall_mean"]))
  written = embedding_map.write(
      path, embeddings.load(os.path.join(workdir, layout.pstar_embeddings(cfg.seed))), panels,
      method=cfg.embedding_map, seed=cfg.seed,
      title=f"p* = {cfg.ground_truth}; students {cfg.student}, seeds {cfg.seeds}")
  if not written and os.path.exists(path):
    os.remove(path)
