"""The teacher's mean per-token entropy under a knob's setting: the x axis of "is entropy the knob?"
(issue 22). For each setting (a temperature T, or a truncation top_p / min_p / top_k at T = 1)
the entropy in nats of the teacher's next-token distribution, formed by kdjax.llm.model.truncation
(the rule the sampler and the token-level targets use), at every target position of p*'s select
split (generated tokens only: kdjax.llm.model.targets, the positions precision and recall average
over), summed over the split and divided by the number of positions (the per-token convention of
kdjax.llm.model.evaluate). The select split is held out from every student and from recall, and is
the teacher's own checkpoint-selection set: the entropy describes the teacher on p*'s text.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm.model import llama as model
from kdjax.llm.model import targets, truncation


@functools.partial(jax.jit, static_argnums=(0, 5))
def _sums(config, params, ids_BxT, mask_BxT, target_mask_BxT, knob, value):
  logits = model.forward(config, params, ids_BxT, mask_BxT)[:, :-1]
  counted = targets.counted(mask_BxT, target_mask_BxT)[:, 1:]
  return truncation.entropy_sums(logits, counted, knob, value)


def mean_entropy(config, params, batches, knob: str, value: float) -> float:
  """Mean per-token entropy (nats) of the model's next-token distribution under `knob` at `value`
  over the target positions of {'input_ids', 'attention_mask', optional 'target_mask'} batches
  (summed in float64 on the host)."""
  total, count, pending = 0.0, 0.0, []
  for batch in batches:
    mask = jnp.asarray(batch["attention_mask"]).astype(bool)
    given = batch.get("target_mask")
    given = targets.target_mask(mask) if given is None else jnp.asarray(given)
    pending.append(_sums(config, params, jnp.asarray(batch["input_ids"]), mask, given, knob,
                         jnp.float32(value)))
  for s, c in jax.device_get(pending):
    total += float(np.float64(s))
    count += float(c)
  if count == 0:
    raise ValueError("no target positions to measure the teacher's entropy on")
  return total / count
