"""The Flax Llama: rotary, preset sizes, causal and padding masks, token-by-token decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.llm import get_preset, init_params, target_mask
from kdjax.llm import forward as _forward, token_logprobs as _token_logprobs
from kdjax.llm.model.llama import rotary
from kdjax.llm.model.sampling import decode_logits

forward = jax.jit(_forward, static_argnums=0)
token_logprobs = jax.jit(_token_logprobs, static_argnums=0)
init = jax.jit(init_params, static_argnums=0)


def _rotary_reference(x_TxNxE: np.ndarray, positions_T: np.ndarray, theta: float) -> np.ndarray:
  """Element by element: dims (i, i + E/2) rotate by angle pos * theta^(-2i/E) (HF rotate-half)."""
  t, n, e = x_TxNxE.shape
  out = np.empty_like(x_TxNxE, dtype=np.float64)
  for ti in range(t):
    for i in range(e // 2):
      a = positions_T[ti] * theta ** (-2.0 * i / e)
      x1, x2 = x_TxNxE[ti, :, i], x_TxNxE[ti, :, i + e // 2]
      out[ti, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
      out[ti, :, i + e // 2] = x2 * np.cos(a) + x1 * np.sin(a)
  return out


def test_rotary_matches_formula():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 3, 8)).astype(np.float32)
  pos = np.array([[0, 1, 2, 7, 30, 500]])
  got = np.asarray(rotary(jnp.asarray(x), jnp.asarray(pos), 10000.0))
  np.testing.assert_allclose(got[0], _rotary_reference(x[0], pos[0], 10000.0), atol=2e-5)
  np.testing.assert_array_equal(got[0, 0], x[0, 0])  # position 0 is the identity


def test_rotary_scores_depend_only_on_offset():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)).astype(np.float32))
  score = lambda m, n: float(jnp.sum(rotary(q, jnp.array([[m]]), 100.0)
                                     * rotary(k, jnp.array([[n]]), 100.0)))
  assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


@pytest.mark.parametrize("name,millions", [("smollm2-135m", 134.5), ("smollm2-360m", 361.8),
                                           ("smollm2-1.7b", 1711.4)])
def test_preset_parameter_counts(name, millions):
  config = get_preset(name)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert abs(count / 1e6 - millions) < 0.05
  assert count == config.num_params()


@pytest.fixture(scope="module")
def tiny():
  config = get_preset("test-tiny")
  return config, init(config, jax.random.key(0))


def test_param_tree_layout(tiny):
  config, params = tiny
  c = config
  assert params["layers"]["attn"]["q"]["kernel"].shape == (c.num_layers, c.hidden_size,
                                                          c.num_heads, c.head_dim)
  assert params["layers"]["attn"]["o"]["kernel"].shape == (c.num_layers, c.num_heads, c.head_dim,
                                                          c.hidden_size)
  assert "lm_head" not in params
  untied = get_preset("test-tiny-untied")
  assert init(untied, jax.random.key(0))["lm_head"]["kernel"].shape == (64, 256)


def test_causal(tiny):
  config, params = tiny
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)
  changed = ids.at[:, 6].set((ids[:, 6] + 1) % config.vocab_size)
  a, b = forward(config, params, ids), forward(config, params, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :6]), np.asarray(b[:, :6]))
  assert np.abs(np.asarray(a[:, 6:] - b[:, 6:])).max() > 1e-4


def test_left_padding_matches_unpadded(tiny):
  config, params = tiny
  short = jax.random.randint(jax.random.key(2), (1, 5), 0, config.vocab_size)
  other = jax.random.randint(jax.random.key(3), (1, 8), 0, config.vocab_size)
  padded = jnp.concatenate([jnp.full((1, 3), 7, short.dtype), short], axis=1)
  batch = jnp.concatenate([padded, other], axis=0)
  mask = jnp.array([[0] * 3 + [1] * 5, [1] * 8], bool)
  logits = forward(config, params, batch, mask)
  alone = forward(config, params, short)
  np.testing.assert_allclose(np.asarray(logits[0, 3:]), np.asarray(alone[0]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(forward(config, params, other)[0]),
                             atol=1e-5)
  lp = np.asarray(token_logprobs(config, params, batch, mask))
  assert lp.shape == (2, 7)
  # position 2 predicts the first real token from a pad: not a target, like the pads themselves
  np.testing.assert_array_equal(lp[0, :3], 0.0)
  np.testing.assert_allclose(lp[0, 3:], np.asarray(token_logprobs(config, params, short)[0]),
                             atol=1e-5)
  assert (lp[0] != 0).sum() == 4 and (lp[1] != 0).sum() == 7  # the unpadded rows' target counts
  np.testing.assert_array_equal(target_mask(mask)[:, 1:].sum(axis=1), [4, 7])


def test_target_mask_is_the_generated_tokens():
  """Targets: real tokens after the prompt whose predecessor is real (kdjax.llm.model.targets)."""
  mask = np.array([[1, 1, 1, 1, 1, 0],    # right padded
                   [0, 0, 1, 1, 1, 1],    # left padded
                   [1, 1, 0, 1, 1, 1],    # a hole: token 3 would be predicted from a pad
                   [1, 1, 1, 0, 0, 0]], bool)
  want = np.array([[0, 0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0, 1],
                   [0, 1, 0, 0, 1, 1],
                   [0, 0, 0, 0, 0, 0]], bool)  # prompt only: nothing to score
  prompt_len = np.array([3, 3, 1, 3])
  np.testing.assert_array_equal(target_mask(mask, prompt_len), want)
  np.testing.assert_array_equal(np.asarray(target_mask(jnp.asarray(mask), prompt_len)), want)
  # no prompt length: the first real token is the only context; 0 counts as 1
  np.testing.assert_array_equal(target_mask(mask), target_mask(mask, 0))
  np.testing.assert_array_equal(target_mask(mask)[:2], [[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])


def test_no_position_depends_on_later_tokens(tiny):
  """Pads' outputs too: a left pad's query has no real key before it and must not fall back on
  attending to the whole row (later tokens included)."""
  config, params = tiny
  ids = jax.random.randint(jax.random.key(6), (2, 8), 0, config.vocab_size)
  mask = jnp.ones((2, 8), bool).at[0, :3].set(False).at[1, 6:].set(False)  # left, right padded
  changed = ids.at[:, 5].set((ids[:, 5] + 1) % config.vocab_size)
  a, b = forward(config, params, ids, mask), forward(config, params, changed, mask)
  np.testing.assert_array_equal(np.asarray(a[:, :5]), np.asarray(b[:, :5]))
  assert np.abs(np.asarray(a[:, 5] - b[:, 5])).max() > 1e-4


@pytest.mark.parametrize("preset", ["test-tiny", "test-tiny-untied"])
def test_token_by_token_decoding_equals_full_forward(preset):
  """The sampler's decode path (prefill, then one token per step into its KV cache; the same layer
  functions on fused per-layer weights) gives the full forward's logits at every decoded position."""
  config = get_preset(preset)
  params = init(config, jax.random.key(4))
  ids = jax.random.randint(jax.random.key(5), (2, 10), 0, config.vocab_size)
  mask = jnp.ones((2, 10), bool).at[0, :2].set(False)  # row 0 left-padded by two
  full = forward(config, params, ids, mask)
  decoded = decode_logits(config, params, ids[:, :4], mask[:, :4], ids[:, 4:])
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(full[:, 3:]), atol=1e-5)
