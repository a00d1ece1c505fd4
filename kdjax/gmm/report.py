"""From the grid's arrays to results.json / results.csv rows and a per-objective summary.

Every row says whether the study stands behind it (`status`):
  ok             finite precision and recall, and the student's training converged;
  not_converged  finite, but the student's training did not converge (EM hit em_max_iter; a
                 gradient student's objective still moved more than --convergence_tol);
  non_finite     precision or recall is NaN or infinite: the value is null, `note` says which.
Only `ok` rows enter the summary's means; the summary counts the rows it left out. Rows name the
knob that made the teacher selective (beta, top_p, top_k: kdjax/gmm/knobs.py) and its value; the
summary, k-NN agreement and by-beta figures read the beta rows, `entropy_slopes` all of them.
With --knn_samples, rows also hold knn_precision and knn_recall (kdjax.sample_metrics), the summary
their means, and `knn_agreement` says how they follow the likelihood measures over beta.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from kdjax import cli
from kdjax.gmm import knobs
from kdjax.gmm.study import EXACT

ROW_KEYS = ("objective", "knob", "knob_value", "beta", "seed", "precision", "recall",
            "teacher_entropy", "teacher_density_entropy", "status", "converged",
            "final_objective", "objective_change", "objective_gap", "note")
KNN_KEYS = ("knn_precision", "knn_recall")  # present with --knn_samples only


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


def rows_from_outputs(methods, out: dict, seeds_S, betas_B, labels=None) -> list[dict]:
  """One row per (method, seed, configuration); direct does not depend on the teacher: one row
  per seed, knob and beta null. `labels` names each configuration's (knob, value) (knobs.grid;
  default: every configuration is the beta knob at betas_B); `beta` is the value for the beta
  knob and null for the others.

  teacher_entropy is the selective teacher's weight entropy, teacher_density_entropy its
  differential entropy (Monte Carlo; both null for direct, which has no teacher).
  With k-NN outputs (--knn_samples), rows also hold knn_precision and knn_recall.
  """
  seeds_S = np.asarray(seeds_S)
  labels = labels or [("beta", float(b)) for b in np.asarray(betas_B)]
  entropy_SxB = np.asarray(out["teacher_entropy"])
  density_SxB = np.asarray(out["teacher_density_entropy"])
  rows = []
  knn = [k for k in KNN_KEYS if k in out]
  for m in methods:
    arrays = {key: np.asarray(out[key][m]) for key in
              ("precision", "recall", "converged", "final_objective", "objective_change",
               "objective_gap", *knn)}
    for s, seed in enumerate(seeds_S):
      for b, (knob, value) in enumerate(labels if m != "direct" else [(None, None)]):
        at = (s, b if knob is not None else 0)
        raw = {k: float(arrays[k][at]) for k in ("precision", "recall")}
        row = {"objective": m, "knob": knob, "knob_value": value,
               "beta": float(value) if knob == "beta" else None, "seed": int(seed),
               "precision": _num(raw["precision"]), "recall": _num(raw["recall"]),
               "teacher_entropy": None if knob is None else _num(entropy_SxB[at]),
               "teacher_density_entropy": None if knob is None else _num(density_SxB[at]),
               "converged": bool(arrays["converged"][at]),
               "final_objective": _num(arrays["final_objective"][at]),
               "objective_change": _num(arrays["objective_change"][at]),
               "objective_gap": _num(arrays["objective_gap"][at]),
               **{k: _num(arrays[k][at]) for k in knn}}
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
      where = ""
      for knob in dict.fromkeys(r["knob"] for r in bad if r.get("knob")):
        vals = sorted({r["knob_value"] for r in bad if r["knob"] == knob})
        name = "betas" if knob == "beta" else knob
        where += f"{name} {', '.join(f'{v:g}' for v in vals)}; "
      where += f"seeds {', '.join(map(str, sorted({r['seed'] for r in bad})))}"
      lines.append(f"{m}: {len(bad)} of {sum(r['objective'] == m for r in rows)} rows: {what} "
                   f"({where}); left out of the summary and figure means")
  return lines


def all_non_finite(rows: list[dict]) -> str | None:
  """One line naming the objectives none of whose rows is finite (the study produced nothing for
  them: a run that must not end as a success), or None."""
  dead = [m for m in dict.fromkeys(r["objective"] for r in rows)
          if all(r["status"] == "non_finite" for r in rows if r["objective"] == m)]
  if not dead:
    return None
  return (f"every row of {', '.join(dead)} is non-finite (NaN or inf precision or recall; rows "
          "written, see their notes): the study produced no result for "
          f"{'it' if len(dead) == 1 else 'them'}")


def beta_rows(rows: list[dict]) -> list[dict]:
  """The rows of the beta knob and the knob-free direct rows: what the by-beta summary, k-NN
  agreement and figures read."""
  return [r for r in rows if r.get("knob", "beta") in (None, "beta")]


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
      for key in ("precision", "recall") + tuple(k for k in KNN_KEYS if k in rs[0]):
        v = np.array([r[key] for r in ok], float)
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
        entry[key] = {"mean": float(v.mean()) if len(v) else None, "se": se}
      out[m][label] = entry
  return out


def _ranks(v) -> np.ndarray:
  """Ranks from 0, ties given their mean rank."""
  v = np.asarray(v, float)
  order = np.argsort(v, kind="stable")
  r = np.empty(len(v))
  r[order] = np.arange(len(v))
  for x in np.unique(v):
    r[v == x] = r[v == x].mean()
  return r


def _spearman(a, b) -> float | None:
  """Spearman's rank correlation (ties ranked by their mean); None when either is constant."""
  ra, rb = _ranks(a), _ranks(b)
  if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
    return None
  return float(np.corrcoef(ra, rb)[0, 1])


def knn_agreement(rows: list[dict]) -> dict:
  """How the k-NN measures follow the likelihood ones over beta, per objective with betas (direct
  has none): from the `ok` rows, each beta's mean over seeds of precision, knn_precision, recall
  and knn_recall; Spearman's rank correlation over the betas of precision with knn_precision and
  of recall with knn_recall (null when either is constant), and the means at the smallest and
  largest beta. Empty without k-NN rows."""
  if not rows or "knn_precision" not in rows[0]:
    return {}
  out = {}
  for m in dict.fromkeys(r["objective"] for r in rows if r["beta"] is not None):
    ok = [r for r in rows if r["objective"] == m and r["status"] == "ok"]
    betas = sorted({r["beta"] for r in ok})
    means = {key: [float(np.mean([r[key] for r in ok if r["beta"] == b])) for b in betas]
             for key in ("precision", "recall") + KNN_KEYS}
    out[m] = {"betas": len(betas),
              "spearman_precision": _spearman(means["precision"], means["knn_precision"]),
              "spearman_recall": _spearman(means["recall"], means["knn_recall"])}
    for i, label in ((0, "beta_min"), (-1, "beta_max")):
      out[m][label] = {key: v[i] for key, v in means.items()} if betas else None
  return out


def csv_text(rows: list[dict]) -> str:
  keys = ROW_KEYS + tuple(k for k in KNN_KEYS if rows and k in rows[0])
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: "" if r[k] is None else r[k] for k in keys})
  return buf.getvalue()


def write_results(workdir: str, rows: list[dict], timing: dict, config: dict) -> dict:
  """Atomically write results.json and results.csv; returns the JSON object."""
  by_beta = beta_rows(rows)
  result = {"rows": rows, "timing": timing, "summary": summarize(by_beta), "config": config,
            "exact_objective": EXACT,
            "left_out": {s: sum(r["status"] == s for r in rows)
                         for s in ("not_converged", "non_finite")},
            "entropy_slopes": knobs.slopes(rows)}
  if rows and "knn_precision" in rows[0]:
    result["knn_agreement"] = knn_agreement(by_beta)
  cli.atomic_write_json(f"{workdir}/results.json", result)
  cli.atomic_write_text(f"{workdir}/results.csv", csv_text(rows))
  return result
