"""The tokens a score counts: one definition for sampling, training, scoring and the API.

A row is a prompt followed by generated tokens (the EOS token included when one was sampled),
possibly padded on either side (attention mask False). A token is a *target*, scored by precision,
recall, validation perplexity and the training loss alike, when

  * it is real (mask True) and the token before it is real too: never a pad, never a token
    predicted from a pad (a left-padded row's first real token has nothing real to come from), and
  * it is not one of the row's first `prompt_len` real tokens: prompt tokens are context, known
    before anything is generated, and are never scored.

A row always has at least one token of context (nothing predicts the first token), so a
`prompt_len` below 1 counts as 1; rows that carry no prompt length (plain token lists, datasets
written before the `prompt_len` column existed) have prompt length 1.

`target_mask` is aligned to the tokens: True at t means token t is a target, predicted at position
t-1. `model.token_logprobs`' [B, T-1] entry t scores token t+1, so it counts where
`target_mask[:, 1:]`; the training loss at position t predicts token t+1 likewise.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def target_mask(attention_mask_BxT, prompt_len_B=None):
  """[B, T] bool: which tokens are targets (module docstring). prompt_len_B: None (1 per row), a
  scalar, or one per row. numpy in, numpy out (the data loader); jax arrays in, jax out."""
  xp = jnp if isinstance(attention_mask_BxT, jax.Array) else np
  real_BxT = xp.asarray(attention_mask_BxT).astype(bool)
  b = real_BxT.shape[0]
  prev_real_BxT = xp.concatenate([xp.zeros((b, 1), bool), real_BxT[:, :-1]], axis=1)
  index_BxT = xp.cumsum(real_BxT, axis=1) - 1  # each real token's index among its row's real ones
  if prompt_len_B is None:
    first_Bx1 = xp.ones((b, 1), index_BxT.dtype)
  else:
    first_Bx1 = xp.broadcast_to(xp.asarray(prompt_len_B), (b,))[:, None]
  # a row's first real token never has a real predecessor: prompt_len < 1 acts as 1
  return real_BxT & prev_real_BxT & (index_BxT >= first_Bx1)


def counted(attention_mask_BxT, given_BxT: Optional[jax.Array] = None):
  """The targets of a batch: `given_BxT` (a batch's target_mask) restricted to what the attention
  mask allows, or the default (prompt length 1) when none is given."""
  default = target_mask(attention_mask_BxT)
  return default if given_BxT is None else default & given_BxT.astype(bool)
