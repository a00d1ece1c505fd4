"""kdjax.checkpoint: training-state save/restore (sharded), keep-N, model export and ckpt: loading."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.llm.weights import loading
from kdjax import checkpoint as ckpt_lib
from kdjax import sharding
from kdjax.cli import UserError
from kdjax.llm.model import llama as model
from kdjax.llm.train import loop as train
from kdjax.llm.model.config import get_preset

CFG = get_preset("test-tiny")


def test_state_roundtrip_keep_n_and_shardings(tmp_path):
  mesh = sharding.make_mesh(2, 2, 2)
  spec = train.StepSpec(model=CFG, total_steps=5)
  state, sh = train.init_state(spec, mesh, seed=3)
  c = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
  assert c.latest_step() is None
  for step in (1, 2, 3):
    state = dict(state, step=jnp.asarray(step, jnp.int32),
                 params=jax.tree.map(lambda x: x + 1.0, state["params"]))
    c.save(step, state, {"data_position": [[0, step]], "step": step})
  c.close()
  c = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
  assert c.latest_step() == 3 and c.all_steps() == [2, 3]  # keep-N
  restored, meta = c.restore(3, train.abstract_state(spec, sh))
  assert meta == {"data_position": [[0, 3]], "step": 3}
  assert int(restored["step"]) == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = restored["params"]["layers"]["attn"]["q"]["kernel"]
  assert q.sharding == state["params"]["layers"]["attn"]["q"]["kernel"].sharding
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  c.close()


def test_partial_save_is_ignored(tmp_path):
  c = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
  state = {"w": jnp.arange(4.0)}
  c.save(5, state, {"step": 5})
  c.close()
  # what a kill -9 during a save leaves behind: orbax's temporary directory for step 6
  os.makedirs(tmp_path / "ck" / "6.orbax-checkpoint-tmp-123" / "state")
  c = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3)
  assert c.latest_step() == 5
  c.close()


def test_export_and_load_model_checkpoint(tmp_path):
  params = model.init_params(CFG, jax.random.PRNGKey(0))
  d = str(tmp_path / "best")
  ckpt_lib.export_model(d, CFG, params, {"step": 7})
  assert ckpt_lib.is_model_checkpoint(d)
  config, loaded = loading.load_model_checkpoint(d)
  assert config == CFG
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params2 = jax.tree.map(lambda x: x * 2, params)  # replacing an export
  ckpt_lib.export_model(d, CFG, params2)
  _, loaded2 = loading.load_model_checkpoint(d)
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(loaded2)[0]),
                                np.asarray(jax.tree.leaves(params2)[0]))
  assert sorted(os.listdir(tmp_path)) == ["best"]  # no temporary leftovers


def test_load_model_checkpoint_errors(tmp_path):
  with pytest.raises(UserError, match="is not a kdjax model checkpoint"):
    loading.load_model_checkpoint(str(tmp_path / "nothing"))
  ckpt_lib.export_model(str(tmp_path / "run" / "best"), CFG,
                        model.init_params(CFG, jax.random.PRNGKey(0)))
  with pytest.raises(UserError, match="did you mean ckpt:.*best"):
    loading.load_model_checkpoint(str(tmp_path / "run"))
