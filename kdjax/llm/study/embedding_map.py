"""The paper's embedding map: p*'s samples and each student's in one 2-D picture.

The map is fitted on p*'s reference samples alone (their embeddings by p*, kdjax.llm.model.embeddings)
and every student's samples are placed in it without refitting: UMAP (umap-learn, the paper's
choice; `transform`) or PCA (numpy alone: the top two principal axes of p*'s embeddings). So a
student whose samples gather in a sub-region of p*'s cloud shows it against the same background
in every panel. Same inputs and seed, same coordinates and the same picture: UMAP's random_state
and transform_seed are the seed (which also makes it single-threaded), PCA's axes have a fixed
sign.
"""

from __future__ import annotations

import io
import warnings
from typing import NamedTuple, Optional

import numpy as np
from absl import logging

from kdjax.cli import atomic_write_bytes

FIGURE = "embedding_map.png"
MIN_POINTS = 4  # fewer p* samples than this: no map


class Panel(NamedTuple):
  """One student kind at one temperature: its samples' embeddings (all seeds) [M, D] and its
  k-NN precision / recall (None when unknown) for the panel's title."""
  objective: str
  temperature: Optional[float]
  emb_MxD: np.ndarray
  knn_precision: Optional[float] = None
  knn_recall: Optional[float] = None


def pca_2d(ref_NxD: np.ndarray, others: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
  """p*'s coordinates on its top two principal axes (float64 SVD of the centred embeddings; each
  axis signed so that its largest-magnitude entry is positive) and the others' on the same axes."""
  ref = np.asarray(ref_NxD, np.float64)
  mu_D = ref.mean(axis=0)
  _, _, vt_KxD = np.linalg.svd(ref - mu_D, full_matrices=False)
  axes_2xD = vt_KxD[:2]
  if axes_2xD.shape[0] < 2:  # one-dimensional data: a zero second axis
    axes_2xD = np.concatenate([axes_2xD, np.zeros_like(axes_2xD)])
  sign_2 = np.sign(axes_2xD[np.arange(2), np.argmax(np.abs(axes_2xD), axis=1)])
  axes_2xD = axes_2xD * np.where(sign_2 == 0, 1.0, sign_2)[:, None]

  def project(x):
    return (np.asarray(x, np.float64) - mu_D) @ axes_2xD.T
  return project(ref), [project(x) for x in others]


def umap_2d(ref_NxD: np.ndarray, others: list[np.ndarray], seed: int):
  """UMAP fitted on p*'s embeddings (n_neighbors min(15, N - 1), random_state = transform_seed =
  seed), the others placed by its transform."""
  import umap
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", small-data notes
    m = umap.UMAP(n_components=2, n_neighbors=min(15, len(ref_NxD) - 1), random_state=seed,
                  transform_seed=seed)
    ref_Nx2 = m.fit_transform(np.asarray(ref_NxD, np.float32))
    return np.asarray(ref_Nx2), [np.asarray(m.transform(np.asarray(x, np.float32)))
                                 for x in others]


def coordinates(ref_NxD: np.ndarray, others: list[np.ndarray], method: str, seed: int):
  """(p*'s [N, 2], [each other set's [M, 2]]) by `method` (umap or pca)."""
  if method == "umap":
    return umap_2d(ref_NxD, others, seed)
  if method == "pca":
    return pca_2d(ref_NxD, others)
  raise ValueError(f"unknown embedding map {method!r}")


def _grid(panels: list[Panel]) -> list[list[Optional[int]]]:
  """Panel indices laid out one row per kind (in order), one column per temperature (ascending)."""
  kinds = list(dict.fromkeys(p.objective for p in panels))
  temps = sorted({p.temperature for p in panels if p.temperature is not None})
  cols = max(1, len(temps))
  grid = [[None] * cols for _ in kinds]
  for i, p in enumerate(panels):
    col = 0 if p.temperature is None else temps.index(p.temperature)
    grid[kinds.index(p.objective)][col] = i
  return grid


def _label(p: Panel) -> str:
  name = p.objective if p.temperature is None else f"{p.objective} T={p.temperature:g}"
  if p.knn_precision is not None and p.knn_recall is not None:
    name += f"\nk-NN precision {p.knn_precision:.2f}, recall {p.knn_recall:.2f}"
  return name


def figure_bytes(ref_Nx2: np.ndarray, panels: list[Panel], coords: list[np.ndarray],
                 title: str = "", method: str = "") -> bytes:
  """The PNG: one panel per student kind and temperature, p*'s samples in grey underneath."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  grid = _grid(panels)
  rows, cols = len(grid), len(grid[0])
  fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows + 0.6), sharex=True,
                           sharey=True, squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for r, row in enumerate(grid):
    for c, i in enumerate(row):
      ax = axes[r][c]
      if i is None:
        ax.set_axis_off()
        continue
      ax.scatter(ref_Nx2[:, 0], ref_Nx2[:, 1], s=3, color="0.7", linewidths=0, label="p*")
      xy = coords[i]
      ax.scatter(xy[:, 0], xy[:, 1], s=4, color=colors[r % len(colors)], alpha=0.8, linewidths=0,
                 label="student")
      ax.set_title(_label(panels[i]), fontsize=7)
      ax.tick_params(labelsize=6)
  fig.suptitle((title + "\n" if title else "") + f"{method.upper()} map fitted on p*'s samples "
               "(grey); each student's samples (colour) placed in it", fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
  plt.close(fig)
  return buf.getvalue()


def write(path: str, ref_NxD: np.ndarray, panels: list[Panel], method: str, seed: int,
          title: str = "") -> bool:
  """Fit the map on p*'s embeddings, place every panel's, write the figure; False (nothing
  written) when p* has fewer than MIN_POINTS samples or there is no panel."""
  if len(ref_NxD) < MIN_POINTS or not panels:
    logging.warning("embedding map skipped: %d p* samples (at least %d needed), %d panels",
                    len(ref_NxD), MIN_POINTS, len(panels))
    return False
  ref_Nx2, coords = coordinates(ref_NxD, [p.emb_MxD for p in panels], method, seed)
  atomic_write_bytes(path, figure_bytes(ref_Nx2, panels, coords, title, method))
  return True
