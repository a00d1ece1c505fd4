"""The SmolLM2 study's tables and figures: results.csv and PNGs from results.json's rows.

Rows: {"student": "direct"|"kd", "temperature": float|None, "seed", "precision", "recall",
"val_perplexity"}. Figures average over seeds (error bars: min..max over seeds).
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict

import numpy as np

from kdjax.cli import atomic_write_bytes, atomic_write_text

COLUMNS = ("student", "temperature", "seed", "precision", "recall", "val_perplexity")
FIGURES = ("precision_recall_vs_temperature.png", "precision_vs_recall.png")


def write_csv(rows: list[dict], path: str) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
  w.writeheader()
  for r in rows:
    w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
  atomic_write_text(path, buf.getvalue())


def summarize(rows: list[dict]) -> dict:
  """{'kd': {T: {metric: (mean, lo, hi)}}, 'direct': {metric: (mean, lo, hi)}} over seeds."""
  groups = defaultdict(list)
  for r in rows:
    groups[(r["student"], r["temperature"])].append(r)
  out = {"kd": {}, "direct": {}}
  for (student, t), rs in groups.items():
    stats = {}
    for m in ("precision", "recall", "val_perplexity"):
      v = np.asarray([r[m] for r in rs], float)
      stats[m] = (float(v.mean()), float(v.min()), float(v.max()))
    if student == "direct":
      out["direct"] = stats
    else:
      out["kd"][float(t)] = stats
  return out


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  atomic_write_bytes(path, buf.getvalue())


def write_figures(rows: list[dict], workdir: str, title: str = "") -> list[str]:
  """Precision and recall against temperature (direct student dashed), and precision vs recall."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  s = summarize(rows)
  temps = sorted(s["kd"])
  paths = [os.path.join(workdir, name) for name in FIGURES]

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, metric in zip(axes, ("precision", "recall")):
    mean = np.asarray([s["kd"][t][metric][0] for t in temps])
    lo = np.asarray([s["kd"][t][metric][1] for t in temps])
    hi = np.asarray([s["kd"][t][metric][2] for t in temps])
    ax.errorbar(temps, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3,
                label="KD student (teacher sampled at T)")
    if s["direct"]:
      ax.axhline(s["direct"][metric][0], color="k", linestyle="--", label="direct student")
    ax.set_xlabel("teacher sampling temperature T")
    ax.set_ylabel(f"{metric} (log-likelihood per token)")
    ax.set_title(metric)
  axes[0].legend(fontsize=8)
  fig.subplots_adjust(wspace=0.35)
  if title:
    fig.suptitle(title, fontsize=9)
  _save(fig, paths[0])
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(4.6, 3.8))
  for t in temps:
    ax.scatter(s["kd"][t]["recall"][0], s["kd"][t]["precision"][0], marker="o")
    ax.annotate(f"T={t:g}", (s["kd"][t]["recall"][0], s["kd"][t]["precision"][0]), fontsize=8,
                xytext=(4, 4), textcoords="offset points")
  if s["direct"]:
    ax.scatter(s["direct"]["recall"][0], s["direct"]["precision"][0], marker="s", color="k")
    ax.annotate("direct", (s["direct"]["recall"][0], s["direct"]["precision"][0]), fontsize=8,
                xytext=(4, -10), textcoords="offset points")
  ax.set_xlabel("recall: E_p* log p''(x) per token")
  ax.set_ylabel("precision: E_p'' log p*(x) per token")
  ax.set_title("precision vs recall (mean over seeds)", fontsize=9)
  _save(fig, paths[1])
  plt.close(fig)
  return paths


def format_table(rows: list[dict]) -> str:
  lines = [f"{'student':8s} {'T':>6s} {'seed':>4s} {'precision':>10s} {'recall':>10s} {'val_ppl':>10s}"]
  for r in rows:
    t = "-" if r["temperature"] is None else f"{r['temperature']:g}"
    lines.append(f"{r['student']:8s} {t:>6s} {r['seed']:>4d} {r['precision']:>10.4f} "
                 f"{r['recall']:>10.4f} {r['val_perplexity']:>10.2f}")
  return "\n".join(lines)
