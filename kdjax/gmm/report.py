"""From the grid's arrays to results.json / results.csv rows and a per-objective summary."""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from kdjax import cli
from kdjax.gmm.study import EXACT

ROW_KEYS = ("objective", "beta", "seed", "precision", "recall", "teacher_entropy")


def _num(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def rows_from_outputs(methods, out: dict, seeds_S, betas_B) -> list[dict]:
  """One row per (method, seed, beta); direct does not depend on beta: one row per seed, beta null.

  teacher_entropy is the sharpened teacher's weight entropy (null for direct, which has no teacher).
  """
  seeds_S = np.asarray(seeds_S)
  betas_B = np.asarray(betas_B)
  entropy_SxB = np.asarray(out["teacher_entropy"])
  rows = []
  for m in methods:
    prec_SxB = np.asarray(out["precision"][m])
    rec_SxB = np.asarray(out["recall"][m])
    for s, seed in enumerate(seeds_S):
      if m == "direct":
        rows.append({"objective": m, "beta": None, "seed": int(seed),
                     "precision": _num(prec_SxB[s, 0]), "recall": _num(rec_SxB[s, 0]),
                     "teacher_entropy": None})
        continue
      for b, beta in enumerate(betas_B):
        rows.append({"objective": m, "beta": float(beta), "seed": int(seed),
                     "precision": _num(prec_SxB[s, b]), "recall": _num(rec_SxB[s, b]),
                     "teacher_entropy": _num(entropy_SxB[s, b])})
  return rows


def summarize(rows: list[dict]) -> dict:
  """Mean and standard error over seeds of precision / recall per objective at the smallest and
  largest beta (direct: over its beta-free rows)."""
  out = {}
  betas = sorted({r["beta"] for r in rows if r["beta"] is not None})
  for m in dict.fromkeys(r["objective"] for r in rows):
    mine = [r for r in rows if r["objective"] == m]
    picks = {"any": mine} if m == "direct" else {
        f"beta={b:g}": [r for r in mine if r["beta"] == b] for b in (betas[0], betas[-1])}
    out[m] = {}
    for label, rs in picks.items():
      entry = {}
      for key in ("precision", "recall"):
        v = np.array([r[key] for r in rs if r[key] is not None], float)
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
        entry[key] = {"mean": float(v.mean()) if len(v) else None, "se": se}
      out[m][label] = entry
  return out


def csv_text(rows: list[dict]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=ROW_KEYS, lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: "" if r[k] is None else r[k] for k in ROW_KEYS})
  return buf.getvalue()


def write_results(workdir: str, rows: list[dict], timing: dict, config: dict) -> dict:
  """Atomically write results.json and results.csv; returns the JSON object."""
  result = {"rows": rows, "timing": timing, "summary": summarize(rows), "config": config,
            "exact_objective": EXACT}
  cli.atomic_write_json(f"{workdir}/results.json", result)
  cli.atomic_write_text(f"{workdir}/results.csv", csv_text(rows))
  return result
