"""Is entropy the knob? The teacher made selective three ways, on one entropy axis (issue 22).

Knobs (`--knobs`): "beta" sharpens the teacher's weights (alpha_k^beta, renormalised: the paper's
temperature); "top_p" keeps the smallest set of its components holding mass >= p; "top_k" keeps
its k heaviest (both renormalised; kdjax.mixture.truncate). `grid` lays every knob's values along
one configuration axis: the betas, then the truncation configurations as three arrays (beta,
top_p, top_k), the other knobs at their identity (beta 1, top_p 1, top_k K'), so the study's one
jitted call sweeps them all (the betas in one vmap, the rest in a second: the beta rows are then
bit for bit those of a beta-only run).

Every row records the teacher's differential entropy (Monte Carlo on the seed's fixed draws,
`teacher_density_entropy`). `slopes`: per objective and knob, each seed's least-squares slope of
precision and of recall against that entropy over the knob's grid (`ok` rows), then their mean
and 95% t-interval over seeds, and the same for each knob's per-seed slope minus beta's (paired
by seed: the knobs share every seed's teacher and draws).
"""

from __future__ import annotations

import math

import numpy as np

from kdjax.cli import require

KNOBS = ("beta", "top_p", "top_k")
ENTROPY_KEY = "teacher_density_entropy"


def grid(knobs, betas, top_p_values, top_k_values, teacher_components: int):
  """(labels [(knob, value)] of the B + T configurations, betas_B, truncation): the beta knob's
  values, then the other knobs' as truncation = (beta_T, top_p_T, top_k_T) at the other knobs'
  identity (beta 1, top_p 1, top_k K'); truncation is None with beta alone (study.run_grid)."""
  require(len(knobs) > 0 and knobs[0] == "beta" and len(set(knobs)) == len(knobs)
          and set(knobs) <= set(KNOBS),
          f"--knobs={','.join(knobs)}: expected beta, then any of top_p, top_k (no repeats)")
  values = {"beta": [float(b) for b in np.asarray(betas)],
            "top_p": [float(p) for p in top_p_values], "top_k": [int(k) for k in top_k_values]}
  for knob in knobs[1:]:
    require(len(values[knob]) > 0, f"--{knob}_values: give at least one value for --knobs={knob}")
  require(all(0 < p <= 1 for p in values["top_p"]),
          f"--top_p_values={values['top_p']}: every p must be in (0, 1]")
  require(all(k >= 1 for k in values["top_k"]),
          f"--top_k_values={values['top_k']}: every k must be >= 1")
  labels = [("beta", v) for v in values["beta"]]
  beta_T, top_p_T, top_k_T = [], [], []
  for knob in knobs[1:]:
    for v in values[knob]:
      labels.append((knob, v))
      beta_T.append(1.0)
      top_p_T.append(v if knob == "top_p" else 1.0)
      top_k_T.append(v if knob == "top_k" else teacher_components)
  truncation = (np.asarray(beta_T, np.float32), np.asarray(top_p_T, np.float32),
                np.asarray(top_k_T, np.int32)) if beta_T else None
  return labels, np.asarray(values["beta"], np.float32), truncation


def t_quantile(q: float, df: int) -> float:
  """Student's t quantile (q in (0.5, 1)): the CDF by integrating the density, then bisection."""
  c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

  def cdf(t):
    x = np.linspace(0.0, t, 4001)
    return 0.5 + np.trapezoid(c * (1 + x * x / df) ** (-(df + 1) / 2), x)

  lo, hi = 0.0, 1.0
  while cdf(hi) < q:
    lo, hi = hi, 2 * hi
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
  return 0.5 * (lo + hi)


def interval(v) -> dict:
  """Mean and 95% t-interval of the values (over seeds); null bounds with fewer than 2."""
  v = np.asarray(v, float)
  n = len(v)
  if n == 0:
    return {"mean": None, "lo": None, "hi": None, "n": 0}
  mean = float(v.mean())
  if n < 2:
    return {"mean": mean, "lo": None, "hi": None, "n": n}
  half = t_quantile(0.975, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def slope(x, y) -> float | None:
  """Least-squares slope of y on x; None with fewer than two distinct x."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  dx = x - x.mean()
  if len(x) < 2 or not np.any(np.abs(dx) > 1e-9 * max(1.0, float(np.abs(x).max()))):
    return None
  return float(np.sum(dx * (y - y.mean())) / np.sum(dx * dx))


def seed_slopes(rows, objective: str, knob: str, key: str) -> dict[int, float]:
  """{seed: slope of `key` against the teacher's entropy over the knob's `ok` rows}."""
  mine = [r for r in rows if r["objective"] == objective and r.get("knob") == knob
          and r["status"] == "ok" and r[ENTROPY_KEY] is not None]
  out = {}
  for seed in sorted({r["seed"] for r in mine}):
    rs = [r for r in mine if r["seed"] == seed]
    s = slope([r[ENTROPY_KEY] for r in rs], [r[key] for r in rs])
    if s is not None:
      out[seed] = s
  return out


def slopes(rows) -> dict:
  """{objective: {knob: {"precision": interval, "recall": interval, "entropy_range": [lo, hi],
  "minus_beta": {"precision": interval, "recall": interval}}}} in nats per nat of entropy."""
  out = {}
  knobs = [k for k in KNOBS if any(r.get("knob") == k for r in rows)]
  for m in dict.fromkeys(r["objective"] for r in rows if r.get("knob")):
    out[m] = {}
    per = {(k, key): seed_slopes(rows, m, k, key) for k in knobs for key in ("precision", "recall")}
    for k in knobs:
      ent = [r[ENTROPY_KEY] for r in rows if r["objective"] == m and r.get("knob") == k
             and r[ENTROPY_KEY] is not None]
      entry = {key: interval(list(per[(k, key)].values())) for key in ("precision", "recall")}
      entry["entropy_range"] = [min(ent), max(ent)] if ent else None
      if k != "beta":
        entry["minus_beta"] = {
            key: interval([s - per[("beta", key)][seed] for seed, s in per[(k, key)].items()
                           if seed in per[("beta", key)]]) for key in ("precision", "recall")}
      out[m][k] = entry
  return out
