"""Mean per-token log-likelihood and perplexity of a model on a token dataset.

The paper's per-token definition (its authors' code): the sum of next-token log-probabilities over
all targets of all sequences, divided by the number of those targets (not a mean of per-sequence
means). Perplexity = exp(-mean log-likelihood). The targets are kdjax.llm.model.targets' (generated
tokens only: never padding, a token predicted from padding, or a prompt token).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm.model import llama as model
from kdjax.llm.model import targets


def loglik_sums(config, params, input_ids_BxT, attention_mask_BxT, target_mask_BxT=None):
  """(sum of target log-probs, number of targets) of one batch, float32 scalars. target_mask_BxT:
  a batch's `target_mask` (None: prompt length 1)."""
  logp = model.token_logprobs(config, params, input_ids_BxT, attention_mask_BxT, target_mask_BxT)
  counted = targets.counted(attention_mask_BxT, target_mask_BxT)[:, 1:].astype(jnp.float32)
  return jnp.sum(logp * counted), jnp.sum(counted)


@functools.partial(jax.jit, static_argnums=0)
def _sums_jit(config, params, input_ids, mask, target_mask):
  return loglik_sums(config, params, input_ids, mask, target_mask)


def mean_token_loglik(config, params, batches: Iterable[dict]):
  """(mean per-token log-likelihood, perplexity) over an iterable of {'input_ids',
  'attention_mask', optional 'target_mask'} batches (kdjax.llm.data.eval_batches makes them from a
  dataset). Single-process helper (params on local devices)."""
  total, count = loglik_totals(config, params, batches)
  if count == 0:
    raise ValueError("no target tokens to evaluate (no sequence has a token after its prompt)")
  mean = total / count
  return mean, math.exp(-mean)


def loglik_totals(config, params, batches: Iterable[dict]) -> tuple[float, float]:
  """(sum of target log-probs, number of targets) over batches, summed on the host in float64
  (so that partial totals, e.g. one per process, add up to the same figure)."""
  total, count = 0.0, 0.0
  pending = []
  for batch in batches:
    mask = batch.get("attention_mask")
    if mask is None:
      mask = np.ones(np.shape(batch["input_ids"]), bool)
    mask = jnp.asarray(mask)
    given = batch.get("target_mask")
    given = targets.target_mask(mask) if given is None else jnp.asarray(given)
    pending.append(_sums_jit(config, params, jnp.asarray(batch["input_ids"]), mask, given))
  for s, c in jax.device_get(pending):  # one sync at the end: batches run back to back
    total += float(s)
    count += float(c)
  return total, count
