"""LlamaConfig.attention: jax.nn.dot_product_attention against the einsum path (model.attend), in
training (loss and gradients) and against the sampler's cached decoding, and how the choice is
given (config, train_lm / the study's --attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.cli import UserError
from kdjax.llm import forward, get_preset, init_params, token_logprobs
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.model.llama import attend
from kdjax.llm.model.sampling import decode_logits

EINSUM = get_preset("test-tiny")                   # 4 heads on 2 kv heads (G = 2)
DOT = EINSUM.replace(attention="dot_product")
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def params():
  return jax.jit(init_params, static_argnums=0)(EINSUM, jax.random.key(0))


def _batch(seed, b=3, t=9):
  """Token ids and a mask with a left-padded, a full and a right-padded row."""
  ids = jax.random.randint(jax.random.key(seed), (b, t), 0, EINSUM.vocab_size)
  mask = np.ones((b, t), bool)
  mask[0, :3] = False
  mask[2, -2:] = False
  return ids, jnp.asarray(mask)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attend_dot_product_equals_einsum(heads, kv_heads):
  kq, kk, kv = jax.random.split(jax.random.key(heads * 10 + kv_heads), 3)
  b, t, s, e = 2, 5, 7, 8
  q = jax.random.normal(kq, (b, t, heads, e))
  k = jax.random.normal(kk, (b, s, kv_heads, e))
  v = jax.random.normal(kv, (b, s, kv_heads, e))
  allowed = jax.random.bernoulli(jax.random.key(3), 0.5, (b, t, s)) | jnp.eye(t, s, dtype=bool)[None]
  run = jax.jit(attend, static_argnums=4)
  np.testing.assert_allclose(run(q, k, v, allowed, "dot_product"),
                             run(q, k, v, allowed, "einsum"), **TOL)


def test_training_loss_and_gradients_match(params):
  ids, mask = _batch(1)

  def loss(config, p):
    return -jnp.mean(token_logprobs(config, p, ids, mask))

  want_loss, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(EINSUM, p)))(params)
  got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(DOT, p)))(params)
  np.testing.assert_allclose(got_loss, want_loss, **TOL)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                          jax.tree.leaves(want_grads)):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g, w, atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_sampler_decoding_matches_dot_product_forward(params):
  """The sampler's prefill + cached decode (always einsum, kdjax.llm.model.sampling) gives the
  logits of a dot_product forward over the whole sequence, left-padded prompts included."""
  ids, mask = _batch(2, t=5)
  mask = mask.at[2].set(True)                    # prompts are left-padded, never right-padded
  nxt = jax.random.randint(jax.random.key(4), (3, 2), 0, EINSUM.vocab_size)
  full_ids = jnp.concatenate([ids, nxt], axis=1)
  full_mask = jnp.concatenate([mask, jnp.ones(nxt.shape, bool)], axis=1)
  want = jax.jit(forward, static_argnums=0)(DOT, params, full_ids, full_mask)[:, 4:]
  np.testing.assert_allclose(decode_logits(EINSUM, params, ids, mask, nxt), want, **TOL)


def test_the_choice_is_checked_and_cudnn_is_not_silently_replaced():
  with pytest.raises(ValueError, match="attention='flash'"):
    LlamaConfig(attention="flash")
  q = jnp.zeros((1, 2, 2, 8), jnp.bfloat16)
  if jax.default_backend() == "cpu":  # asked for explicitly, cuDNN is used or jax raises
    with pytest.raises(Exception, match="(?i)cudnn"):
      attend(q, q, q, jnp.ones((1, 2, 2), bool), "cudnn")


def test_the_config_field_picks_the_implementation(params, monkeypatch):
  calls, real = [], jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **kw: calls.append(kw["implementation"]) or real(*a, **kw))
  ids, mask = _batch(5)
  for config, want in ((EINSUM, set()), (DOT, {None})):
    calls.clear()
    jax.eval_shape(lambda p: token_logprobs(config, p, ids, mask), params)
    assert set(calls) == want, config.attention
  calls.clear()
  with pytest.raises(Exception):  # no cuDNN on this machine; on a GPU it would run
    jax.eval_shape(lambda p: token_logprobs(EINSUM.replace(attention="cudnn"), p, ids, mask),
                   params)
  assert calls == ["cudnn"]


def test_train_lm_and_the_study_pass_the_choice_on(tmp_path):
  from kdjax.llm.study import runs
  from kdjax.llm.study.config import StudyConfig
  from kdjax.llm.train import loop as train
  cfg = train.TrainConfig(model="preset:test-tiny", train_data=("synthetic:8",), steps=1,
                          batch_size=8, attention="dot_product")
  config, *_ = train._models(cfg, None)
  assert config.attention == "dot_product"
  study = StudyConfig(attention="dot_product", eval_sequences=5)
  tc = runs.train_config(study, "preset:test-tiny", ["d"], "v", 1, 0, 8)
  assert (tc.attention, tc.eval_sequences) == ("dot_product", 5)
  for bad, msg in ((dict(attention="flash"), "--attention='flash'"),
                   (dict(attention="cudnn"), "--attention=cudnn: cuDNN flash attention needs")):
    with pytest.raises(UserError, match=msg):
      train.validate(train.TrainConfig(**{**cfg.__dict__, **bad}))
  if jax.default_backend() == "cpu":
    with pytest.raises(UserError, match="--attention=cudnn needs an NVIDIA GPU"):
      train.preflight(train.TrainConfig(**{**cfg.__dict__, "attention": "cudnn",
                                           "dtype": "bfloat16"}))
