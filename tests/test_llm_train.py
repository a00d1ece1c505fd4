"""kdjax.llm.train.loop (and evaluate): accumulation, vmapped students, schedule, KD step, summary."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.llm.weights import loading
from kdjax import checkpoint as ckpt_lib
from kdjax import sharding
from kdjax.llm import data as data_lib
from kdjax.llm.model import evaluate
from kdjax.llm.train import head_kd, head_nll
from kdjax.llm.model import llama as model
from kdjax.llm.train import loop as train
from kdjax.llm.model.config import get_preset
from kdjax.llm.model.targets import target_mask
from tests.test_train_state import reference_checksum

CFG = get_preset("test-tiny")


def _mesh1():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _batch(rng, b, t, vocab=256, min_len=3):
  """Token batch whose rows have different pad counts."""
  ids = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
  lengths = rng.integers(min_len, t + 1, size=b)
  mask = np.arange(t)[None, :] < lengths[:, None]
  return {"input_ids": jnp.asarray(np.where(mask, ids, 0)), "attention_mask": jnp.asarray(mask)}


def _spec(**kw):
  return train.StepSpec(model=CFG, total_steps=10, **kw)


@pytest.mark.parametrize("teacher", [False, True])
def test_grad_accumulation_equals_full_batch(teacher):
  params = model.init_params(CFG, jax.random.PRNGKey(0))
  tparams = model.init_params(CFG, jax.random.PRNGKey(1)) if teacher else None
  batch = _batch(np.random.default_rng(0), 8, 16)
  kw = dict(teacher=CFG, objective="jsd", kd_temperature=2.0) if teacher else {}
  f = jax.jit(train.loss_and_grads, static_argnums=3)
  loss1, nll1, count1, g1 = f(params, batch, tparams, _spec(grad_accum=1, **kw))
  loss4, nll4, count4, g4 = f(params, batch, tparams, _spec(grad_accum=4, **kw))
  assert float(count1) == float(count4) == float(np.sum(np.asarray(batch["attention_mask"])[:, 1:]))
  np.testing.assert_allclose(loss4, loss1, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nll4, nll1, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  if not teacher:  # the loss is the token-mean cross-entropy (not a mean of row means)
    logp = jax.jit(model.token_logprobs, static_argnums=0)(CFG, params, batch["input_ids"],
                                                           batch["attention_mask"])
    expected = -float(jnp.sum(logp)) / float(count1)
    np.testing.assert_allclose(float(loss1), expected, rtol=1e-5)
    np.testing.assert_allclose(float(nll1), expected, rtol=1e-5)


def test_wsd_schedule():
  f = train.wsd_schedule(1.0, 100, 0.1, 0.2)
  vals = np.array([float(f(s)) for s in range(100)])
  np.testing.assert_allclose(vals[:10], (np.arange(10) + 1) / 10, rtol=1e-6)
  np.testing.assert_allclose(vals[10:80], 1.0)
  np.testing.assert_allclose(vals[80:], (100 - np.arange(80, 100)) / 20, rtol=1e-6)
  assert float(train.wsd_schedule(2.0, 10, 0.0, 0.0)(0)) == 2.0


@pytest.mark.parametrize("lr_scales", [(), (1.0, 0.25, 3.0)])
def test_vmapped_students_equal_one_by_one(lr_scales):
  """N students in one vmapped step equal N runs one by one; with lr_scales (a learning-rate
  sweep in one program) student i equals a run at peak learning rate lr x lr_scales[i]."""
  n, steps = 3, 3
  mesh = _mesh1()
  spec_n = _spec(num_students=n, weight_decay=0.1, lr_scales=lr_scales)
  spec_1 = _spec(weight_decay=0.1)
  rng = np.random.default_rng(2)
  batches = [[_batch(rng, 4, 16) for _ in range(n)] for _ in range(steps)]
  state, sh = train.init_state(spec_n, mesh, seed=5)
  students0 = [jax.tree.map(lambda x: np.asarray(x[i]), state["params"]) for i in range(n)]
  assert not np.allclose(jax.tree.leaves(students0[0])[0], jax.tree.leaves(students0[1])[0])
  bsh = sharding.batch_sharding(mesh, students=True)
  step_n = train.compile_train_step(spec_n, sh, bsh)
  losses_n = []
  for bs in batches:
    stacked = {k: jnp.stack([b[k] for b in bs]) for k in bs[0]}
    state, m = step_n(state, stacked, None)
    losses_n.append(np.asarray(m["loss"]))
  step_1 = None
  for i in range(n):
    one = dataclasses.replace(spec_1, lr=spec_1.lr * lr_scales[i]) if lr_scales else spec_1
    s1, sh1 = train.init_state(one, mesh, seed=5, params=students0[i])
    step_1 = train.compile_train_step(one, sh1, sharding.batch_sharding(mesh))
    for k, bs in enumerate(batches):
      s1, m1 = step_1(s1, bs[i], None)
      np.testing.assert_allclose(float(m1["loss"]), losses_n[k][i], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(state["params"])):
      np.testing.assert_allclose(np.asarray(b)[i], np.asarray(a), rtol=1e-5, atol=1e-5)


def test_kd_step_runs_and_self_distillation_is_zero():
  mesh = _mesh1()
  spec = _spec(teacher=CFG, objective="fkl", kd_temperature=1.5)
  state, sh = train.init_state(spec, mesh, seed=0)
  teacher = jax.tree.map(np.asarray, state["params"])  # the student's own init: KL is zero
  step = train.compile_train_step(spec, sh, sharding.batch_sharding(mesh))
  batch = _batch(np.random.default_rng(3), 4, 16)
  state, m = step(state, batch, teacher)
  assert abs(float(m["loss"])) < 1e-6
  assert np.isfinite(float(m["nll"])) and float(m["nll"]) > 1.0
  other = model.init_params(CFG, jax.random.PRNGKey(9))
  state, m = step(state, batch, other)
  assert float(m["loss"]) > 1e-4 and np.isfinite(float(m["grad_norm"]))


def test_evaluate_is_per_token_mean(tmp_path):
  rng = np.random.default_rng(4)
  seqs = [rng.integers(0, 256, size=k).astype(np.int32) for k in (3, 9, 17, 9, 3, 17)]
  params = model.init_params(CFG, jax.random.PRNGKey(0))
  total, count = 0.0, 0
  logprobs = jax.jit(model.token_logprobs, static_argnums=0)
  for s in seqs:  # one sequence at a time, no padding at all
    total += float(jnp.sum(logprobs(CFG, params, jnp.asarray(s[None]))))
    count += len(s) - 1
  for bsz in (2, 5):
    mean, ppl = evaluate.mean_token_loglik(CFG, params, data_lib.eval_batches(seqs, bsz, 32))
    np.testing.assert_allclose(mean, total / count, rtol=1e-5)
    np.testing.assert_allclose(ppl, np.exp(-total / count), rtol=1e-5)


PROMPT_LEN = 3


def _prompted_rows(params, rng):
  """Rows of a 3-token prompt and 1 to 9 generated tokens, and their direct score: the sum of the
  log-probs of the generated tokens alone (each row run by itself, unpadded) and their number."""
  rows = [rng.integers(0, 256, size=PROMPT_LEN + k).astype(np.int32) for k in (5, 1, 9, 4)]
  total = 0.0
  for r in rows:
    logp = np.asarray(jax.nn.log_softmax(model.forward(CFG, params, jnp.asarray(r[None]))[0]))
    total += sum(float(logp[t - 1, r[t]]) for t in range(PROMPT_LEN, len(r)))
  return rows, total, sum(len(r) - PROMPT_LEN for r in rows)


def _padded(rows, width, left):
  ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):
    at = slice(width - len(r), width) if left else slice(0, len(r))
    ids[i, at], mask[i, at] = r, True
  return ids, mask


@pytest.mark.parametrize("left", [False, True])
def test_every_score_counts_the_generated_tokens_only(left):
  """token_logprobs, the training loss (plain and KD), validation and mean_token_loglik all equal a
  direct sum over the generated tokens: prompt tokens are context, pads are nothing."""
  params = model.init_params(CFG, jax.random.PRNGKey(0))
  rows, total, count = _prompted_rows(params, np.random.default_rng(8))
  ids, mask = _padded(rows, 14, left)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
           "target_mask": jnp.asarray(target_mask(mask, PROMPT_LEN))}
  lp = np.asarray(jax.jit(model.token_logprobs, static_argnums=0)(
      CFG, params, batch["input_ids"], batch["attention_mask"], batch["target_mask"]))
  assert (lp != 0).sum() == count
  np.testing.assert_allclose(lp.sum(), total, rtol=1e-5)
  for teacher in (None, params):  # KD against itself: the nll and count come from the same mask
    kw = dict(teacher=CFG, objective="fkl") if teacher else {}
    _, (nll, n) = jax.jit(train._loss_sums, static_argnums=3)(params, batch, teacher, _spec(**kw))
    assert float(n) == count
    np.testing.assert_allclose(-float(nll), total, rtol=1e-5)
  s, n = jax.jit(train._eval_sums, static_argnums=2)(params, batch, _spec())
  assert float(n) == count
  np.testing.assert_allclose(float(s), total, rtol=1e-5)
  # the data path: a dataset's prompt lengths become its batches' target masks
  rows = data_lib.TokenRows(rows, prompt_lens=[PROMPT_LEN] * len(rows))
  mean, _ = evaluate.mean_token_loglik(CFG, params, data_lib.eval_batches(rows, 3, 14))
  np.testing.assert_allclose(mean, total / count, rtol=1e-5)


def test_train_summary_checksum_and_determinism(tmp_path):
  cfg = train.TrainConfig(model="preset:test-tiny", train_data=("synthetic:48",), batch_size=8,
                          seq_len=24, steps=3, progress=False, checkpoint_every=2)
  s1 = train.train(cfg, str(tmp_path / "a"))
  saved = json.loads((tmp_path / "a" / "train_summary.json").read_text())
  assert saved["params_checksum"] == s1["params_checksum"] and saved["steps"] == 3
  assert np.isfinite(saved["final_loss"])
  # the summary's checksum is the fingerprint of the final (= exported) params
  # (kdjax.llm.train.state; its definition: tests/test_train_state.py's numpy reference)
  config, params = loading.load_model_checkpoint(str(tmp_path / "a" / "best"))
  assert reference_checksum(params) == s1["params_checksum"]
  assert config == CFG
  s2 = train.train(cfg, str(tmp_path / "b"))  # same flags, another workdir: identical
  assert s2["params_checksum"] == s1["params_checksum"]
  assert s2["final_loss"] == s1["final_loss"]


def test_tied_lm_head_gradient_matches_autodiff():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)).astype(np.float32))
  e = jnp.asarray(rng.normal(size=(11, 8)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(2, 3, 11)).astype(np.float32))
  ours = jax.grad(lambda x, e: jnp.sum(w * model.tied_lm_head(x, e)), argnums=(0, 1))(x, e)
  ref = jax.grad(lambda x, e: jnp.sum(w * jnp.dot(x, e.T)), argnums=(0, 1))(x, e)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _unfused_nll_sum(x, w, y, wt, layout):
  logits = jnp.einsum("btd,vd->btv" if layout == "vd" else "btd,dv->btv", x, w)
  return jnp.sum(wt * train._token_nll(logits, y))


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("shape", [(3, 10), (2, 7)])  # chunked along positions; 7 is prime
@pytest.mark.parametrize("rows", [6, 1 << 20])  # several chunks at these tiny shapes; one
def test_fused_head_nll_matches_autodiff_of_the_unfused_loss(layout, shape, rows):
  b, t = shape
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(b, t, 8)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(37, 8) if layout == "vd" else (8, 37)).astype(np.float32))
  y = jnp.asarray(rng.integers(0, 37, size=(b, t)).astype(np.int32))
  wt = jnp.asarray((rng.uniform(size=(b, t)) > 0.3).astype(np.float32))
  assert (head_nll._chunk_len(b, t, rows) < t) == (rows == 6)
  fused = lambda x, w: head_nll.head_nll_sum(x, w, y, wt, layout, rows)
  ref = lambda x, w: _unfused_nll_sum(x, w, y, wt, layout)
  np.testing.assert_allclose(float(fused(x, w)), float(ref(x, w)), rtol=1e-6)
  # a non-unit cotangent: the forward pass forms gradients for 1, the backward pass scales them
  ours = jax.jit(jax.grad(lambda x, w: 2.5 * fused(x, w), argnums=(0, 1)))(x, w)
  want = jax.grad(lambda x, w: 2.5 * ref(x, w), argnums=(0, 1))(x, w)
  for a, r in zip(ours, want):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
  # vmapped (the students' path) equals one by one
  xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
  batched = jax.vmap(jax.grad(fused, argnums=1))(xs, ws)
  np.testing.assert_allclose(batched[1], jax.grad(fused, argnums=1)(2 * x, -w), rtol=1e-5,
                             atol=1e-6)


def test_chunk_rows_by_platform():
  """CPU keeps the measured cache-sized chunks; an accelerator at least D rows per chunk (the
  dW accumulation's traffic per chunk no larger than the chunk's logits), and the train step
  takes the platform of the mesh it is compiled for."""
  assert head_nll.chunk_rows("cpu", 2048) == head_nll.CHUNK_ROWS
  assert head_nll.chunk_rows("tpu", 2048) == 2048 and head_nll.chunk_rows("gpu", 64) == 256
  assert head_kd.chunk_rows("cpu", 960) == head_kd.CHUNK_ROWS and head_kd.chunk_rows("tpu", 960) == 960


def test_training_loss_is_the_unfused_cross_entropy():
  """The train step's loss (fused head) equals the model's logits put through the plain loss."""
  config = get_preset("test-tiny")
  params = model.init_params(config, jax.random.PRNGKey(0))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 9)), jnp.int32)
  mask = jnp.ones_like(ids, bool).at[1, 6:].set(False)
  spec = train.StepSpec(model=config, total_steps=10, lr=1e-3, warmup_frac=0.0)
  loss, (nll, count) = train._loss_sums(params, {"input_ids": ids, "attention_mask": mask}, None,
                                        spec)
  logits = model.forward(config, params, ids, mask)
  targets, tmask = train._next_token_targets(ids, mask)
  want = jnp.sum(jnp.where(tmask, train._token_nll(logits, targets), 0.0))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  assert float(count) == float(jnp.sum(tmask))


def test_swiglu_gradient_matches_autodiff():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)).astype(np.float32))
  wg, wu = (jnp.asarray(rng.normal(size=(8, 12)).astype(np.float32)) for _ in range(2))
  wd = jnp.asarray(rng.normal(size=(12, 8)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(2, 5, 8)).astype(np.float32))

  def plain(x, wg, wu, wd):
    return jnp.einsum("btf,fd->btd", jax.nn.silu(x @ wg) * (x @ wu), wd)

  np.testing.assert_allclose(model.swiglu(x, wg, wu, wd), plain(x, wg, wu, wd), rtol=1e-6)
  ours = jax.jit(jax.grad(lambda *a: jnp.sum(w * model.swiglu(*a)), argnums=(0, 1, 2, 3)))(
      x, wg, wu, wd)
  ref = jax.grad(lambda *a: jnp.sum(w * plain(*a)), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
