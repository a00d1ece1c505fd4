"""Samples that depend on the row, not on the machine: rows drawn in fixed chunks, one per device.

kdjax.llm.model.sampling.sample draws a batch's rows together, and a row's tokens follow the
program that drew them: split a batch of B rows over D devices and each device runs a program
compiled for B / D rows, whose logits round differently in their last bits at another shape
(XLA fuses and accelerator kernels tile by shape), so a draw near a boundary of the inverse CDF
flips and the row goes on as another sample. The same flags then give other samples on 4 devices
than on 2 x 2 (two processes) or 8.

Here the unit of work is a chunk of R rows (R = rows_per_device, fixed by the caller's flags) with
its own key: chunk c of a stream is drawn from fold_in(key, c) by ONE device running the sampler on
exactly R rows. A call takes one chunk per device (`jax.shard_map` over a 1-D mesh of the devices,
params replicated, each device its own key and R rows; no collective), so every chunk is drawn by
the same R-row program whatever the number of devices or processes: row r of a stream is row
r % R of chunk r // R, a function of (params, key, r, R) alone. A call with fewer chunks than
devices fills the spare devices with copies of its last chunk, whose rows are dropped; a stream
whose rows are not a multiple of R drops the rest of its last chunk. So every device count holds
every R (memory aside: R rows' KV cache on each device), and the only errors are R or a row count
below 1.

`sample_chunks` draws one call's chunks (keys given: the study deals chunks of several shards to
a process's devices); `sample_rows` draws a stream's first num_rows rows. Sampler keyword
arguments (top_k, top_p, ...) pass through to sampling.sample unchanged (`draw_kwargs`);
temperature is traced (one compile serves every temperature).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.cli import require
from kdjax.llm.model import sampling
from kdjax.llm.model.sampling import SampleOutput

AXIS = "rows"


def chunk_key(key, chunk: int):
  """The key of chunk `chunk` of the stream `key`."""
  return jax.random.fold_in(key, chunk)


def row_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh over `devices` (default: this process's local devices), one chunk per device."""
  devices = list(jax.local_devices() if devices is None else devices)
  require(len(devices) >= 1, "sampling: no devices to sample on")
  return Mesh(np.array(devices), (AXIS,))


def _device_body(params, ids_RxP, mask_RxP, key_1, temperature, *, config, max_new_tokens,
                 eos_id, pad_id, draw_kwargs):
  """One device's chunk: the plain sampler on its R rows with its chunk's key."""
  return sampling.sample(config, params, ids_RxP, mask_RxP, key_1[0],
                         max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                         pad_id=pad_id, **dict(draw_kwargs))


@functools.partial(jax.jit, static_argnames=("config", "mesh", "max_new_tokens", "eos_id",
                                             "pad_id", "draw_kwargs"))
def _on_devices(params, ids_DRxP, mask_DRxP, keys_D, temperature, *, config, mesh,
                max_new_tokens, eos_id, pad_id, draw_kwargs) -> SampleOutput:
  body = functools.partial(_device_body, config=config, max_new_tokens=max_new_tokens,
                           eos_id=eos_id, pad_id=pad_id, draw_kwargs=draw_kwargs)
  rows = P(AXIS)
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), rows, rows, rows, P()), out_specs=rows,
                       check_vma=False)(params, ids_DRxP, mask_DRxP, keys_D, temperature)


class ChunkSampler:
  """Draws chunks of `rows_per_device` rows after one prompt, one chunk per device of `mesh` per
  call. Holds the replicated params and the placed prompt, so a stage's calls reuse them."""

  def __init__(self, config, params, prompt: Sequence[int], *, rows_per_device: int,
               max_new_tokens: int, eos_id: Optional[int] = None, pad_id: int = 0,
               mesh: Optional[Mesh] = None, draw_kwargs: Optional[dict] = None):
    require(int(rows_per_device) >= 1, f"sampling: {rows_per_device} rows per device: must be "
            ">= 1")
    require(len(prompt) >= 1, "sampling: the prompt is empty")
    self.config, self.rows = config, int(rows_per_device)
    self.mesh = row_mesh() if mesh is None else mesh
    self.devices = self.mesh.devices.size
    self.max_new_tokens = int(max_new_tokens)
    if eos_id is None:
      eos_id = config.eos_token_id
    self.eos_id = -1 if eos_id is None or int(eos_id) < 0 else int(eos_id)
    self.pad_id = int(pad_id)
    self.draw_kwargs = tuple(sorted((draw_kwargs or {}).items()))
    self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
    n = self.devices * self.rows
    split = NamedSharding(self.mesh, P(AXIS))
    self._ids = jax.device_put(np.tile(np.asarray(prompt, np.int32), (n, 1)), split)
    self._mask = jax.device_put(np.ones((n, len(prompt)), bool), split)
    self._split = split

  def __call__(self, keys: Sequence, temperature) -> SampleOutput:
    """Chunks for `keys` (1 to self.devices keys, one chunk each): outputs of len(keys) * R rows,
    chunk i's rows at [i * R, (i + 1) * R), on the host (numpy)."""
    require(1 <= len(keys) <= self.devices, f"sampling: {len(keys)} chunks for one call on "
            f"{self.devices} device(s)")
    keys = list(keys) + [keys[-1]] * (self.devices - len(keys))  # spare devices: dropped rows
    keys_D = jax.device_put(jnp.stack(keys), self._split)
    out = _on_devices(self.params, self._ids, self._mask, keys_D, jnp.float32(temperature),
                      config=self.config, mesh=self.mesh, max_new_tokens=self.max_new_tokens,
                      eos_id=self.eos_id, pad_id=self.pad_id, draw_kwargs=self.draw_kwargs)
    n = len(keys) * self.rows
    return SampleOutput(*(np.asarray(x)[:n] for x in out))


def sample_rows(config, params, prompt: Sequence[int], key, *, num_rows: int,
                rows_per_device: int, max_new_tokens: int, temperature=1.0,
                eos_id: Optional[int] = None, pad_id: int = 0, devices: Optional[Sequence] = None,
                draw_kwargs: Optional[dict] = None) -> SampleOutput:
  """The first `num_rows` rows of the stream `key` (chunk c from chunk_key(key, c)), drawn on
  `devices` (default: the local devices): the same tokens on any number of devices."""
  require(int(num_rows) >= 1, f"sampling: {num_rows} rows: must be >= 1")
  sampler = ChunkSampler(config, params, prompt, rows_per_device=rows_per_device,
                         max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                         mesh=row_mesh(devices), draw_kwargs=draw_kwargs)
  chunks = [chunk_key(key, c) for c in range(math.ceil(num_rows / sampler.rows))]
  outs = [sampler(chunks[i:i + sampler.devices], temperature)
          for i in range(0, len(chunks), sampler.devices)]
  return SampleOutput(*(np.concatenate(x)[:num_rows] for x in zip(*outs)))
