"""Sequence embeddings by the ground-truth model, for the sample-based measures and the map.

A sequence's embedding is the mean, over the row's non-pad positions (its prompt included), of the
model's final-normed hidden state (what the LM head multiplies), in float32: one vector of the
model's hidden size per sequence. `loglik_sums_and_embeddings` computes it in the same forward
pass that scores the sequence (precision's pass under p*), so embedding the students' samples
costs no second pass; `embeddings` runs the body alone (p*'s own reference samples).
"""

from __future__ import annotations

import functools
import io
import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import cli
from kdjax.llm.model import llama as model
from kdjax.llm.model import targets

# What an embedding is; part of the key of every unit that stores embeddings (kdjax.llm.study.units).
EMBEDDING = "mean over non-pad positions (prompt included) of the final-normed hidden state, f32"
FILE = "embeddings.npy"


def mean_pool(x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """The mean of x over each row's True positions, [B, D] float32 (zeros for an empty row)."""
  w_BxT = mask_BxT.astype(jnp.float32)
  total_BxD = jnp.einsum("btd,bt->bd", x_BxTxD.astype(jnp.float32), w_BxT)
  return total_BxD / jnp.maximum(jnp.sum(w_BxT, axis=1, keepdims=True), 1.0)


def _logits(config, params, x_BxTxD):
  """The LM head on final-normed hidden states, as model.Llama applies it (float32 logits)."""
  w, layout = model.head_weight(config, params)
  if layout == "vd":
    return model.tied_lm_head(x_BxTxD, w).astype(jnp.float32)
  return jnp.einsum("btd,dv->btv", x_BxTxD, w).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _sums_and_pooled(config, params, ids_BxT, mask_BxT, target_mask_BxT):
  """(sum of target log-probs, number of targets, embeddings [B, D]) of one batch: one body pass.
  The log-probs are model.token_logprobs' and the counts evaluate.loglik_sums' (kdjax.llm.model.targets)."""
  x_BxTxD = model.hidden_states(config, params, ids_BxT, mask_BxT)
  logits_BxTxV = _logits(config, params, x_BxTxD)[:, :-1]
  logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  picked_BxT = jnp.take_along_axis(logits_BxTxV, ids_BxT[:, 1:, None], axis=-1)[..., 0]
  counted_BxT = targets.counted(mask_BxT, target_mask_BxT)[:, 1:]
  logp_BxT = jnp.where(counted_BxT, picked_BxT - logz_BxT, 0.0)
  counted_BxT = counted_BxT.astype(jnp.float32)
  return jnp.sum(logp_BxT * counted_BxT), jnp.sum(counted_BxT), mean_pool(x_BxTxD, mask_BxT)


@functools.partial(jax.jit, static_argnums=0)
def _pooled(config, params, ids_BxT, mask_BxT):
  return mean_pool(model.hidden_states(config, params, ids_BxT, mask_BxT), mask_BxT)


def loglik_sums_and_embeddings(config, params, batches, num_rows: int, loglik: bool = True):
  """Over an iterable of {input_ids, attention_mask, target_mask} batches (the last one may be
  padded with empty rows): (mean per-token log-likelihood or None, embeddings [num_rows, D] f32).
  All batches are dispatched before the one sync at the end. ValueError when loglik is asked and
  no row has a target token."""
  pending = []
  for b in batches:
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    if loglik:
      pending.append(_sums_and_pooled(config, params, ids, mask, jnp.asarray(b["target_mask"])))
    else:
      pending.append((0.0, 0.0, _pooled(config, params, ids, mask)))
  got = jax.device_get(pending)
  emb_NxD = np.concatenate([np.asarray(p, np.float32) for _, _, p in got])[:num_rows]
  if not loglik:
    return None, emb_NxD
  total = sum(float(s) for s, _, _ in got)
  count = sum(float(c) for _, c, _ in got)
  if count == 0:
    raise ValueError("no target tokens to evaluate (no sequence has a token after its prompt)")
  return total / count, emb_NxD


def save(directory: str, emb_NxD: np.ndarray) -> str:
  """DIR/embeddings.npy, written atomically; returns the file name."""
  buf = io.BytesIO()
  np.save(buf, np.asarray(emb_NxD, np.float32))
  cli.atomic_write_bytes(os.path.join(directory, FILE), buf.getvalue())
  return FILE


def load(directory: str) -> np.ndarray:
  """DIR/embeddings.npy; a UserError naming the file when it is missing or unreadable."""
  path = os.path.join(directory, FILE)
  try:
    return np.load(path)
  except (OSError, ValueError, EOFError) as e:
    raise cli.UserError(f"{path}: unreadable ({' '.join(str(e).split())[:80]})") from None
