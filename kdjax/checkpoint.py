"""Orbax checkpoints: the training state for resume, and standalone model checkpoints (`ckpt:DIR`).

Training checkpoints (`Checkpointer`) keep {params, opt_state, step, rng} as one orbax PyTree item
and the data position (plus best-so-far validation and the last loss) as a JSON item, saved
together under one step directory, the last `keep` of them. Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact and the next start ignores (and cleans up) the partial one. Every process calls
save/restore (the array writes are collective: each process writes the shards it owns); JSON is
written by process 0.

A standalone model checkpoint is a directory holding `model_config.json` (the model config's
to_dict()), `params/` (an orbax PyTree) and optional `meta.json`; this module knows no model:
kdjax.llm.weights.loading.load_model_checkpoint reads one back as a Llama (it is what
`kdjax.llm.load_model('ckpt:DIR')` calls). Exports replace an existing directory by
rename, so a reader sees the old export or the new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from kdjax import distributed
from kdjax.cli import UserError, atomic_write_json, read_json

MODEL_CONFIG = "model_config.json"


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager for {state pytree, meta json} at integer steps."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Start saving (asynchronously when enabled); the previous save is finished first."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore onto `abstract_state` (ShapeDtypeStructs with shardings): (state, meta)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# ----------------------------------------------------------------------------- standalone models


def export_model(directory: str, config, params, meta: Optional[dict] = None) -> None:
  """Write a standalone model checkpoint (collective: every process calls it)."""
  directory = os.path.abspath(directory)
  parent, name = os.path.split(directory)
  tmp = os.path.join(parent, f".{name}.tmp")
  if jax.process_index() == 0:
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    os.makedirs(tmp)
  distributed.sync("kdjax_export_mkdir")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
  distributed.sync("kdjax_export_saved")
  if jax.process_index() == 0:
    atomic_write_json(os.path.join(tmp, "meta.json"), meta or {})
    atomic_write_json(os.path.join(tmp, MODEL_CONFIG), config.to_dict())  # written last: marks done
    old = os.path.join(parent, f".{name}.old")
    if os.path.exists(old):
      shutil.rmtree(old)
    if os.path.exists(directory):
      os.rename(directory, old)
    os.rename(tmp, directory)
    if os.path.exists(old):
      shutil.rmtree(old)
  distributed.sync("kdjax_export_done")


def is_model_checkpoint(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, MODEL_CONFIG))
          and os.path.isdir(os.path.join(directory, "params")))


def check_model_checkpoint(directory: str, want_params) -> None:
  """Refuse a model export whose saved parameter tree (orbax metadata: names and shapes, no
  weights read) is not `want_params` (a tree of ShapeDtypeStructs: what the model's config
  implies, e.g. jax.eval_shape of its init)."""
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(os.path.join(directory, "params"))
    saved = getattr(meta, "item_metadata", meta)
    got = {jax.tree_util.keystr(k): tuple(m.shape)
           for k, m in jax.tree_util.tree_leaves_with_path(saved)}
  except (ValueError, FileNotFoundError, KeyError, OSError, AttributeError) as e:
    msg = " ".join(str(e).split())[:200]
    raise UserError(f"ckpt:{directory}: unreadable parameters in params/ ({msg})") from None
  for k, a in jax.tree_util.tree_leaves_with_path(want_params):
    name = jax.tree_util.keystr(k)
    if got.get(name) != tuple(a.shape):
      raise UserError(f"ckpt:{directory}: parameter {name} is "
                      f"{'missing' if name not in got else f'of shape {got[name]}'}; "
                      f"{MODEL_CONFIG} implies {tuple(a.shape)}")


def require_model_checkpoint(directory: str) -> dict:
  """The config dict (model_config.json) of a standalone model checkpoint; a one-line error
  when `directory` is not one."""
  if not is_model_checkpoint(directory):
    hint = ""
    if is_model_checkpoint(os.path.join(directory, "best")):
      hint = f" (did you mean ckpt:{os.path.join(directory, 'best')}?)"
    raise UserError(f"ckpt:{directory} is not a kdjax model checkpoint (needs {MODEL_CONFIG} and "
                    f"params/){hint}")
  try:
    d = read_json(os.path.join(directory, MODEL_CONFIG))
  except (OSError, ValueError) as e:
    raise UserError(f"ckpt:{directory}: unreadable {MODEL_CONFIG}: {e}") from None
  if not isinstance(d, dict):
    raise UserError(f"ckpt:{directory}: unreadable {MODEL_CONFIG}: not a JSON object")
  return d


def restore_params(directory: str, abstract_params, sharding=None):
  """A standalone model checkpoint's params onto `abstract_params` (ShapeDtypeStructs), placed on
  `sharding` (a pytree of shardings, or one sharding for all leaves; default the first local
  device)."""
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, abstract_params)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params, sharding)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(os.path.join(directory, "params"), target)
  except (ValueError, FileNotFoundError, KeyError) as e:
    msg = " ".join(str(e).split())[:300]
    raise UserError(f"ckpt:{directory}: parameters do not match {MODEL_CONFIG}: {msg}") from None
