"""Teacher-only tempered token-level KD (N temperatures vmapped, one shared batch, the teacher run
once per batch) and on-policy distillation (each student trains on its own samples): the target,
the vmap against one-by-one runs, the jaxpr, training, the samples, resume after SIGKILL, and the
one-line errors of preflight."""

import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kdjax import sharding
from kdjax.cli import UserError
from kdjax.llm.train import batches
from kdjax.llm.model import llama as model
from kdjax.llm.model import sampling
from kdjax.llm.train import loop as train
from kdjax.llm.model.config import LlamaConfig
from tests.helpers import TINY_MODEL as CFG
from tests.helpers import run, start

# a teacher of another width: its matmuls are told apart from the students' in a jaxpr
TCFG = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=3,
                   num_kv_heads=1, head_dim=16, rope_theta=10000.0, max_position_embeddings=512)
NAMES = ("fkl", "rkl", "jsd", "skl", "tvd")
TEMPS = (0.5, 1.0, 2.0)


def _mesh1():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _batch(seed, b=4, t=12):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 256, size=(b, t)).astype(np.int32)
  mask = np.arange(t)[None, :] < rng.integers(4, t + 1, size=b)[:, None]
  return {"input_ids": jnp.asarray(np.where(mask, ids, 0)), "attention_mask": jnp.asarray(mask)}


def _teacher(seed=1, scale=30.0):
  """A teacher with peaked next-token distributions (its embedding scaled up)."""
  p = model.init_params(TCFG, jax.random.PRNGKey(seed))
  p["embed"]["embedding"] = p["embed"]["embedding"] * scale
  return p


def _spec(n=None, objective="fkl", shared=True, lr=1e-2, **kw):
  return train.StepSpec(model=CFG, total_steps=20, lr=lr, warmup_frac=0.0, teacher=TCFG,
                        objective=objective, tempered_teacher=True, num_students=n,
                        shared_batch=shared and n is not None, **kw)


# ----------------------------------------------------------------------------- the target


def _ref_divergence(name, ps, pt):
  """Per-token divergence between target pt and student ps, float64, written out directly."""
  kl = lambda p, q: np.sum(special.xlogy(p, p) - special.xlogy(p, q), axis=-1)
  if name == "fkl":
    return kl(pt, ps)
  if name == "rkl":
    return kl(ps, pt)
  if name == "jsd":  # beta = 0.5
    m = 0.5 * pt + 0.5 * ps
    return 0.5 * kl(pt, m) + 0.5 * kl(ps, m)
  if name == "skl":  # alpha = 0.1
    return kl(pt, 0.1 * pt + 0.9 * ps)
  return 0.5 * np.sum(np.abs(pt - ps), axis=-1)


_forward = jax.jit(model.forward, static_argnums=0)


def _ref_loss(name, params, tparams, batch, temperature):
  """mean over target tokens of D(softmax(z_teacher / T), softmax(z_student)), in numpy."""
  ids, mask = batch["input_ids"], batch["attention_mask"]
  zs = np.asarray(_forward(CFG, params, ids, mask), np.float64)
  zt = np.asarray(_forward(TCFG, tparams, ids, mask), np.float64)
  _, tmask = train._next_token_targets(ids, mask)
  tmask = np.asarray(tmask)
  ps = np.exp(special.log_softmax(zs, axis=-1))
  pt = np.exp(special.log_softmax(zt / temperature, axis=-1))
  return float(np.sum(np.where(tmask, _ref_divergence(name, ps, pt), 0.0)) / tmask.sum())


def _one_fast(names, fast):
  """Every name in the whole suite; the fast tier (-m "not slow") runs only `fast` (each name is
  two or three compiles of a train step)."""
  return [n if n == fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _one_fast(NAMES, "fkl"))
def test_target_is_the_tempered_teacher_and_the_student_is_untempered(name):
  params_N = jax.vmap(lambda k: model.init_params(CFG, k))(
      jax.random.split(jax.random.PRNGKey(0), len(TEMPS)))
  tparams, batch = _teacher(scale=8.0), _batch(0)
  temps = jnp.asarray(TEMPS, jnp.float32)
  loss_N, _, count_N, _ = jax.jit(train.shared_loss_and_grads, static_argnums=3)(
      params_N, batch, tparams, _spec(len(TEMPS), name), temps)
  for i, t in enumerate(TEMPS):
    p_i = jax.tree.map(lambda x: x[i], params_N)
    want = _ref_loss(name, p_i, tparams, batch, t)
    np.testing.assert_allclose(float(loss_N[i]), want, rtol=2e-4, atol=1e-6)
    # one model, scalar temperature: the same number
    one = jax.jit(train.loss_and_grads, static_argnums=3)(p_i, batch, tparams, _spec(None, name),
                                                          jnp.float32(t))
    np.testing.assert_allclose(float(one[0]), want, rtol=2e-4, atol=1e-6)
  # the temperature really matters (T = 0.5 and T = 2 targets differ from T = 1)
  assert abs(float(loss_N[0]) - float(loss_N[1])) > 1e-2 * float(loss_N[1])
  assert abs(float(loss_N[2]) - float(loss_N[1])) > 1e-2 * float(loss_N[1])


# ----------------------------------------------------------------------------- the vmap


def test_vmapped_temperatures_equal_one_by_one_runs():
  n, steps, mesh = len(TEMPS), 3, _mesh1()
  tparams = _teacher()
  # (a small rate: Adam turns float noise in near-zero gradients into updates of size lr)
  spec_n = _spec(n, "jsd", grad_accum=2, weight_decay=0.1, lr=5e-4)
  spec_1 = _spec(None, "jsd", grad_accum=2, weight_decay=0.1, lr=5e-4)
  state, sh = train.init_state(spec_n, mesh, seed=5)
  students0 = [jax.tree.map(lambda x: np.asarray(x[i]), state["params"]) for i in range(n)]
  step_n = train.compile_train_step(spec_n, sh, sharding.batch_sharding(mesh))
  temps = jnp.asarray(TEMPS, jnp.float32)
  data = [_batch(10 + k) for k in range(steps)]   # ONE batch per step, shared by the students
  losses = []
  for batch in data:
    state, m = step_n(state, batch, tparams, temps)
    losses.append(np.asarray(m["loss"]))
  step_1 = None
  for i in range(n):
    s1, sh1 = train.init_state(spec_1, mesh, seed=5, params=students0[i])
    step_1 = step_1 or train.compile_train_step(spec_1, sh1, sharding.batch_sharding(mesh))
    for k, batch in enumerate(data):
      s1, m1 = step_1(s1, batch, tparams, jnp.float32(TEMPS[i]))
      np.testing.assert_allclose(float(m1["loss"]), losses[k][i], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(state["params"])):
      np.testing.assert_allclose(np.asarray(b)[i], np.asarray(a), rtol=1e-5, atol=5e-6)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _all_eqns(sub.jaxpr)


def _eqns_with_scan_lengths(jaxpr, lengths=()):
  """(eqn, lengths of the scans enclosing it) for every equation, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn, lengths
    inner = lengths + ((eqn.params["length"],) if eqn.primitive.name == "scan" else ())
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else (v,):
        if hasattr(sub, "eqns"):
          yield from _eqns_with_scan_lengths(sub, inner)
        elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
          yield from _eqns_with_scan_lengths(sub.jaxpr, inner)


def test_teacher_forward_runs_once_per_batch_not_per_student():
  """In the step's jaxpr the teacher's body runs once per batch and its LM head (the only matmul
  contracting its width 48 into the vocabulary) once per chunk of positions, with no student axis
  and outside the loop over the students (kdjax.llm.train.head_kd: lax.map over the N students inside
  each chunk), while every student's head is inside that loop."""
  n, mesh = 4, _mesh1()
  spec = _spec(n, "fkl")
  state, _ = train.init_state(spec, mesh, seed=0)
  b, t = 6, 12  # b != n: a student axis cannot pass for the batch
  jaxpr = jax.make_jaxpr(lambda s, x, tp, T: train.train_step(s, x, tp, spec, T))(
      state, _batch(0, b, t), _teacher(), jnp.asarray([0.5, 0.8, 1.0, 2.0], jnp.float32))
  eqns = list(_eqns_with_scan_lengths(jaxpr.jaxpr))
  head = lambda e, width: (e.primitive.name == "dot_general"
                           and any(width in v.aval.shape for v in e.invars)
                           and e.outvars[0].aval.shape[-1:] == (256,))
  teacher = [(tuple(e.outvars[0].aval.shape), lengths) for e, lengths in eqns if head(e, 48)]
  assert len(teacher) == 1, teacher
  shape, lengths = teacher[0]
  assert shape[0] == b and n not in shape and n not in lengths  # no student axis, not per student
  students = [lengths for e, lengths in eqns if head(e, 64)]
  assert students and all(n in lengths for lengths in students)  # the check sees the difference


@pytest.mark.parametrize("name", _one_fast(NAMES, "jsd"))
def test_each_objective_trains(name):
  mesh, tparams, batch = _mesh1(), _teacher(), _batch(3, 8, 12)
  spec = _spec(2, name)
  state, sh = train.init_state(spec, mesh, seed=0)
  step = train.compile_train_step(spec, sh, sharding.batch_sharding(mesh))
  temps = jnp.asarray([0.7, 1.5], jnp.float32)
  losses = []
  for _ in range(6):
    state, m = step(state, batch, tparams, temps)
    losses.append(np.asarray(m["loss"]))
  losses = np.stack(losses)
  assert np.all(np.isfinite(losses))
  assert np.all(losses[-1] < losses[0]), losses  # both students get closer to their targets


# ----------------------------------------------------------------------------- on-policy


PROMPT, MAX_NEW, EOS = (5, 17, 42), 6, 3


def test_rows_from_samples_pads_after_the_end_and_scores_no_prompt_token():
  tokens = jnp.asarray([[7, 8, 3, 0], [9, 9, 9, 9], [3, 0, 0, 0]], jnp.int32)
  lengths = jnp.asarray([3, 4, 1], jnp.int32)
  rows = batches.rows_from_samples(jnp.asarray(PROMPT, jnp.int32), tokens, lengths, pad_id=0)
  np.testing.assert_array_equal(rows["input_ids"], [[5, 17, 42, 7, 8, 3, 0],
                                                    [5, 17, 42, 9, 9, 9, 9],
                                                    [5, 17, 42, 3, 0, 0, 0]])
  np.testing.assert_array_equal(rows["attention_mask"], [[1, 1, 1, 1, 1, 1, 0], [1] * 7,
                                                         [1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["target_mask"], [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1],
                                                      [0, 0, 0, 1, 0, 0, 0]])


def test_onpolicy_batches_are_each_students_own_samples():
  n, b, seed, step, mesh = 2, 8, 4, 3, _mesh1()
  spec = _spec(n, "fkl", shared=False)
  state, sh = train.init_state(spec, mesh, seed=0)
  # less flat students (their samples are not uniform noise)
  params = jax.tree.map(np.asarray, state["params"])
  params["embed"]["embedding"] = params["embed"]["embedding"] * 3.0
  prompt = jnp.broadcast_to(jnp.asarray(PROMPT, jnp.int32), (b, len(PROMPT)))
  p_0 = jax.tree.map(lambda x: x[0], params)
  direct = lambda p, i, eos: sampling.sample(
      CFG, p, prompt, jnp.ones(prompt.shape, bool), batches.onpolicy_key(seed, step, i),
      max_new_tokens=MAX_NEW, temperature=1.0, eos_id=eos, pad_id=0)
  eos = int(direct(p_0, 0, -1).tokens_BxN[0, 1])  # an EOS that student 0's row 0 draws second
  bsh = sharding.batch_sharding(mesh, students=True)
  source = batches.OnPolicyBatches(CFG, sh["params"], bsh, seed=seed, prompt=PROMPT,
                                   streams=range(n), batch_size=b, max_new_tokens=MAX_NEW,
                                   eos_id=eos, pad_id=0)
  got = jax.device_get(source(step, params))
  assert got["input_ids"].shape == (n, b, len(PROMPT) + MAX_NEW)
  assert got["attention_mask"][0, 0].sum() <= len(PROMPT) + 2  # stopped at EOS, padded after
  for i in range(n):
    want = direct(jax.tree.map(lambda x: x[i], params), i, eos)
    rows = batches.rows_from_samples(jnp.asarray(PROMPT, jnp.int32), want.tokens_BxN,
                                     want.lengths_B, 0)
    for k in rows:
      np.testing.assert_array_equal(got[k][i], np.asarray(rows[k]), err_msg=f"student {i} {k}")
  assert not np.array_equal(got["input_ids"][0], got["input_ids"][1])
  # another step: other keys, other samples; the same step again: the same samples
  assert not np.array_equal(jax.device_get(source(step + 1, params))["input_ids"], got["input_ids"])
  np.testing.assert_array_equal(jax.device_get(source(step, params))["input_ids"], got["input_ids"])


def test_onpolicy_steps_train_on_fresh_samples():
  n, mesh = 2, _mesh1()
  spec = _spec(n, "rkl", shared=False)
  state, sh = train.init_state(spec, mesh, seed=0)
  bsh = sharding.batch_sharding(mesh, students=True)
  source = batches.OnPolicyBatches(CFG, sh["params"], bsh, seed=0, prompt=PROMPT, streams=range(n),
                                   batch_size=8, max_new_tokens=MAX_NEW, eos_id=-1, pad_id=0)
  step_fn = train.compile_train_step(spec, sh, bsh)
  tparams, temps = _teacher(), jnp.asarray([0.8, 1.2], jnp.float32)
  losses = []
  for s in range(1, 7):
    state, m = step_fn(state, source(s, state["params"]), tparams, temps)
    losses.append(np.asarray(m["loss"]))
    assert np.all(np.asarray(m["tokens"]) == 8 * MAX_NEW)  # every new token, no prompt token
  losses = np.stack(losses)
  assert np.all(np.isfinite(losses)) and np.all(losses[-1] < losses[0]), losses


# ----------------------------------------------------------------------------- train() and resume


def _cfg(tmp_path, onpolicy, **kw):
  common = dict(model="preset:test-tiny", teacher="preset:test-tiny-untied@3", objective="jsd",
                teacher_temperatures=(0.7, 1.3), batch_size=8, lr=3e-3, progress=False, seed=1)
  if onpolicy:
    common.update(onpolicy=True, prompt=PROMPT, max_new_tokens=MAX_NEW, eos_id=EOS)
  else:
    common.update(train_data=("synthetic:64",), seq_len=16)
  common.update(kw)
  return train.TrainConfig(**common)


@pytest.mark.parametrize("onpolicy", [False, True])
def test_train_runs_and_exports_each_student(tmp_path, onpolicy):
  cfg = _cfg(tmp_path, onpolicy, steps=3, val_data="synthetic:16" if onpolicy else "")
  s = train.train(cfg, str(tmp_path / "w"))
  assert s["num_students"] == 2 and s["steps"] == 3 and len(s["final_losses"]) == 2
  assert all(np.isfinite(s["final_losses"]))
  assert s["student_checksums"][0] != s["student_checksums"][1]
  assert s["tokens_per_step"] == 8 * (len(PROMPT) + MAX_NEW if onpolicy else 16) * 2
  for i in range(2):
    assert os.path.isdir(tmp_path / "w" / "best" / str(i))
  if onpolicy:
    assert len(s["best_val_perplexity"]) == 2


_SCRIPT = """
import json, sys
from kdjax.llm.train import loop as train
kw = json.loads(sys.argv[1])
for k in ("train_data", "teacher_temperatures", "prompt"):
  kw[k] = tuple(kw.get(k, ()))
train.train(train.TrainConfig(**kw), sys.argv[2])
"""


def _cmd(cfg, workdir):
  return [sys.executable, "-c", _SCRIPT, json.dumps(cfg.to_dict()), workdir]  # see helpers.run


def _summary(workdir):
  with open(os.path.join(workdir, "train_summary.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_params(tmp_path):
  """On-policy students (vmapped students, teacher, sampler stream, batch position) killed after a
  checkpoint resume to the uninterrupted run. A dataset's position: tests/test_resume.py and
  tests/test_experiments_llm.py."""
  onpolicy = True
  cfg = _cfg(tmp_path, onpolicy, steps=12, checkpoint_every=4, val_data="synthetic:16",
             eval_every=8)
  a, b = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
  r = run(_cmd(cfg, a))
  assert r.returncode == 0, r.stderr[-2000:]
  ref = _summary(a)
  proc = start(_cmd(cfg, b))
  first, deadline = os.path.join(b, "checkpoints", "4"), time.time() + 300
  while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(b, "train_summary.json"))
  r = run(_cmd(cfg, b))
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming from" in r.stdout
  got = _summary(b)
  assert 4 <= got["resumed_from_step"] < 12
  assert got["params_checksum"] == ref["params_checksum"]
  assert got["student_checksums"] == ref["student_checksums"]
  assert got["final_losses"] == ref["final_losses"]
  assert got["best_val_perplexity"] == ref["best_val_perplexity"]


# ----------------------------------------------------------------------------- preflight


BAD = [
    (dict(objective="kl"), "unknown distillation objective 'kl'"),
    (dict(teacher_temperatures=(0.8, 0.0)), "every temperature must be a number > 0"),
    (dict(teacher_temperatures=(0.8, -1.0)), "every temperature must be a number > 0"),
    (dict(teacher=""), "--teacher_temperatures needs a --teacher"),
    (dict(train_data=("synthetic:8", "synthetic:9")), "ONE shared --train_data dir, got 2"),
    (dict(kd_temperature=2.0), "leave it at 1"),
    (dict(prompt=(1, 2)), "for --onpolicy runs only"),
    (dict(onpolicy=True, train_data=(), max_new_tokens=4), "--onpolicy needs a --prompt"),
    (dict(onpolicy=True, train_data=(), prompt=(1,)), "--max_new_tokens=0 must be >= 1"),
    (dict(onpolicy=True, train_data=(), prompt=(1,), max_new_tokens=4, teacher_temperatures=()),
     "--onpolicy needs --teacher and --teacher_temperatures"),
    (dict(onpolicy=True, prompt=(1,), max_new_tokens=4), "--train_data is not used with --onpolicy"),
    (dict(onpolicy=True, train_data=(), prompt=(1,), max_new_tokens=4, steps=0, epochs=1),
     "--onpolicy needs --steps"),
    (dict(onpolicy=True, train_data=(), prompt=(1, 300), max_new_tokens=4),
     "--prompt token 300 is outside the vocabulary of 256"),
    (dict(onpolicy=True, train_data=(), prompt=(1,), max_new_tokens=4, eos_id=256),
     "--eos_id=256 is outside the vocabulary"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_preflight_one_line_errors(change, message):
  base = dict(model="preset:test-tiny", teacher="preset:test-tiny", train_data=("synthetic:8",),
              teacher_temperatures=(0.8, 1.0), steps=2, batch_size=8,
              progress=False)
  base.update(change)
  with pytest.raises(UserError) as e:
    train.preflight(train.TrainConfig(**base))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_new_fields_at_their_defaults_keep_an_older_runs_identity():
  d = train.TrainConfig(train_data=("a",), steps=1).to_dict()
  assert not {"teacher_temperatures", "onpolicy", "prompt", "max_new_tokens", "eos_id"} & set(d)
  d = train.TrainConfig(train_data=("a",), teacher="preset:test-tiny", steps=1,
                        teacher_temperatures=(0.5, 1.0)).to_dict()
  assert d["teacher_temperatures"] == [0.5, 1.0]
