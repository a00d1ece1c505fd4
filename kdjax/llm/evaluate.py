"""Mean per-token log-likelihood and perplexity of a model on a token dataset.

The paper's per-token definition (its authors' code): the sum of next-token log-probabilities over
all non-padding targets of all sequences, divided by the number of those targets (not a mean of
per-sequence means). Perplexity = exp(-mean log-likelihood).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Union

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm import data as data_lib
from kdjax.llm import model


def loglik_sums(config, params, input_ids_BxT, attention_mask_BxT):
  """(sum of target log-probs, number of targets) of one batch, float32 scalars."""
  logp = model.token_logprobs(config, params, input_ids_BxT, attention_mask_BxT)
  targets = attention_mask_BxT[:, 1:].astype(jnp.float32)
  return jnp.sum(logp * targets), jnp.sum(targets)


@functools.partial(jax.jit, static_argnums=0)
def _sums_jit(config, params, input_ids, mask):
  return loglik_sums(config, params, input_ids, mask)


def mean_token_loglik(config, params, dataset_or_batches: Union[object, Iterable[dict]],
                      batch_size: int = 16, seq_len: int = 512, pad_id: int = 0):
  """(mean per-token log-likelihood, perplexity) over a dataset or an iterable of batches.

  `dataset_or_batches`: a datasets.Dataset / TokenRows / list of token lists (truncated to seq_len,
  batched by batch_size, the last batch padded), or an iterable of {'input_ids', 'attention_mask'}
  batches used as given. Single-process helper (params on local devices).
  """
  if isinstance(dataset_or_batches, (list, tuple, data_lib.TokenRows)) or hasattr(
      dataset_or_batches, "column_names"):
    batches = data_lib.eval_batches(dataset_or_batches, batch_size, seq_len, pad_id)
  else:
    batches = dataset_or_batches
  total, count = 0.0, 0.0
  pending = []
  for batch in batches:
    mask = batch.get("attention_mask")
    if mask is None:
      mask = np.ones(np.shape(batch["input_ids"]), bool)
    pending.append(_sums_jit(config, params, jnp.asarray(batch["input_ids"]), jnp.asarray(mask)))
  for s, c in jax.device_get(pending):  # one sync at the end: batches run back to back
    total += float(s)
    count += float(c)
  if count == 0:
    raise ValueError("no target tokens to evaluate (every sequence shorter than 2 tokens)")
  mean = total / count
  return mean, math.exp(-mean)
