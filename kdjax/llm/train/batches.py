"""Batch sources of the training loop: `source(step, params) -> batch` (global jax.Arrays) and
`source.position()` (what a checkpoint must record to resume at the same batch).

  * DatasetBatches: deterministic batches of dataset iterators (kdjax.llm.data.BatchIterator) at an
    explicit (epoch, index) per iterator: one iterator gives [B, T] (one model, or students that
    share the batch), one per student gives [N, B, T].
  * OnPolicyBatches: each student's batch sampled from its CURRENT params at temperature 1
    (kdjax.llm.model.sampling, KV cache): B rows of `prompt` then up to max_new_tokens tokens, stopped
    at eos_id and padded after, prompt tokens not scored. Student i's key for optimizer step s
    (1-based) is `onpolicy_key(seed, s, i)`, a pure function of (seed, s, i) by fold_in (never a
    stateful stream), so a resumed run samples exactly the batches an uninterrupted one does. No
    gradient flows through sampling (the batch is data to the step).
  * GKD's student-data fraction lambda (Agarwal et al. 2024): OnPolicyBatches with `pstar` (a
    DatasetBatches of p*'s training sequences, [B, T], one for all students) and
    `student_fraction` lambda < 1. Every student's batch of step s is then rows 0..k-1 its own
    samples (k = own_rows(lambda, B) = round(lambda B), halves up; sampled with the same keys, k
    rows instead of B) and rows k..B-1 rows k..B-1 of p*'s batch at that step: the very rows a
    token-level student reading the same dataset from the same position gets there. lambda = 1
    is the plain on-policy source (p* never read), lambda = 0 p*'s batch for every student
    (nothing sampled). Deterministic per (seed, step): the samples by their keys, p*'s rows by
    the dataset's position (recorded in checkpoints like any DatasetBatches').
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm import data as data_lib
from kdjax.llm.model import sampling
from kdjax.llm.model import targets

SAMPLE_STREAM = 0x5A4D  # fold_in tag: sampling keys never coincide with the init keys of a seed


class DatasetBatches:
  """Batches of `iters` from data positions [[epoch, index], ...] (one per iterator)."""

  def __init__(self, iters, stacked: bool, positions, bsharding, gshape):
    self.iters, self.stacked = iters, stacked
    self.positions = [list(p) for p in positions] if positions else [[0, 0] for _ in iters]
    self.sharding, self.gshape = bsharding, tuple(gshape)
    self.local_rows = data_lib.process_rows(bsharding, self.gshape, 1 if stacked else 0)

  def position(self) -> list:
    return [list(p) for p in self.positions]

  def _advance(self):
    for it, pos in zip(self.iters, self.positions):
      pos[1] += 1
      if pos[1] == it.steps_per_epoch:
        pos[0], pos[1] = pos[0] + 1, 0

  def __call__(self, step, params=None) -> dict:
    parts = [it.local_batch(e, i, self.local_rows)
             for it, (e, i) in zip(self.iters, self.positions)]
    self._advance()
    local = parts[0] if not self.stacked else {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    return data_lib.global_batch(local, self.sharding, self.gshape)


def onpolicy_key(seed: int, step, i):
  """The PRNG key student i samples its batch of optimizer step `step` (1-based) with."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), SAMPLE_STREAM)
  return jax.random.fold_in(jax.random.fold_in(key, step), i)


def rows_from_samples(prompt_P, tokens_BxM, lengths_B, pad_id: int) -> dict:
  """A training batch of prompt + sampled tokens: {input_ids, attention_mask, target_mask} [B, T]
  with T = P + M; the first P tokens are context (not targets), pads after each row's end."""
  b, m = tokens_BxM.shape
  p = prompt_P.shape[0]
  ids_BxT = jnp.concatenate([jnp.broadcast_to(prompt_P, (b, p)), tokens_BxM], axis=1)
  new_BxM = jnp.arange(m)[None, :] < lengths_B[:, None]
  mask_BxT = jnp.concatenate([jnp.ones((b, p), bool), new_BxM], axis=1)
  ids_BxT = jnp.where(mask_BxT, ids_BxT, pad_id)
  return {"input_ids": ids_BxT.astype(jnp.int32), "attention_mask": mask_BxT,
          "target_mask": targets.target_mask(mask_BxT, p)}


def sample_batch(config, params, prompt_P, key, *, batch_size: int, max_new_tokens: int,
                 eos_id: int, pad_id: int) -> dict:
  """One model's on-policy batch [B, T]: B samples at temperature 1 after `prompt_P`."""
  prompt_BxP = jnp.broadcast_to(prompt_P, (batch_size, prompt_P.shape[0]))
  out = sampling.sample(config, params, prompt_BxP, jnp.ones(prompt_BxP.shape, bool), key,
                        max_new_tokens=max_new_tokens, temperature=1.0, eos_id=eos_id,
                        pad_id=pad_id)
  return rows_from_samples(prompt_P, out.tokens_BxN, out.lengths_B, pad_id)


def sample_students(config, params_N, step, *, seed: int, prompt: tuple, streams: tuple,
                    **kw) -> dict:
  """Every student's on-policy batch [N, B, T] for optimizer step `step` (vmapped sampler;
  student i samples with its stream streams[i])."""
  prompt_P = jnp.asarray(prompt, jnp.int32)
  keys_N = jax.vmap(lambda i: onpolicy_key(seed, step, i))(jnp.asarray(streams, jnp.int32))
  one = functools.partial(sample_batch, config, prompt_P=prompt_P, **kw)
  return jax.vmap(lambda p, k: one(p, key=k))(params_N, keys_N)


def own_rows(student_fraction: float, batch_size: int) -> int:
  """How many of a batch's B rows are the student's own samples: round(lambda B), halves up."""
  return int(math.floor(student_fraction * batch_size + 0.5))


def mix_rows(own_NxKxT: dict | None, pstar_BxT: dict, n: int) -> dict:
  """[N, B, T] batches: student i's rows 0..k-1 are own_NxKxT[i] (k = its row count; None: k = 0),
  rows k..B-1 are p*'s rows k..B-1 (the same for every student)."""
  k = 0 if own_NxKxT is None else own_NxKxT["input_ids"].shape[1]
  out = {}
  for key, x_BxT in pstar_BxT.items():
    rest_NxRxT = jnp.broadcast_to(x_BxT[k:][None], (n,) + x_BxT[k:].shape)
    out[key] = (rest_NxRxT if own_NxKxT is None else
                jnp.concatenate([own_NxKxT[key].astype(x_BxT.dtype), rest_NxRxT], axis=1))
  return out


def mixed_students(config, params_N, step, pstar_BxT, *, own: int, streams: tuple, **kw) -> dict:
  """Every student's batch [N, B, T] of step `step`: `own` rows of its own samples (the keys of
  sample_students), the rest p*'s rows of pstar_BxT (mix_rows)."""
  mine = (sample_students(config, params_N, step, streams=streams, batch_size=own, **kw)
          if own else None)
  return mix_rows(mine, pstar_BxT, len(streams))


class OnPolicyBatches:
  """`source(step, params_N)`: the students' own samples, jitted once (params in, batch out
  sharded like a [N, B, T] training batch); with `pstar` (DatasetBatches of [B, T] rows) and
  student_fraction < 1, a GKD mix of their own samples and p*'s sequences (module docstring)."""

  def __init__(self, config, params_sharding, bsharding, *, seed, prompt, streams,
               batch_size, max_new_tokens, eos_id, pad_id, student_fraction=1.0, pstar=None):
    kw = dict(seed=seed, prompt=tuple(prompt), streams=tuple(streams),
              max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    self.pstar = pstar if student_fraction < 1 else None
    if self.pstar is None:
      if student_fraction < 1:
        raise ValueError(f"student_fraction={student_fraction} < 1 needs p*'s batches (pstar)")
      fn = functools.partial(sample_students, config, batch_size=batch_size, **kw)
      self._fn = jax.jit(fn, in_shardings=(params_sharding, None), out_shardings=bsharding)
    else:
      fn = functools.partial(mixed_students, config, own=own_rows(student_fraction, batch_size),
                             **kw)
      self._fn = jax.jit(fn, in_shardings=(params_sharding, None, None), out_shardings=bsharding)

  def position(self) -> list:
    return [] if self.pstar is None else self.pstar.position()

  def __call__(self, step, params) -> dict:
    step_arg = jnp.asarray(step, jnp.int32)
    if self.pstar is None:
      return self._fn(params, step_arg)
    return self._fn(params, step_arg, self.pstar(step))
