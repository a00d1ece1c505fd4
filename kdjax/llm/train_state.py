"""The train state {step, params, opt_state, rng}: initialisation born sharded, its shardings, the
abstract restore target, starting or resuming a run, and parameter checksums.

The teacher never enters the state (frozen, outside the optimizer, never checkpointed with the
students).
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import sharding as sharding_lib
from kdjax.llm import model
from kdjax.llm.train_step import StepSpec, make_optimizer


def _init_fn(spec: StepSpec, key, params=None):
  """The initial state from a PRNG key (random init: student i from fold_in(key, i)) or params."""
  tx = make_optimizer(spec)
  n = spec.num_students
  if params is None:
    if n is None:
      params = model.init_params(spec.model, jax.random.fold_in(key, 0))
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
      params = jax.vmap(lambda k: model.init_params(spec.model, k))(keys)
  elif n is not None:
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), params)
  opt_state = tx.init(params) if n is None else jax.vmap(tx.init)(params)
  rng = jax.random.fold_in(key, 1 << 20)  # raw uint32[2] key: plain data in checkpoints
  if n is not None:
    rng = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": rng}


def _path_key(path) -> tuple:
  return tuple(str(k) for k in path)


def state_shardings(spec: StepSpec, mesh, abstract_state):
  """Shardings of the whole state: params by the logical-axis table, optimizer moments like the
  parameter they belong to (matched by tree path and shape), everything else replicated."""
  pshard = sharding_lib.param_shardings(spec.model, mesh, spec.num_students)
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


def _host_leaves(tree) -> list[np.ndarray]:
  leaves = jax.tree.leaves(tree)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    leaves = [multihost_utils.process_allgather(x, tiled=True) for x in leaves]
  return [np.asarray(jax.device_get(x)) for x in leaves]


def params_checksum(params) -> str:
  """sha256 over the float32 bytes of the parameter leaves in tree order (collective)."""
  h = hashlib.sha256()
  for leaf in _host_leaves(params):
    h.update(np.ascontiguousarray(leaf, dtype=np.float32).tobytes())
  return h.hexdigest()


def _student_checksums(params, n: int) -> list[str]:
  leaves = _host_leaves(params)
  out = []
  for i in range(n):
    h = hashlib.sha256()
    for leaf in leaves:
      h.update(np.ascontiguousarray(leaf[i], dtype=np.float32).tobytes())
    out.append(h.hexdigest())
  return out
