"""Validation perplexity during training, best-checkpoint selection and model export.

  * Evaluator(params) -> one validation perplexity per student (a list of one without students),
    each on the one shared validation set or on the student's own (one set per student).
  * update_best(meta, ppls, step) -> the students whose perplexity improved (meta updated): each
    student's best step is its own.
  * Exporter.export(params, i, step, ppl): student i (or the one model) as a standalone model
    checkpoint, workdir/best or workdir/best/<i> (a `ckpt:` spec).
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint as ckpt_lib
from kdjax import sharding as sharding_lib
from kdjax.llm import data as data_lib
from kdjax.llm.model import evaluate, partition
from kdjax.llm.train.step import StepSpec, _eval_sums


def _own_eval_sums(params, batch, spec: StepSpec):
  """(sum of target log-probs, target count), [N] each: student i on batch row-block i."""
  fn = jax.vmap(functools.partial(evaluate.loglik_sums, spec.model))
  return fn(params, batch["input_ids"], batch["attention_mask"].astype(bool), batch["target_mask"])


def _stacked_batches(sets, batch_size: int, seq_len: int, pad_id: int, limit: int):
  """[N, B, T] batches: row-block i from set i (a shorter set continues as all-padding rows)."""
  filler = {"input_ids": np.full((batch_size, seq_len), pad_id, np.int32),
            "attention_mask": np.zeros((batch_size, seq_len), bool),
            "target_mask": np.zeros((batch_size, seq_len), bool)}
  per_set = [data_lib.eval_batches(rows, batch_size, seq_len, pad_id, limit) for rows in sets]
  for group in itertools.zip_longest(*per_set, fillvalue=filler):
    yield {k: np.stack([b[k] for b in group]) for k in filler}


class Evaluator:
  """Per-token validation perplexity (kdjax.llm.model.targets' targets) of each model: on every row of
  `val_rows` (one set, shared by all students), or student i on `val_rows[i]` (a list: one set per
  student). limit > 0: only the first `limit` rows of each set (a fixed subset)."""

  def __init__(self, spec: StepSpec, mesh, params_sharding, val_rows, batch_size: int,
               seq_len: int, pad_id: int, limit: int = 0):
    self.own = isinstance(val_rows, (list, tuple))
    self.sets = list(val_rows) if self.own else [val_rows]
    self.sharding = sharding_lib.batch_sharding(mesh, students=self.own)
    self.fn = jax.jit(functools.partial(_own_eval_sums if self.own else _eval_sums, spec=spec),
                      in_shardings=(params_sharding, self.sharding))
    self.shape = ((len(self.sets),) if self.own else ()) + (batch_size, seq_len)
    self.pad_id, self.limit = pad_id, limit
    self.local_rows = data_lib.process_rows(self.sharding, self.shape, len(self.shape) - 2)

  def _batches(self):
    b, t = self.shape[-2:]
    if self.own:
      return _stacked_batches(self.sets, b, t, self.pad_id, self.limit)
    return data_lib.eval_batches(self.sets[0], b, t, self.pad_id, self.limit)

  def __call__(self, params) -> list[float]:
    sums = None
    for batch in self._batches():
      local = {k: v[..., self.local_rows, :] for k, v in batch.items()}
      s = self.fn(params, data_lib.global_batch(local, self.sharding, self.shape))
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    total_lp, count = (np.atleast_1d(np.asarray(x, np.float64)) for x in jax.device_get(sums))
    return [float(math.exp(-t / max(c, 1.0))) for t, c in zip(total_lp, count)]


def update_best(meta: dict, ppls: list, step: int) -> list[int]:
  """Record each student's best perplexity and its step in meta; the students that improved."""
  improved = []
  for i, ppl in enumerate(ppls):
    best = meta["best_val_perplexity"][i]
    if best is None or ppl < best:
      meta["best_val_perplexity"][i], meta["best_step"][i] = ppl, step
      improved.append(i)
  return improved


class Exporter:
  """Writes workdir/best (one model) or workdir/best/<i> (student i of the stacked params)."""

  def __init__(self, workdir: str, config, mesh, students: bool):
    self.workdir, self.config, self.students = workdir, config, students
    self.take = jax.jit(lambda p, i: jax.tree.map(lambda x: x[i], p),
                        out_shardings=partition.param_shardings(config, mesh))

  def export(self, params, i: int, step: int, ppl) -> None:
    if self.students:
      params, target = self.take(params, i), os.path.join(self.workdir, "best", str(i))
    else:
      target = os.path.join(self.workdir, "best")
    ckpt_lib.export_model(target, self.config, params, {
        "step": step, "val_perplexity": ppl, "student": i if self.students else None})
