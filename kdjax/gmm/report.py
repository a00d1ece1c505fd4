"""From the grid's arrays to results.json / results.csv rows and a per-objective summary.

Every row says whether the study stands behind it (`status`):
  ok             finite precision and recall, and the student's training converged;
  not_converged  finite, but the student's training did not converge (EM hit em_max_iter; a
                 gradient student's objective still moved more than --convergence_tol);
  non_finite     precision or recall is NaN or infinite: the value is null, `note` says which.
Only `ok` rows enter the summary's means; the summary counts the rows it left out.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from kdjax import cli
from kdjax.gmm.study import EXACT

ROW_KEYS = ("objective", "beta", "seed", "precision", "recall", "teacher_entropy", "status",
            "converged", "final_objective", "objective_change", "objective_gap", "note")


def _num(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def _judge(row: dict, raw: dict) -> dict:
  """Fill status / note from the raw (unconverted) precision and recall."""
  bad = [f"{k} was {raw[k]}" for k in ("precision", "recall") if not math.isfinite(raw[k])]
  if bad:
    row.update(status="non_finite", note="; ".join(bad))
  elif not row["converged"]:
    row.update(status="not_converged", note="training did not converge")
  else:
    row.update(status="ok", note=None)
  return row


def rows_from_outputs(methods, out: dict, seeds_S, betas_B) -> list[dict]:
  """One row per (method, seed, beta); direct does not depend on beta: one row per seed, beta null.

  teacher_entropy is the sharpened teacher's weight entropy (null for direct, which has no teacher).
  """
  seeds_S = np.asarray(seeds_S)
  betas_B = np.asarray(betas_B)
  entropy_SxB = np.asarray(out["teacher_entropy"])
  rows = []
  for m in methods:
    arrays = {key: np.asarray(out[key][m]) for key in
              ("precision", "recall", "converged", "final_objective", "objective_change",
               "objective_gap")}
    for s, seed in enumerate(seeds_S):
      for b, beta in enumerate(betas_B if m != "direct" else [None]):
        at = (s, b if beta is not None else 0)
        raw = {k: float(arrays[k][at]) for k in ("precision", "recall")}
        row = {"objective": m, "beta": None if beta is None else float(beta), "seed": int(seed),
               "precision": _num(raw["precision"]), "recall": _num(raw["recall"]),
               "teacher_entropy": None if beta is None else _num(entropy_SxB[at]),
               "converged": bool(arrays["converged"][at]),
               "final_objective": _num(arrays["final_objective"][at]),
               "objective_change": _num(arrays["objective_change"][at]),
               "objective_gap": _num(arrays["objective_gap"][at])}
        rows.append(_judge(row, raw))
  return rows


def problems(rows: list[dict]) -> list[str]:
  """One line per (objective, status) for the rows the study does not stand behind, naming the
  betas and seeds concerned."""
  lines = []
  for m in dict.fromkeys(r["objective"] for r in rows):
    for status, what in (("non_finite", "non-finite precision or recall (null in results.json)"),
                         ("not_converged", "training did not converge")):
      bad = [r for r in rows if r["objective"] == m and r["status"] == status]
      if not bad:
        continue
      betas = sorted({r["beta"] for r in bad if r["beta"] is not None})
      seeds = sorted({r["seed"] for r in bad})
      where = (f"betas {', '.join(f'{b:g}' for b in betas)}; " if betas else "") + \
          f"seeds {', '.join(map(str, seeds))}"
      lines.append(f"{m}: {len(bad)} of {sum(r['objective'] == m for r in rows)} rows: {what} "
                   f"({where}); left out of the summary and figure means")
  return lines


def summarize(rows: list[dict]) -> dict:
  """Mean and standard error over seeds of precision / recall per objective at the smallest and
  largest beta (direct: over its beta-free rows), from `ok` rows only; `n` rows used, `left_out`
  rows not (not converged or non-finite)."""
  out = {}
  betas = sorted({r["beta"] for r in rows if r["beta"] is not None})
  for m in dict.fromkeys(r["objective"] for r in rows):
    mine = [r for r in rows if r["objective"] == m]
    picks = {"any": mine} if m == "direct" else {
        f"beta={b:g}": [r for r in mine if r["beta"] == b] for b in (betas[0], betas[-1])}
    out[m] = {}
    for label, rs in picks.items():
      ok = [r for r in rs if r["status"] == "ok"]
      entry = {"n": len(ok), "left_out": len(rs) - len(ok)}
      for key in ("precision", "recall"):
        v = np.array([r[key] for r in ok], float)
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
            "exact_objective": EXACT,
            "left_out": {s: sum(r["status"] == s for r in rows)
                         for s in ("not_converged", "non_finite")}}
  cli.atomic_write_json(f"{workdir}/results.json", result)
  cli.atomic_write_text(f"{workdir}/results.csv", csv_text(rows))
  return result
