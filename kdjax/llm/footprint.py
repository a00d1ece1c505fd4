"""Compile-only footprints: a program compiled for a mesh from abstract arrays (nothing allocated),
and what it costs per device (kdjax.compiled: memory from XLA's analysis, collective bytes from
its HLO).

  train_step(config, mesh, batch, seq, ...)   the train step as train_lm and the study jit it
  decode_step(config, mesh, batch, max_len)   one cached decode step of the sampler

Any device count works with fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N):
the program is the one each of N devices would run, so the figures hold for N accelerators of
the same mesh up to the backend's own choices (fusion, collective algorithms, layouts).
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp

from kdjax import compiled as compiled_lib
from kdjax import sharding as sharding_lib
from kdjax.llm.config import LlamaConfig


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _report(lowered, mesh, started: float) -> dict:
  compiled = lowered.compile()
  out = compiled_lib.report(compiled, mesh.size)
  out["compile_seconds"] = round(time.perf_counter() - started, 2)
  return out


def train_step(config: LlamaConfig, mesh, batch: int, seq: int,
               num_students: Optional[int] = None, teacher: Optional[LlamaConfig] = None,
               shared_batch: bool = False, grad_accum: int = 1) -> dict:
  """The compiled train step's footprint per device (kdjax.compiled.report + compile_seconds).

  num_students: N students vmapped (the study's students stage), each on its own batch [N, B, T]
  (or on one shared batch with shared_batch and a teacher: the token-level KD kinds)."""
  from kdjax.llm import train_state
  from kdjax.llm.train_step import StepSpec, compile_train_step
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
    from kdjax.llm import model
    tsh = sharding_lib.param_shardings(teacher, mesh)
    args[2] = _abstract(jax.eval_shape(lambda: model.init_params(teacher, jax.random.PRNGKey(0))),
                        tsh)
    temps = (num_students,) if num_students is not None else ()
    args.append(jax.ShapeDtypeStruct(temps, jnp.float32, sharding=sharding_lib.replicated(mesh)))
  started = time.perf_counter()
  return _report(compile_train_step(spec, shardings, bsh, tsh).lower(*args), mesh, started)


def decode_step(config: LlamaConfig, mesh, batch: int, max_len: int) -> dict:
  """One cached decode step (a token per row against a KV cache of max_len slots) of the
  sampler's model: params sharded by the logical-axis table, the cache and tokens over the batch."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from kdjax.llm import model
  psh = sharding_lib.param_shardings(config, mesh)
  params = _abstract(jax.eval_shape(lambda: model.init_params(config, jax.random.PRNGKey(0))), psh)
  cache = jax.eval_shape(lambda: model.KVCache.empty(config, batch, max_len))
  b = sharding_lib.logical_to_mesh(("batch",), (batch,), mesh)[0]
  kv = NamedSharding(mesh, P(None, b))
  cache_sh = model.KVCache(kv, kv, NamedSharding(mesh, P(b)), sharding_lib.replicated(mesh))
  cache = _abstract(cache, cache_sh)
  tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=NamedSharding(mesh, P(b)))

  def step(p, tokens_Bx1, c):
    with sharding_lib.use_mesh(mesh):
      logits, c = model.Llama(config).apply({"params": p}, tokens_Bx1, None, None, c)
      return logits[:, -1], c

  started = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=(2,)).lower(params, tok, cache)
  return _report(lowered, mesh, started)
