"""Reading the train step's metrics: the non-finite stop, TensorBoard (process 0) and progress.

The loop dispatches step N before reading step N-1's metrics (MetricsLog.push keeps one step in
flight); `drain()` reads everything before a state is evaluated or saved, so no state whose loss
was not checked finite is ever kept.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from kdjax import events
from kdjax.cli import UserError


def check_finite(step: int, loss, gnorm, last_good: Callable[[], str]) -> None:
  """A one-line UserError naming the step and the last good checkpoint when loss or gradient
  norm is not finite."""
  if np.all(np.isfinite(loss)) and np.all(np.isfinite(gnorm)):
    return
  what = "loss" if not np.all(np.isfinite(loss)) else "gradient norm"
  raise UserError(
      f"non-finite {what} ({loss.tolist() if what == 'loss' else gnorm.tolist()}) at step "
      f"{step}: training stopped; the last good checkpoint {last_good()} is kept untouched")


class MetricsLog:
  """Metrics of dispatched steps, read one step late. `last_loss`: the latest loss read (a list
  per student, or a float)."""

  def __init__(self, workdir: str, total: int, start: int, students: bool, log_every: int,
               progress: bool, last_loss, last_good: Callable[[], str]):
    primary = jax.process_index() == 0
    self.writer = None
    if primary:
      self.writer = events.ScalarWriter(os.path.join(workdir, "tb"))
    self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                    disable=not (primary and progress), desc=os.path.basename(workdir) or "train")
    self.total, self.students, self.log_every = total, students, log_every
    self.last_loss, self.last_good = last_loss, last_good
    self.pending = []                                # (step, metrics) dispatched, not yet read
    self.clock = [time.perf_counter(), 0.0]          # (last bar update, tokens since)

  def push(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))
    while len(self.pending) > 1:
      self._read(*self.pending.pop(0))

  def drain(self) -> None:
    while self.pending:
      self._read(*self.pending.pop(0))

  def scalar(self, name: str, value: float, step: int) -> None:
    if self.writer is not None:
      self.writer.add_scalar(name, value, step)

  def _read(self, step: int, metrics) -> None:
    m = jax.device_get(metrics)
    loss = np.atleast_1d(np.asarray(m["loss"], np.float64))
    gnorm = np.atleast_1d(np.asarray(m["grad_norm"], np.float64))
    try:
      check_finite(step, loss, gnorm, self.last_good)
    except UserError:
      self.bar.close()
      raise
    self.last_loss = loss.tolist() if self.students else float(loss[0])
    if step % self.log_every == 0 or step == self.total:
      self.scalar("train/lr", float(np.atleast_1d(m["lr"])[0]), step)
      for i, l in enumerate(loss):
        suffix = f"/{i}" if self.students else ""
        self.scalar("train/loss" + suffix, float(l), step)
        self.scalar("train/grad_norm" + suffix, float(gnorm[i]), step)
    self._progress(step, loss, float(np.sum(m["tokens"])))

  def _progress(self, step: int, loss, tokens: float) -> None:
    self.clock[1] += tokens
    now = time.perf_counter()
    if now - self.clock[0] > 1.0 or step == self.total:
      self.bar.set_postfix(loss=f"{float(np.mean(loss)):.4f}",
                           tok_s=f"{self.clock[1] / (now - self.clock[0]):.0f}")
      self.clock[0], self.clock[1] = now, 0.0
    self.bar.update(1)

  def close(self) -> None:
    self.bar.close()
    if self.writer is not None:
      self.writer.close()
