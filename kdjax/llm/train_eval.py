"""Validation perplexity during training, best-checkpoint selection and model export.

  * Evaluator(params) -> one validation perplexity per student (a list of one without students).
  * update_best(meta, ppls, step) -> the students whose perplexity improved (meta updated).
  * Exporter.export(params, i, step, ppl): student i (or the one model) as a standalone model
    checkpoint, workdir/best or workdir/best/<i> (a `ckpt:` spec).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoint as ckpt_lib
from kdjax import sharding as sharding_lib
from kdjax.llm import data as data_lib
from kdjax.llm.train_step import StepSpec, _eval_sums


class Evaluator:
  """Per-token validation perplexity of every row of `val_rows` (kdjax.llm.targets' targets)."""

  def __init__(self, spec: StepSpec, mesh, params_sharding, val_rows, batch_size: int,
               seq_len: int, pad_id: int):
    self.sharding = sharding_lib.batch_sharding(mesh)
    self.fn = jax.jit(functools.partial(_eval_sums, spec=spec),
                      in_shardings=(params_sharding, self.sharding))
    self.val_rows, self.shape, self.pad_id = val_rows, (batch_size, seq_len), pad_id
    self.local_rows = data_lib.process_rows(self.sharding, self.shape, 0)

  def __call__(self, params) -> list[float]:
    sums = None
    for batch in data_lib.eval_batches(self.val_rows, *self.shape, self.pad_id):
      local = {k: v[self.local_rows] for k, v in batch.items()}
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
                        out_shardings=sharding_lib.param_shardings(config, mesh))

  def export(self, params, i: int, step: int, ppl) -> None:
    if self.students:
      params, target = self.take(params, i), os.path.join(self.workdir, "best", str(i))
    else:
      target = os.path.join(self.workdir, "best")
    ckpt_lib.export_model(target, self.config, params, {
        "step": step, "val_perplexity": ppl, "student": i if self.students else None})
