"""Figures of the GMM study (matplotlib, Agg backend): metrics against beta, precision against
recall, metrics against the teacher's entropy (one curve per knob), and density panels like the
paper's."""

from __future__ import annotations

import io
import warnings

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import jax  # noqa: E402

from kdjax import cli  # noqa: E402
from kdjax.mixture import Mixture  # noqa: E402
from kdjax.gmm import knobs  # noqa: E402
from kdjax.gmm.study import EXACT  # noqa: E402

COLORS = {"direct": "black", "seqkd": "tab:red", "fkl": "tab:blue", "rkl": "tab:green",
          "jsd": "tab:purple", EXACT: "tab:orange"}
MARKERS = {"seqkd": "o", "fkl": "s", "rkl": "^", "jsd": "D", EXACT: "P"}


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  cli.atomic_write_bytes(path, buf.getvalue())


def _value(r, key) -> float:
  """A row's value for the figures: NaN (left out of every mean) unless the row is `ok`."""
  ok = r.get("status", "ok") == "ok" and r[key] is not None
  return float(r[key]) if ok else np.nan


def _left_out_text(rows) -> str:
  n = sum(r.get("status", "ok") != "ok" for r in rows)
  return f"; {n} unconverged / non-finite rows left out" if n else ""


def _by_objective(rows, key):
  """{objective: (betas [B], values [S, B])} from result rows (direct: betas None, values [S]);
  rows that are not `ok` (unconverged, non-finite) are NaN, so the nan-means leave them out."""
  out = {}
  for m in dict.fromkeys(r["objective"] for r in rows):
    rs = [r for r in rows if r["objective"] == m]
    seeds = sorted({r["seed"] for r in rs})
    if m == "direct":
      out[m] = (None, np.array([[_value(r, key) for r in rs if r["seed"] == s][0]
                                for s in seeds], float))
      continue
    betas = sorted({r["beta"] for r in rs})
    table = {(r["seed"], r["beta"]): _value(r, key) for r in rs}
    vals = np.array([[table[(s, b)] for b in betas] for s in seeds], float)
    out[m] = (np.array(betas), vals)
  return out


def plot_metric_vs_beta(rows, key: str, path: str) -> None:
  """Mean over seeds (line) and +-1 standard deviation (band) of `key` against beta, log-x."""
  data = _by_objective(rows, key)
  all_betas = np.concatenate([b for b, _ in data.values() if b is not None] or [np.ones(1)])
  lo, hi = all_betas.min(), all_betas.max()
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for m, (betas, vals) in data.items():
    color = COLORS.get(m, None)
    if betas is None:
      mean, sd = np.nanmean(vals), np.nanstd(vals)
      ax.axhline(mean, color=color, lw=1.5, label=f"{m} (no teacher)")
      ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.08)
      continue
    mean, sd = np.nanmean(vals, axis=0), np.nanstd(vals, axis=0)
    style = "--" if m == EXACT else "-"
    label = "exact fKL limit (moment matching)" if m == EXACT else m
    ax.plot(betas, mean, style, color=color, lw=1.8, label=label)
    if m != EXACT:
      ax.fill_between(betas, mean - sd, mean + sd, color=color, alpha=0.15, lw=0)
  ax.set_xscale("log")
  # plain numbers on the log axis (1, 10, 100): the default 10^k labels go through mathtext, whose
  # first use costs about a quarter of a second
  ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.set_xlim(lo, hi if hi > lo else lo * 1.01)
  ax.set_xlabel("teacher sharpening beta (log scale)")
  name = {"precision": "precision  E_student[log p*(x)]",
          "recall": "recall  E_p*[log student(x)]"}.get(key, key)
  ax.set_ylabel(name)
  n_seeds = next(iter(data.values()))[1].shape[0]
  ax.set_title(f"{key} vs beta: mean and +-1 sd over {n_seeds} seeds{_left_out_text(rows)}",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_precision_recall(rows, path: str) -> None:
  """Seed-mean (recall, precision) per objective and beta, coloured by beta (log colour scale)."""
  prec, rec = _by_objective(rows, "precision"), _by_objective(rows, "recall")
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  betas_all = [b for b, _ in prec.values() if b is not None]
  norm = matplotlib.colors.LogNorm(vmin=min(b.min() for b in betas_all),
                                   vmax=max(max(b.max() for b in betas_all),
                                            min(b.min() for b in betas_all) * 1.01)
                                   ) if betas_all else None
  sc = None
  for m in prec:
    betas, p = prec[m]
    r = rec[m][1]
    if betas is None:
      ax.scatter([np.nanmean(r)], [np.nanmean(p)], marker="*", s=220, color="black", zorder=5,
                 label=f"{m}")
      continue
    pm, rm = np.nanmean(p, axis=0), np.nanmean(r, axis=0)
    ax.plot(rm, pm, "--" if m == EXACT else "-", color=COLORS.get(m), lw=0.8, alpha=0.6)
    sc = ax.scatter(rm, pm, c=betas, norm=norm, cmap="viridis", marker=MARKERS.get(m, "o"),
                    s=22, label=m, edgecolors=COLORS.get(m), linewidths=0.6, zorder=4)
  if sc is not None:
    fig.colorbar(sc, ax=ax, label="beta")
  ax.set_xlabel("recall  E_p*[log student(x)]")
  ax.set_ylabel("precision  E_student[log p*(x)]")
  ax.set_title(f"precision vs recall (seed means), coloured by beta{_left_out_text(rows)}",
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


KNOB_COLORS = {"beta": "tab:red", "top_p": "tab:blue", "top_k": "tab:green"}


def _knob_curve(rows, m: str, knob: str, key: str):
  """(entropy [V], mean [V], half-width [V]) over seeds for each value of the knob, sorted by
  entropy: seed means of the teacher's entropy and of `key` (`ok` rows), 95% t-interval of the
  latter (0 where one seed)."""
  rs = [r for r in rows if r["objective"] == m and r.get("knob") == knob]
  pts = []
  for v in sorted({r["knob_value"] for r in rs}):
    vals = np.array([_value(r, key) for r in rs if r["knob_value"] == v], float)
    ent = np.array([_value(r, knobs.ENTROPY_KEY) for r in rs if r["knob_value"] == v], float)
    ok = np.isfinite(vals) & np.isfinite(ent)
    if ok.any():
      ci = knobs.interval(vals[ok])
      half = 0.0 if ci["hi"] is None else ci["hi"] - ci["mean"]
      pts.append((float(ent[ok].mean()), ci["mean"], half))
  pts.sort()
  return tuple(np.array(c, float) for c in zip(*pts)) if pts else None


def plot_metric_vs_entropy(rows, key: str, path: str) -> None:
  """One panel per objective with knobs: `key` against the teacher's differential entropy, one
  curve per knob (seed means, 95% t-interval band over seeds); direct as a dotted line."""
  objectives = [m for m in dict.fromkeys(r["objective"] for r in rows if r.get("knob"))]
  cols = min(3, max(1, len(objectives)))
  n_rows = max(1, -(-len(objectives) // cols))
  fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.4 * n_rows), squeeze=False)
  for ax in axes.ravel()[len(objectives):]:
    ax.set_axis_off()
  direct = [_value(r, key) for r in rows if r["objective"] == "direct"]
  for ax, m in zip(axes.ravel(), objectives):
    for knob in knobs.KNOBS:
      curve = _knob_curve(rows, m, knob, key)
      if curve is None:
        continue
      x, mean, half = curve
      ax.plot(x, mean, "-o", ms=2.5, lw=1.4, color=KNOB_COLORS[knob], label=knob)
      ax.fill_between(x, mean - half, mean + half, color=KNOB_COLORS[knob], alpha=0.15, lw=0)
    if direct and np.isfinite(np.nanmean(direct)):
      ax.axhline(np.nanmean(direct), color="black", ls=":", lw=1, label="direct")
    ax.set_title(m, fontsize=9)
    ax.set_xlabel("teacher entropy (nats, Monte Carlo)", fontsize=8)
    ax.set_ylabel(key, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  n_seeds = len({r["seed"] for r in rows})
  fig.suptitle(f"{key} vs the selective teacher's entropy, one curve per knob: mean and 95% "
               f"t-interval over {n_seeds} seeds{_left_out_text(rows)}", fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  _save(fig, path)


def _log_density_2d(m: Mixture, xy_NxE: np.ndarray) -> np.ndarray:
  """log density of the mixture's marginal over its first E = xy_NxE.shape[1] dimensions (2, or 1
  for a 1-D mixture), in float64 numpy (no compiles); NaN everywhere when a marginal covariance is
  not finite or is singular (a diverged student), where numpy's inverse would raise."""
  m = jax.tree.map(lambda a: np.asarray(a, np.float64), m)
  e = xy_NxE.shape[1]
  w_K = np.exp(m.logits - m.logits.max())
  w_K = w_K / w_K.sum()
  if m.scales.ndim == m.means.ndim:
    tril = np.exp(m.scales)[:, :, None] * np.eye(m.means.shape[-1])
  else:
    diag = np.exp(np.diagonal(m.scales, axis1=-2, axis2=-1))
    tril = np.tril(m.scales, -1) + diag[:, :, None] * np.eye(m.means.shape[-1])
  cov_KxExE = (tril @ np.swapaxes(tril, -1, -2))[:, :e, :e]
  with np.errstate(all="ignore"):
    sign_K, logdet_K = np.linalg.slogdet(cov_KxExE)
  if not (np.all(np.isfinite(cov_KxExE)) and np.all(sign_K > 0) and np.all(np.isfinite(logdet_K))):
    return np.full(xy_NxE.shape[:1], np.nan)
  diff_KxNxE = xy_NxE[None] - m.means[:, None, :e]
  prec_KxExE = np.linalg.inv(cov_KxExE)
  quad_KxN = np.einsum("knd,kde,kne->kn", diff_KxNxE, prec_KxExE, diff_KxNxE)
  comp_KxN = -0.5 * (quad_KxN + logdet_K[:, None] + e * np.log(2 * np.pi))
  joint_KxN = comp_KxN + np.log(np.maximum(w_K, 1e-300))[:, None]
  top_N = joint_KxN.max(axis=0)
  return top_N + np.log(np.exp(joint_KxN - top_N[None]).sum(axis=0))


def _curve_1d(ax, m: Mixture, x_N: np.ndarray) -> bool:
  """A 1-D mixture's density as a curve on `ax`; False (nothing drawn) when it is not finite."""
  with np.errstate(all="ignore"):
    dens = np.exp(_log_density_2d(m, x_N[:, None]))
  if not np.all(np.isfinite(dens)):
    return False
  ax.fill_between(x_N, dens, color="tab:purple", alpha=0.35, lw=0)
  ax.plot(x_N, dens, color="tab:purple", lw=1.2)
  return True


def _extent_1d(m: Mixture, extent: float) -> tuple[float, float]:
  """The x range of 1-D panels: p*'s component means +- 4 standard deviations (at least
  +-extent around 0 when they are not finite)."""
  mu_K = np.asarray(m.means, np.float64)[:, 0]
  sd_K = np.exp(np.asarray(m.scales, np.float64).reshape(len(mu_K), -1)[:, 0])
  lo, hi = float(np.min(mu_K - 4 * sd_K)), float(np.max(mu_K + 4 * sd_K))
  return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) and hi > lo else (-extent, extent)


def plot_densities(panels: list[tuple[str, Mixture]], path: str, points=None,
                   extent: float = 2.0, n: int = 160) -> None:
  """Each mixture's density in a row of panels: filled contours of the first two dimensions, or
  for a 1-D study (D = 1) a curve over the range of the first panel's mixture (p*); `points` (e.g.
  the training samples) are drawn on the first panel (a rug in 1-D)."""
  one_d = panels[0][1].means.shape[-1] == 1
  if one_d:
    x_N = np.linspace(*_extent_1d(panels[0][1], extent), 4 * n)
  else:
    grid = np.linspace(-extent, extent, n, dtype=np.float32)
    xx, yy = np.meshgrid(grid, grid)
    xy_Nx2 = np.stack([xx.ravel(), yy.ravel()], axis=-1).astype(np.float64)
  cols = min(4, len(panels))
  rows_n = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(3.0 * cols, 3.0 * rows_n), squeeze=False)
  for ax in axes.ravel():
    ax.set_axis_off()
  for ax, (title, m) in zip(axes.ravel(), panels):
    ax.set_axis_on()
    ax.set_yticks([])
    if one_d:
      if not _curve_1d(ax, m, x_N):
        title = f"{title} (non-finite)"
      ax.set_title(title, fontsize=9)
      continue
    with np.errstate(all="ignore"):
      dens = np.exp(_log_density_2d(m, xy_Nx2)).reshape(n, n)
    if not np.all(np.isfinite(dens)):
      title, dens = f"{title} (non-finite)", np.where(np.isfinite(dens), dens, 0.0)
    ax.contourf(xx, yy, dens, levels=20, cmap="magma")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_aspect("equal")
  if points is not None:
    pts = np.asarray(points)
    if one_d:
      axes[0, 0].plot(pts[:, 0], np.zeros(len(pts)), "|", color="tab:cyan", ms=8, alpha=0.7)
    else:
      axes[0, 0].scatter(pts[:, 0], pts[:, 1], s=3, color="cyan", alpha=0.7)
  _save(fig, path)


def write_all(workdir: str, rows, p_star: Mixture, out: dict, methods, betas_B,
              seed_index: int = 0, x_train=None) -> list[str]:
  """All figures of a run; returns their paths. Density panels show seed `seed_index`."""
  paths = [f"{workdir}/precision_vs_beta.png", f"{workdir}/recall_vs_beta.png",
           f"{workdir}/precision_vs_recall.png", f"{workdir}/densities.png",
           f"{workdir}/precision_vs_entropy.png", f"{workdir}/recall_vs_entropy.png"]
  by_beta = [r for r in rows if r.get("knob", "beta") in (None, "beta")]
  with warnings.catch_warnings():  # all-NaN columns (every seed left out) plot as gaps
    warnings.simplefilter("ignore", RuntimeWarning)
    plot_metric_vs_beta(by_beta, "precision", paths[0])
    plot_metric_vs_beta(by_beta, "recall", paths[1])
    plot_precision_recall(by_beta, paths[2])
    plot_metric_vs_entropy(rows, "precision", paths[4])
    plot_metric_vs_entropy(rows, "recall", paths[5])
  pick = lambda tree, b: jax.tree.map(lambda a: a[seed_index, b], tree)
  betas_B = np.asarray(betas_B)
  b_last = len(betas_B) - 1
  teacher = jax.tree.map(np.asarray, pick(out["teacher"], 0))

  def sharpen(m, beta):  # mx.sharpen in numpy
    logw = m.logits - m.logits.max()
    return m._replace(logits=beta * (logw - np.log(np.exp(logw).sum())))

  panels = [("p* (ground truth)", p_star),
            (f"teacher, beta={betas_B[0]:g}", sharpen(teacher, float(betas_B[0]))),
            (f"teacher, beta={betas_B[-1]:g}", sharpen(teacher, float(betas_B[-1])))]
  for m in methods:
    label = "direct student" if m == "direct" else f"{m} student, beta={betas_B[-1]:g}"
    panels.append((label, pick(out["students"][m], b_last)))
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", RuntimeWarning)
    plot_densities(panels, paths[3], points=x_train)
  return paths
