"""The SmolLM2 study's tables and figures: results.csv, the summary and PNGs from results.json's rows.

Rows: {"objective": student kind (direct, seqkd, fkl, ...), "temperature": T (None for direct),
"seed", "precision", "recall", "val_perplexity", and the sample-based measures (kdjax.sample_metrics):
"knn_precision", "knn_recall", "mauve" (None without mauve-text), "distinct_1/2/3", "mean_length"}.
The summary (kdjax.llm.study.stats.summarize) groups rows by (objective, T): the mean over seeds,
its standard error (sample standard deviation / sqrt(n)) and 95% t-interval (None with one seed;
all None when a row lacks the value). Figures show the means with their 95% intervals as error
bars; the markdown table mean ± standard error.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict

import numpy as np

from kdjax.cli import atomic_write_bytes, atomic_write_text
from kdjax.llm.study import stats
from kdjax.llm.study.stats import summarize  # noqa: F401 (plots.summarize: report.py's name)

SAMPLE_METRICS = ("knn_precision", "knn_recall", "mauve", "distinct_1", "distinct_2", "distinct_3",
                  "mean_length")
BUDGET = ("steps", "train_sequences", "train_tokens", "train_flops", "sampling_flops")
COLUMNS = (("objective", "temperature", "knob", "knob_value", "teacher_entropy", "seed",
            "precision", "recall", "val_perplexity")
           + SAMPLE_METRICS + BUDGET)
METRICS = stats.METRICS  # precision, recall, val_perplexity and SAMPLE_METRICS
FIGURES = ("precision_vs_recall.png", "precision_recall_vs_temperature.png",
           "knn_vs_likelihood.png")
ENTROPY_FIGURES = ("precision_vs_entropy.png", "recall_vs_entropy.png")


def write_csv(rows: list[dict], path: str) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
  atomic_write_text(path, buf.getvalue())


def _by_kind(summary: list[dict]) -> dict[str, list[dict]]:
  kinds = defaultdict(list)
  for e in summary:
    kinds[e["objective"]].append(e)
  for es in kinds.values():
    es.sort(key=lambda e: -1.0 if e["temperature"] is None else e["temperature"])
  return kinds


def _err(es: list[dict], metric: str):
  """Error bars [2, n] (below, above the mean) of the 95% t-intervals; None where any is missing
  (one seed)."""
  lo, hi = [e[f"{metric}_ci95_low"] for e in es], [e[f"{metric}_ci95_high"] for e in es]
  if any(x is None for x in lo + hi):
    return None
  mean = np.asarray([e[f"{metric}_mean"] for e in es])
  return np.stack([mean - np.asarray(lo), np.asarray(hi) - mean])


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())


def _plane(plt, kinds: dict, path: str, title: str) -> None:
  """The precision-recall plane: one curve per kind through its temperatures (points labelled by
  T), direct as a black square; bars are 95% t-intervals over seeds."""
  fig, ax = plt.subplots(figsize=(6.4, 5.0))
  for kind, es in kinds.items():
    x = [e["recall_mean"] for e in es]
    y = [e["precision_mean"] for e in es]
    if kind == "direct":
      ax.errorbar(x, y, xerr=_err(es, "recall"), yerr=_err(es, "precision"), marker="s",
                  color="k", linestyle="none", capsize=3, label="direct", zorder=5)
      continue
    line = ax.errorbar(x, y, xerr=_err(es, "recall"), yerr=_err(es, "precision"), marker="o",
                       capsize=2, label=kind, markersize=4)
    for e in es:
      ax.annotate(f"{e['temperature']:g}", (e["recall_mean"], e["precision_mean"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points", color=line[0].get_color())
  ax.set_xlabel("recall: E_p* log p''(x) per token")
  ax.set_ylabel("precision: E_p'' log p*(x) per token")
  ax.set_title((title + "\n" if title else "") + "points labelled by the teacher's T; "
               "bars: 95% t-interval over seeds", fontsize=8)
  ax.legend(fontsize=8)
  _save(fig, path)
  plt.close(fig)


UNITS = {"precision": "log-likelihood per token", "recall": "log-likelihood per token",
         "knn_precision": "fraction of samples", "knn_recall": "fraction of p*'s samples"}


def _versus_temperature(plt, kinds: dict, path: str, title: str,
                        grid=(("precision", "recall"),)) -> None:
  """Metrics against the teacher's temperature, one panel per metric of `grid` (rows of panels),
  one line per kind; direct dashed; bars are 95% t-intervals over seeds. Entries without a value
  are left out."""
  fig, axes = plt.subplots(len(grid), len(grid[0]), figsize=(10, 3.8 * len(grid)), squeeze=False)
  for ax, metric in zip(axes.flat, [m for row in grid for m in row]):
    for kind, es in kinds.items():
      es = [e for e in es if e[f"{metric}_mean"] is not None]
      if not es:
        continue
      if kind == "direct":
        ax.axhline(es[0][f"{metric}_mean"], color="k", linestyle="--", label="direct")
        if es[0][f"{metric}_ci95_low"] is not None:  # its 95% interval as a band
          ax.axhspan(es[0][f"{metric}_ci95_low"], es[0][f"{metric}_ci95_high"], color="k",
                     alpha=0.08, linewidth=0)
        continue
      ax.errorbar([e["temperature"] for e in es], [e[f"{metric}_mean"] for e in es],
                  yerr=_err(es, metric), marker="o", capsize=2, markersize=4, label=kind)
    ax.set_xlabel("teacher temperature T")
    ax.set_ylabel(f"{metric} ({UNITS.get(metric, '')})", fontsize=8)
    ax.set_title(metric)
  axes[0][0].legend(fontsize=7)
  fig.subplots_adjust(wspace=0.3, hspace=0.35)
  if title:
    fig.suptitle(title, fontsize=9)
  _save(fig, path)
  plt.close(fig)


def _versus_entropy(plt, summary: list[dict], metric: str, path: str, title: str) -> None:
  """`metric` against the teacher's mean per-token entropy on p*'s select split: one panel per
  kind, one curve per knob through its values (seed means of both; bars: 95% t-intervals of the
  metric over seeds; points labelled by the knob's value)."""
  cells = defaultdict(lambda: defaultdict(list))
  for e in summary:
    if e.get("knob") and e.get("teacher_entropy_mean") is not None:
      cells[e["objective"]][e["knob"]].append(e)
  kinds = list(cells)
  fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(4.6 * max(len(kinds), 1), 3.8),
                           squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    for knob, es in cells[kind].items():
      es = sorted(es, key=lambda e: e["teacher_entropy_mean"])
      line = ax.errorbar([e["teacher_entropy_mean"] for e in es], [e[f"{metric}_mean"] for e in es],
                         yerr=_err(es, metric), marker="o", capsize=2, markersize=4, label=knob)
      for e in es:
        ax.annotate(f"{e['knob_value']:g}", (e["teacher_entropy_mean"], e[f"{metric}_mean"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points",
                    color=line[0].get_color())
    ax.set_xlabel("teacher's mean per-token entropy on p*'s select split (nats)", fontsize=8)
    ax.set_ylabel(f"{metric} ({UNITS.get(metric, '')})", fontsize=8)
    ax.set_title(kind)
    ax.legend(fontsize=7)
  fig.suptitle((title + "\n" if title else "") + f"{metric} against the teacher's entropy, one "
               "curve per knob; bars: 95% t-interval over seeds", fontsize=8, y=1.06)
  _save(fig, path)
  plt.close(fig)


def write_figures(rows: list[dict], workdir: str, title: str = "") -> list[str]:
  """The temperature figures (FIGURES: the temperature students and direct) and, when rows
  carry the teacher's entropy, ENTROPY_FIGURES (every knob)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kinds = _by_kind(summarize(stats.temperature_rows(rows)))
  paths = [os.path.join(workdir, name) for name in FIGURES]
  _plane(plt, kinds, paths[0], title)
  _versus_temperature(plt, kinds, paths[1], title)
  _versus_temperature(plt, kinds, paths[2], title + ("\n" if title else "") + "likelihood "
                      "(top) and k-NN (bottom, in p*'s embedding space) precision and recall",
                      grid=(("precision", "recall"), ("knn_precision", "knn_recall")))
  if any(r.get("teacher_entropy") is not None for r in rows):
    summary = summarize(rows)
    for metric, name in zip(("precision", "recall"), ENTROPY_FIGURES):
      paths.append(os.path.join(workdir, name))
      _versus_entropy(plt, summary, metric, paths[-1], title)
  return paths


def _pm(mean: float | None, se, digits: int) -> str:
  if mean is None:
    return "-"
  return f"{mean:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def format_table(rows: list[dict]) -> str:
  """The summary as a markdown table: mean ± standard error over seeds per (objective, T)."""
  lines = ["| objective | T | seeds | precision | recall | val perplexity | k-NN precision | "
           "k-NN recall | distinct-2 |", "|---|---|---|---|---|---|---|---|---|"]
  for e in summarize(rows):
    t = ("-" if e["temperature"] is None else f"{e['temperature']:g}" if
         e.get("knob") in (None, "temperature") else f"{e['knob']}={e['knob_value']:g}")
    lines.append(f"| {e['objective']} | {t} | {e['n']} | "
                 f"{_pm(e['precision_mean'], e['precision_se'], 2)} | "
                 f"{_pm(e['recall_mean'], e['recall_se'], 2)} | "
                 f"{_pm(e['val_perplexity_mean'], e['val_perplexity_se'], 0)} | "
                 f"{_pm(e['knn_precision_mean'], e['knn_precision_se'], 3)} | "
                 f"{_pm(e['knn_recall_mean'], e['knn_recall_se'], 3)} | "
                 f"{_pm(e['distinct_2_mean'], e['distinct_2_se'], 3)} |")
  return "\n".join(lines)
