"""Batched sampling from the Llama model: jitted prefill + KV-cache decode loop.

`sample(config, params, prompt_ids, prompt_mask, key, max_new_tokens=N, ...)` draws N new tokens per
row with temperature, top-k, top-p and min-p, stops each row at EOS (the EOS token is kept, the rest of the
row is `pad_id`) and returns the tokens, their count per row and their log-probabilities under the
distribution each was drawn from. One compiled function serves every temperature, top-p and min-p
value (they are traced arrays, as are eos_id and pad_id); top_k, max_new_tokens and whether top-p
and min-p are on at all are static.

Speed. Decoding does not go through the linen module but through kdjax.llm.model.decode's layout
(per-layer fused weights, built once per call, on the same layer functions as the model) and its
KV cache in blocks (decode.kv_block: 64 slots on a CPU, 128 on an accelerator). The loop is one
`lax.while_loop` per block of the cache: the loop of block j runs the steps whose new token goes to
block j, each attending over blocks 0..j only, so a step's attention reads the slots filled so far
(rounded up to a block) instead of the whole cache; each loop also ends as soon as every row has
ended (EOS), and the later ones then run no step. Tokens are drawn by inverse CDF on one uniform
per row (block sums, then a cumsum inside the chosen block of 256) instead of Gumbel-max, which
would draw one random number per vocabulary entry. Top-k / top-p / min-p set the cut tokens' logits to -inf before that draw, by
kdjax.llm.model.truncation's rule (one per-row logit threshold; ties at the boundary kept), the
function the token-level distillation targets use too; each is traced only when enabled.
`decode.decode_cost` prices a call as it runs; `decode_logits` exposes the path for parity tests.

Randomness: step i draws a [B] uniform from fold_in(key, i); with partitionable threefry the
values do not depend on how the batch is sharded. The logits do, in their last bits: each device's
program is compiled for its own rows, and XLA:CPU rounds e.g. an exp inside a fusion differently at
another shape (accelerator kernels are picked by shape too). So a row of a batch sharded along
'data' has the unsharded row's tokens until a draw falls within rounding of a boundary of the
inverse CDF (greedy: of a tie), and from there on is another sample of the same distribution
(tests/test_llm_sampling.py checks exactly this). The KV block size is of the same kind: any
kv_block gives the same logits to rounding (tests/test_decode_blocks.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm.model import decode, truncation
from kdjax.llm.model.config import LlamaConfig
# the decode path and its price, for callers of the sampler
from kdjax.llm.model.decode import KV_BLOCK, decode_cost, decode_logits, decode_params  # noqa: F401

_BLOCK = 256  # inverse-CDF block size (vocabulary entries)


class SampleOutput(NamedTuple):
  tokens_BxN: jax.Array     # int32 new tokens; after a row's EOS (kept) the rest are pad_id
  lengths_B: jax.Array      # int32 number of new tokens, EOS included
  logprobs_BxN: jax.Array   # float32 log-prob of each token under its sampling distribution; 0 after


# ----------------------------------------------------------------------------- drawing a token


def _icdf(w_BxN, u_B, n_valid=None):
  """Index i with cumsum(w)[i-1] <= u * sum(w) < cumsum(w)[i] (w >= 0, unnormalised), and sum(w)."""
  c = jnp.cumsum(w_BxN, axis=-1)
  total = c[:, -1]
  i = jnp.sum(c <= (u_B * total)[:, None], axis=-1)
  last = w_BxN.shape[-1] - 1 if n_valid is None else n_valid - 1
  return jnp.minimum(i, last), total


def _icdf_blocked(w_BxV, u_B):
  """_icdf in two levels: cumsum over block sums, then inside the chosen block only."""
  b, v = w_BxV.shape
  nb = -(-v // _BLOCK)
  w = jnp.pad(w_BxV, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
  sums_BxNb = jnp.sum(w, axis=-1)
  j, total = _icdf(sums_BxNb, u_B)
  cum = jnp.cumsum(sums_BxNb, axis=-1)
  before = jnp.take_along_axis(cum - sums_BxNb, j[:, None], axis=1)[:, 0]
  block = jnp.take_along_axis(w, j[:, None, None], axis=1)[:, 0]
  bc = jnp.cumsum(block, axis=-1)
  i = jnp.minimum(jnp.sum(bc <= (u_B * total - before)[:, None], axis=-1), _BLOCK - 1)
  return jnp.minimum(j * _BLOCK + i, v - 1), total


def draw(logits_BxV, u_B, temperature, top_p, top_k: int = 0, use_top_p: bool = False,
         min_p=0.0, use_min_p: bool = False):
  """One token per row from softmax(logits / T), truncated to top-k, the top-p nucleus and min-p.

  u_B: uniforms in [0, 1); temperature, top_p, min_p: scalars or [B] (per row); temperature <= 0
  is greedy. The truncation is kdjax.llm.model.truncation's rule (ties at a boundary kept), the
  same function the token-level targets use. Returns (token_B int32, logprob_B), the
  log-probability under the (tempered, truncated) distribution drawn from (0 for greedy).
  """
  b, v = logits_BxV.shape
  t_Bx1 = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))[:, None]
  greedy_Bx1 = t_Bx1 <= 0
  scaled = logits_BxV * (1.0 / jnp.where(greedy_Bx1, 1.0, t_Bx1))
  greedy = greedy_Bx1[:, 0]
  truncated = bool(top_k) or use_top_p or use_min_p
  if truncated:
    scaled, _ = truncation.truncate(scaled, top_k, top_p if use_top_p else None,
                                    min_p if use_min_p else None)
  m = jnp.max(scaled, axis=-1, keepdims=True)
  w = jnp.exp(scaled - m)
  tok, total = _icdf_blocked(w, u_B)
  argmax = jnp.argmax(logits_BxV, axis=-1)
  if truncated:  # u * total rounded up to total lands on a cut token (p ~ 2^-24): the top one
    tok = jnp.where(jnp.take_along_axis(w, tok[:, None], axis=1)[:, 0] > 0, tok, argmax)
  tok = jnp.where(greedy, argmax, tok)
  logp = jnp.take_along_axis(scaled - m, tok[:, None], axis=1)[:, 0] - jnp.log(total)
  return tok.astype(jnp.int32), jnp.where(greedy, 0.0, logp)


# ----------------------------------------------------------------------------- the loop


def _emit(i, logits, state, key, draw_args, eos_id, pad_id):
  """Draw step i's token (uniforms from fold_in(key, i)) into the state; rows that ended get pad."""
  tokens, logps, lengths, done = state
  u = jax.random.uniform(jax.random.fold_in(key, i), (logits.shape[0],))
  tok, logp = draw(logits, u, *draw_args)
  tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(done, pad_id, tok)[:, None], (0, i))
  logps = jax.lax.dynamic_update_slice(logps, jnp.where(done, 0.0, logp)[:, None], (0, i))
  lengths = lengths + (~done).astype(jnp.int32)
  done = done | (tok == eos_id)  # eos_id -1: never
  return tok, (tokens, logps, lengths, done)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), static_argnames=("kv_block",))
def _sample_jit(config, max_new_tokens, top_k, use_top_p, use_min_p,
                params, ids_BxP, mask_BxP, key, temperature, top_p, min_p, eos_id, pad_id,
                kv_block):
  c = config
  n = max_new_tokens
  b, p = ids_BxP.shape
  mask_BxP = mask_BxP.astype(bool)
  dp = decode_params(c, params)
  # the last token drawn is never fed back: the cache holds p + n - 1 slots
  logits, caches = decode.prefill(c, dp, ids_BxP, mask_BxP, p + n - 1, kv_block)
  nb = len(caches[0])
  key_mask = jnp.concatenate([mask_BxP, jnp.zeros((b, nb * kv_block - p), bool)], axis=1)
  n_valid = jnp.sum(mask_BxP, axis=1).astype(jnp.int32)
  emit = functools.partial(_emit, key=key, draw_args=(temperature, top_p, top_k, use_top_p, min_p,
                                                               use_min_p),
                           eos_id=eos_id, pad_id=pad_id)
  state = (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  tok, state = emit(0, logits, state)
  carry = (jnp.ones((), jnp.int32), tok, caches, key_mask, state)
  first = p // kv_block if n > 1 else nb  # step i writes slot p + i - 1: block by block
  for block in range(first, nb):
    def cond(carry, end=(block + 1) * kv_block):
      i, _, _, _, state = carry
      return (i < n) & (p + i - 1 < end) & ~jnp.all(state[3])

    def body(carry, block=block):
      i, tok, caches, key_mask, state = carry
      slot = p + i - 1
      key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), bool), (0, slot))
      logits, caches = decode.decode_step(c, dp, tok, n_valid + i - 1, slot, caches, key_mask,
                                          block)
      tok, state = emit(i, logits, state)
      return i + 1, tok, caches, key_mask, state

    carry = jax.lax.while_loop(cond, body, carry)
  tokens, logps, lengths, _ = carry[-1]
  return SampleOutput(tokens, lengths, logps)


def sample(config: LlamaConfig, params, prompt_ids_BxP, prompt_mask_BxP, key, *,
           max_new_tokens: int, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, eos_id: Optional[int] = None, pad_id: int = 0,
           kv_block: Optional[int] = None) -> SampleOutput:
  """Sample `max_new_tokens` new tokens per row after (left- or right-padded) prompts.

  temperature: traced, a scalar or one per row (<= 0 is greedy); top_k: static, 0 = off; top_p:
  traced, scalar or per row, 1.0 = off (whether it is on at all is decided here from its value, so
  full-vocabulary sampling pays nothing for it); min_p: likewise, 0.0 = off (keep tokens of
  probability >= min_p x the top token's).
  eos_id: None means config.eos_token_id; None or -1 there disables stopping. Rows are
  reproducible from `key` on the same devices; params and prompts may arrive sharded (e.g. the
  batch over 'data': the same uniforms and the same tokens up to rounding, see the module doc).
  kv_block: KV cache slots per block (kdjax.llm.model.decode): a step reads the blocks filled so
  far; any value gives the same samples up to rounding; default decode.kv_block of the default
  backend (64 on a CPU, 128 on an accelerator).
  """
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if kv_block is None:
    kv_block = decode.kv_block(jax.default_backend())
  if int(kv_block) < 1:
    raise ValueError(f"kv_block must be >= 1, got {kv_block}")
  top_k = int(top_k)
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0, got {top_k}")
  if top_k >= config.vocab_size:
    top_k = 0
  if isinstance(top_p, jax.core.Tracer):  # sample() itself traced: keep top-p on
    use_top_p = True
  else:
    top_p_host = np.asarray(top_p)
    if np.any(top_p_host <= 0) or np.any(top_p_host > 1):
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    use_top_p = bool(np.any(top_p_host < 1))
  if isinstance(min_p, jax.core.Tracer):  # likewise for min-p
    use_min_p = True
  else:
    min_p_host = np.asarray(min_p)
    if np.any(min_p_host < 0) or np.any(min_p_host > 1):
      raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    use_min_p = bool(np.any(min_p_host > 0))
  b = prompt_ids_BxP.shape[0]
  rows = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (b,))  # one shape: one compile
  if eos_id is None:
    eos_id = config.eos_token_id
  eos_id = -1 if eos_id is None or int(eos_id) < 0 else int(eos_id)
  return _sample_jit(config, int(max_new_tokens), top_k, use_top_p, use_min_p, params,
                     jnp.asarray(prompt_ids_BxP, jnp.int32), prompt_mask_BxP, key,
                     rows(temperature), rows(top_p), rows(min_p),
                     jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32),
                     kv_block=int(kv_block))
