"""kdjax/llm/model/embeddings.py (one forward pass gives precision's numbers and the embeddings) and
kdjax/llm/study/embedding_map.py (the map is fitted on p* alone, deterministic in its seed)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kdjax.llm import data
from kdjax.llm.study import embedding_map
from kdjax.llm.model import embeddings
from kdjax.llm.model import evaluate
from kdjax.llm.weights import loading
from kdjax.llm.model import llama as model


def _ragged_batch():
  rows = [[84, 104, 101, 5, 9, 200, 3], [84, 104, 101, 7], [84, 104, 101, 1, 2, 3, 4, 5, 6, 7]]
  batch = data.TokenRows(rows, prompt_lens=[3, 3, 3]).batch(range(3), 12, 0)
  return rows, batch


@pytest.mark.parametrize("spec", ["preset:test-tiny@3", "preset:test-tiny-untied@4"])
def test_one_pass_gives_the_scores_and_the_mean_hidden_state(spec):
  """Tied and untied heads: the log-likelihood sums are evaluate.loglik_sums' (precision does not
  move), and each row's embedding is the mean of its own hidden states, computed row by row
  without padding."""
  config, params = loading.load_model(spec)
  rows, b = _ragged_batch()
  s, c, emb = embeddings._sums_and_pooled(config, params, jnp.asarray(b["input_ids"]),
                                          jnp.asarray(b["attention_mask"]),
                                          jnp.asarray(b["target_mask"]))
  ref_s, ref_c = evaluate.loglik_sums(config, params, jnp.asarray(b["input_ids"]),
                                      jnp.asarray(b["attention_mask"]),
                                      jnp.asarray(b["target_mask"]))
  assert float(c) == float(ref_c) == sum(len(r) - 3 for r in rows)
  assert float(s) == pytest.approx(float(ref_s), abs=1e-4)
  for i, r in enumerate(rows):
    h = model.hidden_states(config, params, jnp.asarray([r], jnp.int32))[0]
    assert np.asarray(emb[i]) == pytest.approx(np.asarray(h).mean(0), abs=1e-5)
  _, alone = embeddings.loglik_sums_and_embeddings(config, params, [b], 3, loglik=False)
  assert alone == pytest.approx(np.asarray(emb), abs=1e-6)


def test_embeddings_drop_the_padding_rows_of_the_last_batch():
  config, params = loading.load_model("preset:test-tiny@3")
  rows = [[1, 2, 3, 4]] * 5
  mean, emb = embeddings.loglik_sums_and_embeddings(
      config, params, data.eval_batches(rows, 4, 6), num_rows=5)
  assert emb.shape == (5, config.hidden_size) and np.isfinite(mean)
  assert emb == pytest.approx(np.broadcast_to(emb[0], emb.shape), abs=1e-5)


def _sets(seed=0, n=60, d=16):
  rng = np.random.default_rng(seed)
  ref = rng.normal(size=(n, d)).astype(np.float32)
  return ref, [ref[:20] + 0.1, rng.normal(size=(25, d)).astype(np.float32) * 0.3]


def test_pca_axes_and_placement():
  """Points on a line in 5-D: the first PCA coordinate is the position along it (sign fixed), and
  a student set is placed on p*'s axes (p*'s mean and directions, not its own)."""
  t = np.linspace(-3, 3, 40)
  direction = np.array([0.1, -0.9, 0.3, 0.2, -0.2])
  direction /= np.linalg.norm(direction)
  rng = np.random.default_rng(0)
  ref = t[:, None] * -direction[None] + 0.01 * rng.normal(size=(40, 5)) + 7.0
  ref_xy, (other_xy,) = embedding_map.pca_2d(ref, [ref[:10] + 2 * direction])
  assert np.corrcoef(ref_xy[:, 0], t)[0, 1] == pytest.approx(1.0, abs=1e-3)  # -0.9 made positive
  assert other_xy[:, 0] == pytest.approx(ref_xy[:10, 0] - 2.0, abs=1e-4)  # the axis: ~ -direction
  assert abs(ref_xy[:, 1]).max() < 0.1


@pytest.mark.parametrize("method", ["pca", "umap"])
def test_same_seed_same_map(method):
  ref, others = _sets()
  a_ref, a_others = embedding_map.coordinates(ref, others, method, seed=3)
  b_ref, b_others = embedding_map.coordinates(ref, others, method, seed=3)
  assert a_ref.shape == (60, 2) and [o.shape for o in a_others] == [(20, 2), (25, 2)]
  assert np.array_equal(a_ref, b_ref)
  assert all(np.array_equal(a, b) for a, b in zip(a_others, b_others))
  if method == "umap":
    c_ref, _ = embedding_map.coordinates(ref, others, method, seed=4)
    assert not np.array_equal(a_ref, c_ref)  # the seed is used


def test_figure_is_the_same_picture_each_time(tmp_path):
  ref, (one, two) = _sets()
  panels = [embedding_map.Panel("direct", None, one, 0.5, 0.25),
            embedding_map.Panel("seqkd", 0.8, two), embedding_map.Panel("seqkd", 1.0, one)]
  assert embedding_map._grid(panels) == [[0, None], [1, 2]]  # a row per kind, a column per T
  paths = [str(tmp_path / f"{i}.png") for i in range(2)]
  for p in paths:
    assert embedding_map.write(p, ref, panels, method="pca", seed=0, title="t")
  data0, data1 = (open(p, "rb").read() for p in paths)
  assert data0[:8] == b"\x89PNG\r\n\x1a\n" and len(data0) > 5000 and data0 == data1
  assert not embedding_map.write(str(tmp_path / "x.png"), ref[:3], panels, "pca", 0)
  assert not (tmp_path / "x.png").exists()
