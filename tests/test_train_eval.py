"""kdjax.llm.train.eval: validation on the first N sequences (--eval_sequences) and students
validated and selected each on its own validation set (--val_data one dir per student)."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from kdjax.llm.model import partition
from kdjax.llm.weights import loading
from kdjax import checkpoint as ckpt_lib
from kdjax import sharding
from kdjax.cli import UserError
from kdjax.llm import data as data_lib
from kdjax.llm.model import evaluate
from kdjax.llm.model import llama as model
from kdjax.llm.train import loop as train
from kdjax.llm.model.config import get_preset
from kdjax.llm.train.eval import Evaluator, update_best

CFG = get_preset("test-tiny")


def _rows(n, seed):
  return data_lib.TokenRows(data_lib.synthetic_sequences(n, CFG.vocab_size, seed, max_len=20))


def _ppl(params, rows):
  return evaluate.mean_token_loglik(CFG, params, data_lib.eval_batches(rows, 8, 24))[1]


def _evaluator(spec, mesh, val_rows, limit=0):
  pshard = partition.param_shardings(CFG, mesh, spec.num_students)
  return Evaluator(spec, mesh, pshard, val_rows, 8, 24, 0, limit)


@pytest.fixture(scope="module")
def students():
  """Two different random students, stacked [2, ...]."""
  init = jax.jit(model.init_params, static_argnums=0)
  one = [init(CFG, jax.random.key(i)) for i in range(2)]
  return one, jax.tree.map(lambda *x: np.stack(x), *one)


def test_first_n_sequences_only_and_each_student_on_its_own_set(students):
  one, stacked = students
  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  sets = [_rows(20, 0), _rows(13, 1)]                 # different sizes: the shorter one pads out
  spec = train.StepSpec(model=CFG, total_steps=1, num_students=2)
  own = _evaluator(spec, mesh, sets)(stacked)
  np.testing.assert_allclose(own, [_ppl(one[0], sets[0]), _ppl(one[1], sets[1])], rtol=1e-5)
  shared = _evaluator(spec, mesh, sets[0])(stacked)   # one set for both (as before)
  np.testing.assert_allclose(shared, [_ppl(p, sets[0]) for p in one], rtol=1e-5)
  assert abs(own[1] - shared[1]) > 1e-3 * own[1]      # student 1 really read its own set
  first = _evaluator(spec, mesh, sets, limit=9)(stacked)
  head = [data_lib.TokenRows([s.row(i) for i in range(9)]) for s in sets]
  np.testing.assert_allclose(first, [_ppl(one[i], head[i]) for i in range(2)], rtol=1e-5)
  assert abs(first[0] - own[0]) > 1e-3 * own[0]


def test_each_student_keeps_its_own_best_step():
  meta = {"best_val_perplexity": [None, None], "best_step": [None, None]}
  assert update_best(meta, [5.0, 9.0], 2) == [0, 1]
  assert update_best(meta, [6.0, 7.0], 4) == [1]      # student 0 got worse, student 1 better
  assert update_best(meta, [4.0, 8.0], 6) == [0]
  assert meta == {"best_val_perplexity": [4.0, 7.0], "best_step": [6, 4]}


def test_train_selects_each_student_on_the_first_n_of_its_own_set(tmp_path):
  dirs = {}
  for name, n, seed in (("t0", 32, 0), ("t1", 32, 1), ("v0", 24, 2), ("v1", 16, 3)):
    dirs[name] = str(tmp_path / name)
    data_lib.ShardWriter(dirs[name]).write(data_lib.synthetic_sequences(n, CFG.vocab_size, seed))
  cfg = train.TrainConfig(model="preset:test-tiny", train_data=(dirs["t0"], dirs["t1"]),
                          val_data=f"{dirs['v0']},{dirs['v1']}", eval_sequences=10, batch_size=8,
                          seq_len=24, steps=4, eval_every=2, lr=3e-3, progress=False)
  summary = train.train(cfg, str(tmp_path / "run"))
  for i, v in enumerate(("v0", "v1")):
    _, best = loading.load_model_checkpoint(os.path.join(summary["best_dir"], str(i)))
    rows = data_lib.TokenRows(data_lib.load_dataset_dir(dirs[v]))
    first = data_lib.TokenRows([rows.row(j) for j in range(10)])
    np.testing.assert_allclose(summary["best_val_perplexity"][i], _ppl(best, first), rtol=1e-5)
    assert summary["best_step"][i] in (2, 4)
  with pytest.raises(UserError, match="--eval_sequences=17: --val_data .*v1 holds only 16"):
    train.train(dataclasses.replace(cfg, eval_sequences=17), str(tmp_path / "x"))
  with pytest.raises(UserError, match="--val_data: 3 dirs for 2 student"):
    train.validate(dataclasses.replace(cfg, val_data="a,b,c"))
