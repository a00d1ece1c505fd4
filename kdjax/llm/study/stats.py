"""Statistics that carry a claim: the SmolLM2 study's means over seeds with 95% t-intervals, and the
paired differences the README states, each with its interval and whether it excludes zero.

  summarize(rows)    per (objective, T): n, and per metric the mean, the standard error (sample
                     standard deviation / sqrt(n)) and the 95% t-interval mean +- t(0.975, n-1) se
                     (<metric>_mean, _se, _ci95_low, _ci95_high; se and interval None with one seed,
                     all four None when a row lacks the value)
  comparisons(rows)  paired differences by seed (a - b over the seeds both have):
                       "temperature": each T of a kind against the highest T of that kind
                                      (T = 0.8 vs 1.0 in the study's grids)
                       "vs_seqkd":    each kind against seqkd at the same T
                       "vs_direct":   each kind at each T against direct
                     with n, mean, se, the 95% t-interval and `resolved` (the interval excludes
                     zero). Pairing by seed removes what the two students share (the seed's
                     teacher, data and initialisation under common random numbers), so a
                     difference can be resolved where the two means' own intervals overlap.

The t quantile is computed here (scipy is a test-only dependency): the Student-t CDF from the
regularized incomplete beta function (its continued fraction, evaluated by the modified Lentz
method), inverted by bisection to float precision; tests/test_study_stats.py checks it against
scipy.stats.t. With 2 seeds t(0.975, 1) = 12.71: a 95% interval spans +-12.7 standard errors.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from typing import Optional

import numpy as np

from kdjax.cli import atomic_write_text

METRICS = ("precision", "recall", "val_perplexity", "knn_precision", "knn_recall", "mauve",
           "distinct_1", "distinct_2", "distinct_3", "mean_length")
# the metrics the README's comparisons read (val_perplexity is measured on different held-out
# sets for seqkd and the rest, so it is not compared across kinds)
COMPARED = ("precision", "recall", "knn_precision", "knn_recall")
CSV_COLUMNS = ("comparison", "metric", "kind", "temperature", "baseline_kind",
               "baseline_temperature", "n", "mean", "se", "ci95_low", "ci95_high", "resolved")


# ----------------------------------------------------------------------------- the t quantile


def _betacf(a: float, b: float, x: float) -> float:
  """The continued fraction of the regularized incomplete beta I_x(a, b) (modified Lentz)."""
  tiny, eps = 1e-300, 1e-16
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 10_000):
    for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + num / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < eps:
      return h
  raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b})")


def betainc(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function I_x(a, b), a, b > 0, x in [0, 1]."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
                   + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return front * _betacf(a, b, x) / a
  return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
  """P(T <= x) for Student's t with df > 0 degrees of freedom."""
  tail = 0.5 * betainc(0.5 * df, 0.5, df / (df + x * x))
  return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The p-quantile of Student's t with df degrees of freedom (p in (0, 1)), by bisection on
  t_cdf to float precision."""
  if not 0.0 < p < 1.0 or not df > 0:
    raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, 2.0 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if mid in (lo, hi):
      break
    lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
  return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- intervals


def mean_interval(values, level: float = 0.95) -> dict:
  """{n, mean, se, ci95_low, ci95_high} of a sample: the t-interval mean +- t((1 + level) / 2,
  n - 1) se; se and the interval None with fewer than two values; all None with no value or a
  missing (None) one."""
  out = {"n": len(values), "mean": None, "se": None, "ci95_low": None, "ci95_high": None}
  if not values or any(v is None for v in values):
    return out
  v = np.asarray(values, np.float64)
  out["mean"] = float(v.mean())
  if len(v) > 1:
    se = float(v.std(ddof=1) / math.sqrt(len(v)))
    half = t_quantile(0.5 + 0.5 * level, len(v) - 1) * se
    out.update(se=se, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
  return out


def best_per_group(items) -> list:
  """The id of the best value of each group, from [(group, id, value)] in order: the highest
  value, the first on ties, a non-finite value (a diverged student) below every finite one.
  The study's one rule for choosing a student's learning rate (units' selection, report)."""
  best = {}
  for group, ident, value in items:
    v = value if value is not None and math.isfinite(value) else -math.inf
    if group not in best or v > best[group][1]:
      best[group] = (ident, v)
  return [ident for ident, _ in best.values()]


def _knob(r: dict) -> str:
  """A row's teacher knob (rows without one: direct, or written before knobs: temperature)."""
  return r.get("knob") or "temperature"


def temperature_rows(rows: list[dict]) -> list[dict]:
  """The rows of the temperature students and direct (the comparisons, the temperature
  figures and the embedding map read these; a truncation knob's rows have T = 1 too)."""
  return [r for r in rows if _knob(r) == "temperature"]


def summarize(rows: list[dict], metrics=METRICS) -> list[dict]:
  """[{objective, temperature, knob, knob_value, n, <metric>_mean, _se, _ci95_low, _ci95_high}]
  per (objective, knob, value), in row order (module docstring; teacher_entropy is summarised as
  a metric when rows have it)."""
  groups = defaultdict(list)
  for r in rows:
    groups[(r["objective"], _knob(r), r.get("knob_value", r["temperature"]))].append(r)
  if any("teacher_entropy" in r for r in rows):
    metrics = tuple(metrics) + ("teacher_entropy",)
  out = []
  for (kind, knob, value), rs in groups.items():
    entry = {"objective": kind, "temperature": rs[0]["temperature"], "n": len(rs)}
    if "knob" in rs[0]:
      entry.update(knob=rs[0]["knob"], knob_value=value)
    for m in metrics:
      s = mean_interval([r.get(m) for r in rs])
      for field in ("mean", "se", "ci95_low", "ci95_high"):
        entry[f"{m}_{field}"] = s[field]
    out.append(entry)
  return out


# ----------------------------------------------------------------------------- paired differences


def _by_seed(rows: list[dict]) -> dict:
  """{(kind, T): {seed: row}}; one row per (kind, T, seed) or a ValueError."""
  cells = defaultdict(dict)
  for r in rows:
    cell = cells[(r["objective"], r["temperature"])]
    if r["seed"] in cell:
      raise ValueError(f"two rows for kind {r['objective']}, T={r['temperature']}, seed "
                       f"{r['seed']}: paired differences need one per seed")
    cell[r["seed"]] = r
  return cells


def paired(a: dict, b: dict, metric: str) -> dict:
  """mean_interval of a[seed][metric] - b[seed][metric] over the seeds both have a value for,
  plus `resolved` (the 95% interval excludes zero) and the seeds used."""
  seeds = sorted(s for s in a if s in b and a[s].get(metric) is not None
                 and b[s].get(metric) is not None)
  out = mean_interval([a[s][metric] - b[s][metric] for s in seeds])
  out["resolved"] = out["ci95_low"] is not None and (out["ci95_low"] > 0 or out["ci95_high"] < 0)
  out["seeds"] = seeds
  return out


def _pairs(cells: dict) -> list[tuple[str, tuple, tuple]]:
  """(comparison, (kind, T), (baseline kind, baseline T)) of every comparison the table allows."""
  temps = defaultdict(list)
  for kind, t in cells:
    if t is not None:
      temps[kind].append(t)
  out = []
  for kind, ts in temps.items():
    top = max(ts)
    out += [("temperature", (kind, t), (kind, top)) for t in sorted(ts) if t != top]
  for kind, ts in temps.items():
    if kind != "seqkd":
      out += [("vs_seqkd", (kind, t), ("seqkd", t)) for t in sorted(ts) if ("seqkd", t) in cells]
  for (kind, t) in cells:
    if kind != "direct" and ("direct", None) in cells:
      out.append(("vs_direct", (kind, t), ("direct", None)))
  return out


def comparisons(rows: list[dict], metrics=COMPARED) -> list[dict]:
  """The paired differences of the module docstring, one dict per (comparison, kind, T, metric):
  {comparison, metric, kind, temperature, baseline_kind, baseline_temperature, n, mean, se,
  ci95_low, ci95_high, resolved, seeds}; mean = kind's value minus the baseline's (so a positive
  precision difference means the kind is more precise). rows: results.json's rows (objective,
  temperature, seed and the metrics; one per (kind, T, seed)). Metrics no row of a pair has are
  left out; pairs with fewer than two common seeds have n < 2, se and interval None, unresolved."""
  cells = _by_seed(rows)
  out = []
  for name, (kind, t), (base, bt) in _pairs(cells):
    for m in metrics:
      d = paired(cells[(kind, t)], cells[(base, bt)], m)
      if not d["seeds"]:
        continue
      out.append({"comparison": name, "metric": m, "kind": kind, "temperature": t,
                  "baseline_kind": base, "baseline_temperature": bt, **d})
  return out


# ----------------------------------------------------------------------------- entropy slopes


def slope(x, y) -> Optional[float]:
  """Least-squares slope of y on x; None with fewer than two distinct x."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2:
    return None
  dx = x - x.mean()
  if not np.any(np.abs(dx) > 1e-9 * max(1.0, float(np.abs(x).max()))):
    return None
  return float(np.sum(dx * (y - y.mean())) / np.sum(dx * dx))


def entropy_slopes(rows: list[dict], metrics=("precision", "recall")) -> dict:
  """{kind: {knob: {metric: mean_interval of the per-seed slopes, "seed_slopes": {metric:
  {str(seed): slope}}, "entropy_range": [lo, hi]}}}: per kind and knob, each seed's least-squares
  slope of the metric (nats per token) per nat of the teacher's mean per-token entropy
  (`teacher_entropy`) over the knob's values, then the mean and 95% t-interval over seeds
  (mean_interval; a seed with fewer than two distinct entropies gives no slope); for a
  truncation knob also "minus_temperature": the interval of its per-seed slope minus the
  temperature knob's (paired by seed: the knobs share each seed's teacher and initialisation).
  Slopes equal within their intervals across knobs are what "entropy is the knob" predicts."""
  out: dict = {}
  cells = defaultdict(lambda: defaultdict(list))
  for r in rows:
    if r.get("knob") and r.get("teacher_entropy") is not None:
      cells[(r["objective"], r["knob"])][r["seed"]].append(r)
  for (kind, knob), by_seed in cells.items():
    entry: dict = {"seed_slopes": {}}
    for m in metrics:
      per = {}
      for seed, rs in sorted(by_seed.items()):
        got = [r for r in rs if r.get(m) is not None]
        s = slope([r["teacher_entropy"] for r in got], [r[m] for r in got])
        if s is not None:
          per[str(seed)] = s  # JSON object keys: results.json reads back the same
      entry[m] = mean_interval(list(per.values()))
      entry["seed_slopes"][m] = per
    ent = [r["teacher_entropy"] for rs in by_seed.values() for r in rs]
    entry["entropy_range"] = [min(ent), max(ent)]
    out.setdefault(kind, {})[knob] = entry
  for kind, knobs in out.items():  # paired by seed: a knob's slope minus temperature's
    base = knobs.get("temperature")
    for knob, entry in knobs.items():
      if knob != "temperature" and base is not None:
        entry["minus_temperature"] = {m: mean_interval(
            [s - base["seed_slopes"][m][seed] for seed, s in entry["seed_slopes"][m].items()
             if seed in base["seed_slopes"][m]]) for m in metrics}
  return out


def write_csv(comps: list[dict], path: str) -> None:
  """comparisons.csv: one line per comparison (CSV_COLUMNS; None as an empty field)."""
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
  w.writeheader()
  for c in comps:
    w.writerow({k: ("" if c.get(k) is None else c[k]) for k in CSV_COLUMNS})
  atomic_write_text(path, buf.getvalue())


def _t(t: Optional[float]) -> str:
  return "-" if t is None else f"{t:g}"


def format_comparisons(comps: list[dict], digits: int = 2) -> str:
  """A markdown table of the comparisons: the difference, its 95% interval, and "resolved" or
  "not resolved" (the README's wording: a difference is stated only where its interval
  excludes zero)."""
  lines = ["| comparison | metric | kind | T | baseline | seeds | difference | 95% interval | |",
           "|---|---|---|---|---|---|---|---|---|"]
  for c in comps:
    interval = ("-" if c["ci95_low"] is None else
                f"[{c['ci95_low']:.{digits}f}, {c['ci95_high']:.{digits}f}]")
    lines.append(f"| {c['comparison']} | {c['metric']} | {c['kind']} | {_t(c['temperature'])} | "
                 f"{c['baseline_kind']} T={_t(c['baseline_temperature'])} | {c['n']} | "
                 f"{c['mean']:+.{digits}f} | {interval} | "
                 f"{'resolved' if c['resolved'] else 'not resolved'} |")
  return "\n".join(lines)
