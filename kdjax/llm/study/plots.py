"""The SmolLM2 study's tables and figures: results.csv, the summary and PNGs from results.json's rows.

Rows: {"objective": student kind (direct, seqkd, fkl, ...), "temperature": T (None for direct),
"seed", "precision", "recall", "val_perplexity", and the sample-based measures (kdjax.sample_metrics):
"knn_precision", "knn_recall", "mauve" (None without mauve-text), "distinct_1/2/3", "mean_length"}.
The summary groups rows by (objective, T): the mean over seeds and its standard error (sample
standard deviation / sqrt(n); None with one seed; both None when a row lacks the value). Figures
show the means with standard-error bars.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict

import numpy as np

from kdjax.cli import atomic_write_bytes, atomic_write_text

SAMPLE_METRICS = ("knn_precision", "knn_recall", "mauve", "distinct_1", "distinct_2", "distinct_3",
                  "mean_length")
BUDGET = ("steps", "train_sequences", "train_tokens", "train_flops", "sampling_flops")
COLUMNS = (("objective", "temperature", "seed", "precision", "recall", "val_perplexity")
           + SAMPLE_METRICS + BUDGET)
METRICS = ("precision", "recall", "val_perplexity") + SAMPLE_METRICS
FIGURES = ("precision_vs_recall.png", "precision_recall_vs_temperature.png",
           "knn_vs_likelihood.png")


def write_csv(rows: list[dict], path: str) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
  atomic_write_text(path, buf.getvalue())


def _mean_se(values) -> tuple[float | None, float | None]:
  if any(x is None for x in values):
    return None, None
  v = np.asarray(values, np.float64)
  se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
  return float(v.mean()), se


def summarize(rows: list[dict]) -> list[dict]:
  """[{objective, temperature, n, <metric>_mean, <metric>_se}] per (objective, T), in row order."""
  groups = defaultdict(list)
  for r in rows:
    groups[(r["objective"], r["temperature"])].append(r)
  out = []
  for (kind, t), rs in groups.items():
    entry = {"objective": kind, "temperature": t, "n": len(rs)}
    for m in METRICS:
      entry[f"{m}_mean"], entry[f"{m}_se"] = _mean_se([r.get(m) for r in rs])
    out.append(entry)
  return out


def _by_kind(summary: list[dict]) -> dict[str, list[dict]]:
  kinds = defaultdict(list)
  for e in summary:
    kinds[e["objective"]].append(e)
  for es in kinds.values():
    es.sort(key=lambda e: -1.0 if e["temperature"] is None else e["temperature"])
  return kinds


def _err(es: list[dict], metric: str):
  se = [e[f"{metric}_se"] for e in es]
  return None if any(s is None for s in se) else np.asarray(se)


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())


def _plane(plt, kinds: dict, path: str, title: str) -> None:
  """The precision-recall plane: one curve per kind through its temperatures (points labelled by
  T), direct as a black square; bars are standard errors over seeds."""
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
               "bars: standard error over seeds", fontsize=8)
  ax.legend(fontsize=8)
  _save(fig, path)
  plt.close(fig)


UNITS = {"precision": "log-likelihood per token", "recall": "log-likelihood per token",
         "knn_precision": "fraction of samples", "knn_recall": "fraction of p*'s samples"}


def _versus_temperature(plt, kinds: dict, path: str, title: str,
                        grid=(("precision", "recall"),)) -> None:
  """Metrics against the teacher's temperature, one panel per metric of `grid` (rows of panels),
  one line per kind; direct dashed. Entries without a value are left out."""
  fig, axes = plt.subplots(len(grid), len(grid[0]), figsize=(10, 3.8 * len(grid)), squeeze=False)
  for ax, metric in zip(axes.flat, [m for row in grid for m in row]):
    for kind, es in kinds.items():
      es = [e for e in es if e[f"{metric}_mean"] is not None]
      if not es:
        continue
      if kind == "direct":
        ax.axhline(es[0][f"{metric}_mean"], color="k", linestyle="--", label="direct")
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


def write_figures(rows: list[dict], workdir: str, title: str = "") -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  kinds = _by_kind(summarize(rows))
  paths = [os.path.join(workdir, name) for name in FIGURES]
  _plane(plt, kinds, paths[0], title)
  _versus_temperature(plt, kinds, paths[1], title)
  _versus_temperature(plt, kinds, paths[2], title + ("\n" if title else "") + "likelihood "
                      "(top) and k-NN (bottom, in p*'s embedding space) precision and recall",
                      grid=(("precision", "recall"), ("knn_precision", "knn_recall")))
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
    t = "-" if e["temperature"] is None else f"{e['temperature']:g}"
    lines.append(f"| {e['objective']} | {t} | {e['n']} | "
                 f"{_pm(e['precision_mean'], e['precision_se'], 2)} | "
                 f"{_pm(e['recall_mean'], e['recall_se'], 2)} | "
                 f"{_pm(e['val_perplexity_mean'], e['val_perplexity_se'], 0)} | "
                 f"{_pm(e['knn_precision_mean'], e['knn_precision_se'], 3)} | "
                 f"{_pm(e['knn_recall_mean'], e['knn_recall_se'], 3)} | "
                 f"{_pm(e['distinct_2_mean'], e['distinct_2_se'], 3)} |")
  return "\n".join(lines)
