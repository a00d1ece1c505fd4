"""Compile-only footprints: a program compiled for a mesh from abstract arrays (nothing allocated),
and what it costs per device (kdjax.compiled: memory from XLA's analysis, collective bytes from
its HLO).

  train_step(config, mesh, batch, seq, ...)   the train step as train_lm and the study jit it
  sampler(config, mesh, batch, prompt_len, n)  the sampler as the study's sampling stages run it
  scorer(config, mesh, batch, seq_len)        one scoring batch

Any device count works with fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N):
the program is the one each of N devices would run, so the figures hold for N accelerators of
the same mesh up to the backend's own choices (fusion, collective algorithms, layouts). A mesh of
TPU devices (kdjax.compiled.tpu_devices: a topology, with libtpu installed) is compiled by the TPU
compiler instead, and every figure is then the TPU compiler's.

Each report also gives `flops` per device per call (kdjax.compiled.cost: XLA's cost analysis with
loop bodies weighted by their trip counts), `bytes_accessed` (kdjax.hbm.traffic: the HBM bytes of
the scheduled program, in-place updates and partial reads counted by what they touch; `xla_bytes`
is XLA's own count, every operand whole) and `compiler` (the platform of the mesh's devices). The
sampler's block loops end when every row has ended, so their trip counts come from `steps`
(tokens drawn; default all max_new_tokens: no row stops early).
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import compiled as compiled_lib
from kdjax import hbm
from kdjax import sharding as sharding_lib
from kdjax.llm.model import evaluate
from kdjax.llm.model import llama as model
from kdjax.llm.model import decode, partition, sampling
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.train import state as train_state
from kdjax.llm.train.step import StepSpec, compile_train_step


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _report(lowered, mesh, started: float, trips=()) -> dict:
  compiled = lowered.compile()
  out = compiled_lib.report(compiled, mesh.size)
  out["compile_seconds"] = round(time.perf_counter() - started, 2)
  cost = compiled_lib.cost(compiled, trips)
  out["collective_unknown_trip_counts"] = out["unknown_trip_counts"]  # their loops counted once
  out.update(flops=cost["flops"], bytes_accessed=hbm.traffic(compiled.as_text(), trips)["bytes"],
             xla_bytes=cost["bytes"], xla_flops=cost["xla_flops"],
             unknown_trip_counts=cost["unknown_trip_counts"], loops=len(cost["loops"]),
             compiler=mesh.devices.flat[0].platform)
  return out


def train_step(config: LlamaConfig, mesh, batch: int, seq: int,
               num_students: Optional[int] = None, teacher: Optional[LlamaConfig] = None,
               shared_batch: bool = False, grad_accum: int = 1) -> dict:
  """The compiled train step's footprint per device (kdjax.compiled.report + compile_seconds).

  num_students: N students vmapped (the study's students stage), each on its own batch [N, B, T]
  (or on one shared batch with shared_batch and a teacher: the token-level KD kinds)."""
  started = time.perf_counter()
  return _report(lower_train_step(config, mesh, batch, seq, num_students, teacher, shared_batch,
                                  grad_accum), mesh, started)


def lower_train_step(config: LlamaConfig, mesh, batch: int, seq: int,
                     num_students: Optional[int] = None, teacher: Optional[LlamaConfig] = None,
                     shared_batch: bool = False, grad_accum: int = 1):
  """The train step as the loop compiles it (compile_train_step, on `mesh`), lowered from
  abstract state and a [B, T] token batch (train_step's arguments), nothing allocated."""
  spec = StepSpec(model=config, total_steps=1000, num_students=num_students, teacher=teacher,
                  tempered_teacher=teacher is not None, shared_batch=shared_batch,
                  grad_accum=grad_accum)
  state = jax.eval_shape(functools.partial(train_state._init_fn, spec), jax.random.PRNGKey(0), None)
  shardings = train_state.state_shardings(spec, mesh, state)
  per_student = num_students is not None and not shared_batch
  bsh = sharding_lib.batch_sharding(mesh, students=per_student)
  shape = (num_students, batch, seq) if per_student else (batch, seq)
  tokens = {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bsh),
            "attention_mask": jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=bsh)}
  args = [_abstract(state, shardings), tokens, None]
  tsh = None
  if teacher is not None:
    tsh = partition.param_shardings(teacher, mesh)
    args[2] = _abstract(model.abstract_params(teacher), tsh)
    temps = (num_students,) if num_students is not None else ()
    args.append(jax.ShapeDtypeStruct(temps, jnp.float32, sharding=sharding_lib.replicated(mesh)))
  return compile_train_step(spec, shardings, bsh, tsh).lower(*args)


def _abstract_params(config: LlamaConfig, sharding):
  """The model's parameters as abstract arrays, every leaf with `sharding`."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      model.abstract_params(config))


def decode_trips(prompt_len: int, max_new_tokens: int, steps: Optional[int] = None,
                 kv_block: int = decode.KV_BLOCK) -> list[int]:
  """Steps each of sampling._sample_jit's block loops runs when the longest row draws `steps`
  tokens (default max_new_tokens): the loop of block j runs the steps i in [1, steps) whose new
  slot prompt_len + i - 1 lies in block j."""
  p, n = prompt_len, max_new_tokens
  steps = n if steps is None else min(steps, n)
  blocks = -(-(p + n - 1) // kv_block)
  first = p // kv_block if n > 1 else blocks
  return [sum(j * kv_block <= p + i - 1 < (j + 1) * kv_block for i in range(1, steps))
          for j in range(first, blocks)]


def sampler(config: LlamaConfig, mesh, batch: int, prompt_len: int, max_new_tokens: int,
            steps: Optional[int] = None) -> dict:
  """The sampler as pipeline.sample_dataset runs it (sampling._sample_jit): params replicated on
  the mesh's devices, the batch split over its `data` axis; costs for `steps` tokens drawn."""
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  arr = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  block = decode.kv_block(mesh.devices.flat[0].platform)
  started = time.perf_counter()
  lowered = sampling._sample_jit.lower(
      config, max_new_tokens, 0, False, False, _abstract_params(config, rep),
      arr((batch, prompt_len), jnp.int32, rows), arr((batch, prompt_len), jnp.bool_, rows),
      arr((), key.dtype, rep), arr((batch,), jnp.float32, rows), arr((batch,), jnp.float32, rows),
      arr((batch,), jnp.float32, rows), arr((), jnp.int32, rep), arr((), jnp.int32, rep),
      kv_block=block)
  return _report(lowered, mesh, started, decode_trips(prompt_len, max_new_tokens, steps, block))


def scorer(config: LlamaConfig, mesh, batch: int, seq_len: int) -> dict:
  """One scoring batch as pipeline.mean_loglik runs it (evaluate._sums_jit, data-parallel)."""
  rows = NamedSharding(mesh, P("data"))
  arr = lambda dtype: jax.ShapeDtypeStruct((batch, seq_len), dtype, sharding=rows)
  started = time.perf_counter()
  lowered = evaluate._sums_jit.lower(config, _abstract_params(config, NamedSharding(mesh, P())),
                                     arr(jnp.int32), arr(jnp.bool_), arr(jnp.bool_))
  return _report(lowered, mesh, started)
