"""GKD's student-data fraction lambda (kdjax.llm.train.batches, TrainConfig.student_data_fraction):
each on-policy batch's first round(lambda B) rows are the student's own samples, the rest the rows
of p*'s batch a token-level student reads at that step; lambda 1 and 0 are the existing paths; the
study's `onpolicy_<loss>@<lambda>` kinds."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import sharding
from kdjax.cli import UserError
from kdjax.llm import data as data_lib
from kdjax.llm.model.config import get_preset
from kdjax.llm.study import kinds
from kdjax.llm.train import batches
from kdjax.llm.train import loop as train

CFG = get_preset("test-tiny")
PROMPT, MAX_NEW, N, B = (5, 17, 42), 6, 2, 8
T = len(PROMPT) + MAX_NEW


def _pstar_rows(n=40, seed=0):
  """p*-like rows: the prompt, then 1..MAX_NEW + 2 random tokens (some longer than T)."""
  rng = np.random.default_rng(seed)
  rows = [list(PROMPT) + rng.integers(0, 256, size=int(rng.integers(1, MAX_NEW + 3))).tolist()
          for _ in range(n)]
  return data_lib.TokenRows(rows, prompt_lens=[len(PROMPT)] * n)


def _pstar_iter(seed=7):
  return data_lib.BatchIterator(_pstar_rows(), B, T, seed=seed)


def _setup():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  spec = train.StepSpec(model=CFG, total_steps=10, num_students=N)
  state, sh = train.init_state(spec, mesh, seed=0)
  params = jax.tree.map(np.asarray, state["params"])
  params["embed"]["embedding"] = params["embed"]["embedding"] * 3.0  # less flat samples
  return mesh, sh, params


def _source(mesh, sh, fraction, pstar_iter=None, batch_size=B, seed=4):
  pstar = None
  if pstar_iter is not None:
    pstar = batches.DatasetBatches([pstar_iter], False, None, sharding.batch_sharding(mesh),
                                   (batch_size, T))
  return batches.OnPolicyBatches(
      CFG, sh["params"], sharding.batch_sharding(mesh, students=True), seed=seed, prompt=PROMPT,
      streams=range(N), batch_size=batch_size, max_new_tokens=MAX_NEW, eos_id=-1, pad_id=0,
      student_fraction=fraction, pstar=pstar)


def _token_level(mesh, steps):
  """The batches a token-level student reads (one shared [B, T] batch a step) from position 0."""
  src = batches.DatasetBatches([_pstar_iter()], False, None, sharding.batch_sharding(mesh), (B, T))
  return [jax.device_get(src(s)) for s in range(1, steps + 1)]


def test_own_rows_rounds_half_up():
  assert [batches.own_rows(f, 8) for f in (0.0, 0.3, 0.3125, 0.5, 0.9, 1.0)] == [0, 2, 3, 4, 7, 8]
  assert batches.own_rows(0.5, 5) == 3 and batches.own_rows(0.5, 3) == 2  # not banker's rounding


def test_mix_rows_on_a_hand_made_batch():
  own = {"input_ids": jnp.asarray([[[1, 1], [2, 2]], [[3, 3], [4, 4]]], jnp.int32),
         "attention_mask": jnp.ones((2, 2, 2), bool)}
  pstar = {"input_ids": jnp.asarray([[9, 9], [8, 8], [7, 7], [6, 6]], jnp.int32),
           "attention_mask": jnp.asarray([[1, 1], [1, 1], [1, 0], [0, 0]], bool)}
  got = jax.device_get(batches.mix_rows(own, pstar, 2))
  np.testing.assert_array_equal(got["input_ids"], [[[1, 1], [2, 2], [7, 7], [6, 6]],
                                                   [[3, 3], [4, 4], [7, 7], [6, 6]]])
  np.testing.assert_array_equal(got["attention_mask"][:, 2:], [[[1, 0], [0, 0]]] * 2)
  none = jax.device_get(batches.mix_rows(None, pstar, 3))
  np.testing.assert_array_equal(none["input_ids"], np.broadcast_to(pstar["input_ids"], (3, 4, 2)))


def test_mixed_batches_take_the_right_rows_from_each_source():
  mesh, sh, params = _setup()
  steps, k = 3, batches.own_rows(0.5, B)
  mixed = _source(mesh, sh, 0.5, _pstar_iter())
  own = _source(mesh, sh, 1.0, batch_size=k)  # the same keys, k rows: the students' own part
  want_pstar = _token_level(mesh, steps)
  got = [jax.device_get(mixed(s, params)) for s in range(1, steps + 1)]
  for s in range(1, steps + 1):
    g, mine, ps = got[s - 1], jax.device_get(own(s, params)), want_pstar[s - 1]
    assert g["input_ids"].shape == (N, B, T) and set(g) == set(ps)
    for key in g:
      np.testing.assert_array_equal(g[key][:, :k], mine[key], err_msg=f"step {s} {key}")
      for i in range(N):
        np.testing.assert_array_equal(g[key][i, k:], ps[key][k:], err_msg=f"step {s} {key} {i}")
    assert not np.array_equal(g["input_ids"][0, :k], g["input_ids"][1, :k])  # each its own
    assert g["target_mask"][:, k:].sum() > 0 and g["target_mask"][:, :k].sum() == N * k * MAX_NEW
  # p*'s rows move on with the steps; the data position is what a checkpoint records
  assert not np.array_equal(got[0]["input_ids"][0, k:], got[1]["input_ids"][0, k:])
  assert mixed.position() == [[0, steps]]
  # deterministic per (seed, step): a fresh source gives the same batches
  again = _source(mesh, sh, 0.5, _pstar_iter())
  for s in range(1, steps + 1):
    np.testing.assert_array_equal(jax.device_get(again(s, params))["input_ids"],
                                  got[s - 1]["input_ids"])


def test_lambda_one_and_zero_are_the_existing_paths():
  mesh, sh, params = _setup()
  plain = _source(mesh, sh, 1.0)
  with_pstar = _source(mesh, sh, 1.0, _pstar_iter())  # lambda 1: p* is never read
  for s in (1, 2):
    a, b = jax.device_get(plain(s, params)), jax.device_get(with_pstar(s, params))
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert with_pstar.position() == []
  zero = _source(mesh, sh, 0.0, _pstar_iter())  # lambda 0: every student gets p*'s batch
  for s, ps in enumerate(_token_level(mesh, 2), start=1):
    got = jax.device_get(zero(s, params))
    for key in ps:
      np.testing.assert_array_equal(got[key], np.broadcast_to(ps[key], (N,) + ps[key].shape))
  with pytest.raises(ValueError, match="needs p"):
    _source(mesh, sh, 0.5)


# ----------------------------------------------------------------------------- TrainConfig / train


def _cfg(**kw):
  base = dict(model="preset:test-tiny", teacher="preset:test-tiny-untied@3", objective="srkl",
              teacher_temperatures=(0.7, 1.3), batch_size=8, lr=3e-3, progress=False, seed=1,
              onpolicy=True, prompt=PROMPT, max_new_tokens=MAX_NEW, eos_id=-1, steps=2,
              train_data=("synthetic:32",), seq_len=T, student_data_fraction=0.5)
  base.update(kw)
  return train.TrainConfig(**base)


BAD = [
    (dict(student_data_fraction=1.5), "must be in [0, 1]"),
    (dict(student_data_fraction=0.5, onpolicy=False, prompt=(), max_new_tokens=0),
     "is for --onpolicy runs only"),
    (dict(train_data=("synthetic:8", "synthetic:9")), "(p*'s sequences), got 2"),
    (dict(train_data=()), "(p*'s sequences), got 0"),
    (dict(seq_len=16), "must have one length"),
    (dict(student_data_fraction=1.0), "--train_data is not used with --onpolicy"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_preflight_one_line_errors(change, message):
  with pytest.raises(UserError) as e:
    train.preflight(_cfg(**change))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_identity_keeps_older_runs_and_records_lambda():
  assert "student_data_fraction" not in _cfg(student_data_fraction=1.0, train_data=()).to_dict()
  assert _cfg().to_dict()["student_data_fraction"] == 0.5


def test_train_with_a_mixed_batch_runs_and_records_the_data_position(tmp_path):
  s = train.train(_cfg(checkpoint_every=1), str(tmp_path / "w"))
  assert s["steps"] == 2 and all(np.isfinite(s["final_losses"]))
  assert s["student_checksums"][0] != s["student_checksums"][1]
  meta = glob.glob(str(tmp_path / "w" / "checkpoints" / "2" / "meta" / "*"))
  assert meta, os.listdir(tmp_path / "w" / "checkpoints" / "2")
  with open(meta[0]) as f:
    assert json.load(f)["data_position"] == [[0, 2]]  # p*'s iterator, two batches read


# ----------------------------------------------------------------------------- the study's kinds


def test_onpolicy_kinds_with_a_lambda():
  k = kinds.get("onpolicy_fkl@0.5")
  assert (k.name, k.objective, k.student_fraction, k.onpolicy) == ("onpolicy_fkl@0.5", "fkl",
                                                                   0.5, True)
  assert k.per_temperature and k.teacher_forwards == -1 and k.distills_tokens
  assert kinds.get("onpolicy_srkl@0").student_fraction == 0.0
  assert kinds.get("onpolicy_srkl").student_fraction == 1.0 and kinds.get("srkl").objective == "srkl"
  for bad, message in [("onpolicy_fkl@1.5", "in [0, 1)"), ("onpolicy_fkl@x", "a number"),
                       ("onpolicy_kl@0.5", "unknown kind"), ("onpolicy_fkl@0.50", "onpolicy_fkl@0.5"),
                       ("onpolicy_fkl@1", "onpolicy_fkl"), ("fkl@0.5", "unknown kind")]:
    with pytest.raises(UserError) as e:
      kinds.get(bad)
    assert message in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))
