"""The train state {step, params, opt_state, rng}: initialisation born sharded, its shardings, the
abstract restore target, starting or resuming a run, and parameter checksums (computed on the
devices, sharded: no parameter is gathered to a host).

The teacher never enters the state (frozen, outside the optimizer, never checkpointed with the
students).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.llm.model import partition
from kdjax import sharding as sharding_lib
from kdjax.llm.model import llama as model
from kdjax.llm.train.step import StepSpec, make_optimizer


def _init_fn(spec: StepSpec, key, params=None):
  """The initial state from a PRNG key (random init: student i from fold_in(key, i), or every
  student from fold_in(key, 0) with spec.common_streams) or params."""
  tx = make_optimizer(spec)
  n = spec.num_students
  streams = jnp.zeros((n or 1,), jnp.int32) if spec.common_streams else jnp.arange(n or 1)
  if params is None:
    if n is None:
      params = model.init_params(spec.model, jax.random.fold_in(key, 0))
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(streams)
      params = jax.vmap(lambda k: model.init_params(spec.model, k))(keys)
  elif n is not None:
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), params)
  opt_state = tx.init(params) if n is None else jax.vmap(tx.init)(params)
  rng = jax.random.fold_in(key, 1 << 20)  # raw uint32[2] key: plain data in checkpoints
  if n is not None:
    rng = jax.vmap(lambda i: jax.random.fold_in(rng, i))(streams)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": rng}


def _path_key(path) -> tuple:
  return tuple(str(k) for k in path)


def state_shardings(spec: StepSpec, mesh, abstract_state):
  """Shardings of the whole state: params by the logical-axis table, optimizer moments like the
  parameter they belong to (matched by tree path and shape), everything else replicated."""
  pshard = partition.param_shardings(spec.model, mesh, spec.num_students)
  by_path = {}
  for (path, s), a in zip(jax.tree_util.tree_flatten_with_path(pshard)[0],
                          jax.tree.leaves(abstract_state["params"])):
    by_path[_path_key(path)] = (s, a.shape)
  rep = sharding_lib.replicated(mesh)

  def opt_leaf(path, leaf):
    key = _path_key(path)
    for n in range(len(key), 0, -1):
      hit = by_path.get(key[-n:])
      if hit is not None and hit[1] == leaf.shape:
        return hit[0]
    return rep

  return {"step": rep, "params": pshard,
          "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"]),
          "rng": rep}


def init_state(spec: StepSpec, mesh, seed: int, params=None):
  """(state, shardings): the initial state, born sharded on `mesh`."""
  key = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(functools.partial(_init_fn, spec), key, params)
  shardings = state_shardings(spec, mesh, abstract)
  init = jax.jit(functools.partial(_init_fn, spec), out_shardings=shardings)
  return init(key, params), shardings


def abstract_state(spec: StepSpec, shardings):
  """ShapeDtypeStructs (with shardings) of the state: the restore target."""
  abstract = jax.eval_shape(functools.partial(_init_fn, spec), jax.random.PRNGKey(0), None)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def fresh_meta(num_students) -> dict:
  """The loop's host-side state at step 0 (checkpointed with the state as its metadata;
  data_position None: the batch source starts at its beginning)."""
  n = num_students or 1
  return {"best_val_perplexity": [None] * n, "best_step": [None] * n, "last_loss": None,
          "last_val_perplexity": None, "data_position": None}


def start_or_resume(spec: StepSpec, mesh, seed: int, init_params, checkpointer):
  """(state, shardings, meta, resumed step or None): the latest checkpoint restored, or a new
  state (init_params or a random init from seed) with fresh metadata."""
  latest = checkpointer.latest_step()
  if latest is None:
    state, shardings = init_state(spec, mesh, seed, init_params)
    return state, shardings, fresh_meta(spec.num_students), None
  abstract = jax.eval_shape(functools.partial(_init_fn, spec), jax.random.PRNGKey(0), None)
  shardings = state_shardings(spec, mesh, abstract)
  state, meta = checkpointer.restore(latest, abstract_state(spec, shardings))
  meta["data_position"] = [list(p) for p in meta.get("data_position") or []]
  return state, shardings, meta, latest


# ----------------------------------------------------------------------------- checksums
#
# A 128-bit fingerprint of float32 parameters, computed where the parameters live: every element
# contributes fmix32(bits + key(lane, leaf, flat index)) to four uint32 sums (one per lane, each
# its own key), and integer sums modulo 2**32 are the same in any order, so the value does not
# depend on the mesh, the sharding or the process count; only four numbers per model leave the
# devices. Keys are murmur3-finalizer hashes of the element's place (leaf in tree order, row-major
# index within the leaf; an index wraps modulo 2**32); fmix32 is a bijection, so any change to one
# element changes every lane. Not a cryptographic hash: an equality check between runs.

_GOLDEN = 0x9E3779B9
_LANE_SEEDS = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)


def _fmix32(h):
  """murmur3's 32-bit finalizer (a bijection of uint32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _flat_index(shape, first: int):
  """uint32 row-major index of each element over dimensions first.. (modulo 2**32)."""
  idx, stride = jnp.zeros(shape, jnp.uint32), 1
  for d in reversed(range(first, len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  return idx


def _leaf_sums(x, leaf: int, first: int):
  """uint32 [*x.shape[:first], 4]: the four lane sums over one leaf's dimensions first.."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
  where = _fmix32(_flat_index(bits.shape, first) + jnp.uint32(leaf * _GOLDEN % 2**32))
  axes = tuple(range(first, bits.ndim))
  return jnp.stack([jnp.sum(_fmix32(bits + _fmix32(where ^ jnp.uint32(seed))), axis=axes,
                            dtype=jnp.uint32) for seed in _LANE_SEEDS], axis=-1)


def _fingerprint_sums(params, first: int):
  sums = [_leaf_sums(x, j, first) for j, x in enumerate(jax.tree.leaves(params))]
  return functools.reduce(jnp.add, sums)


@functools.lru_cache(maxsize=None)
def _fingerprint_fn(first: int, out_sharding):
  return jax.jit(functools.partial(_fingerprint_sums, first=first), out_shardings=out_sharding)


def _fingerprint(params, first: int) -> np.ndarray:
  """uint32 [4] (first=0: the whole tree) or [N, 4] (first=1: each index of the leading axis),
  replicated on the parameters' mesh, so that every process reads it from its own devices."""
  s = getattr(jax.tree.leaves(params)[0], "sharding", None)
  out = NamedSharding(s.mesh, P()) if isinstance(s, NamedSharding) else None
  return np.asarray(jax.device_get(_fingerprint_fn(first, out)(params)))


def _hex(lanes) -> str:
  return "".join(f"{int(v):08x}" for v in lanes)


def params_checksum(params) -> str:
  """The 128-bit fingerprint above of float32 parameters (32 hex digits); the same for the same
  values however they are sharded. Collective: every process calls it."""
  return _hex(_fingerprint(params, 0))


def _student_checksums(params, n: int) -> list[str]:
  """params_checksum of each of the n stacked students (student i's equals params_checksum of
  its own unstacked parameters)."""
  lanes = _fingerprint(params, 1)
  assert lanes.shape == (n, 4), lanes.shape
  return [_hex(row) for row in lanes]
