"""Batched sampling from the Llama model: jitted prefill + KV-cache decode loop.

`sample(config, params, prompt_ids, prompt_mask, key, max_new_tokens=N, ...)` draws N new tokens per
row with temperature, top-k and top-p, stops each row at EOS (the EOS token is kept, the rest of the
row is `pad_id`) and returns the tokens, their count per row and their log-probabilities under the
distribution each was drawn from. One compiled function serves every temperature and top-p value
(they are traced arrays, as are eos_id and pad_id); top_k, max_new_tokens and whether top-p is on
at all are static.

Speed. Decoding does not go through the linen module: the canonical parameters are rearranged once
per call, outside the loop, into a decode layout (per-layer arrays, fused q|k|v and gate|up
kernels), and one `lax.while_loop` runs every step with the KV cache as loop carry (one
[B, K, S, E] buffer per layer, written in place). Layers are a Python loop inside the step: no
per-iteration dynamic slicing of stacked weights. The tied embedding serves as the LM head as is
(contracting its last axis costs no transpose). Tokens are drawn by inverse CDF on one uniform per
row (block sums, then a cumsum inside the chosen block of 256) instead of Gumbel-max, which would
draw one random number per vocabulary entry. Top-k / top-p work on a sorted candidate list and are
traced only when enabled. `decode_logits` exposes the same path for the parity test.

Randomness: step i draws a [B] uniform from fold_in(key, i); with partitionable threefry the
values do not depend on how the batch is sharded. The logits do, in their last bits: each device's
program is compiled for its own rows, and XLA:CPU rounds e.g. an exp inside a fusion differently at
another shape (accelerator kernels are picked by shape too). So a row of a batch sharded along
'data' has the unsharded row's tokens until a draw falls within rounding of a boundary of the
inverse CDF (greedy: of a tie), and from there on is another sample of the same distribution
(tests/test_llm_sampling.py checks exactly this).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.llm.model import llama as model
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.model.layers import attend_grouped, glu, lm_head, rms_norm, rope_tables, rotate

_BLOCK = 256  # inverse-CDF block size (vocabulary entries)


class SampleOutput(NamedTuple):
  tokens_BxN: jax.Array     # int32 new tokens; after a row's EOS (kept) the rest are pad_id
  lengths_B: jax.Array      # int32 number of new tokens, EOS included
  logprobs_BxN: jax.Array   # float32 log-prob of each token under its sampling distribution; 0 after


# ----------------------------------------------------------------------------- decode layout


def decode_params(config: LlamaConfig, params) -> dict:
  """The canonical parameter tree rearranged for decoding (per layer, fused kernels, compute dtype)."""
  c = config
  params = nn.meta.unbox(params)
  dt = c.compute_dtype
  d, h, k, e = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  lay = params["layers"]
  layers = []
  for i in range(c.num_layers):
    qkv = jnp.concatenate([lay["attn"]["q"]["kernel"][i].reshape(d, h * e),
                           lay["attn"]["k"]["kernel"][i].reshape(d, k * e),
                           lay["attn"]["v"]["kernel"][i].reshape(d, k * e)], axis=1)
    gate_up = jnp.concatenate([lay["mlp"]["gate"]["kernel"][i], lay["mlp"]["up"]["kernel"][i]], axis=1)
    layers.append(dict(attn_norm=lay["attn_norm"]["scale"][i], qkv=qkv.astype(dt),
                       o=lay["attn"]["o"]["kernel"][i].reshape(h * e, d).astype(dt),
                       mlp_norm=lay["mlp_norm"]["scale"][i], gate_up=gate_up.astype(dt),
                       down=lay["mlp"]["down"]["kernel"][i].astype(dt)))
  return dict(embed_VxD=params["embed"]["embedding"].astype(dt), layers=layers,
              final_norm=params["final_norm"]["scale"], head=model.head_weight(c, params)[0])


def _head(config, dp, x_BxD):
  x = rms_norm(x_BxD, dp["final_norm"], config.rms_norm_eps, config.compute_dtype)
  return lm_head(x, dp["head"], "vd" if config.tie_embeddings else "dv")


def _mlp(config, lp, x):
  """x + the SwiGLU MLP of its norm, on the fused gate|up kernel."""
  c = config
  gu = jnp.dot(rms_norm(x, lp["mlp_norm"], c.rms_norm_eps, c.compute_dtype), lp["gate_up"])
  f = c.intermediate_size
  return x + jnp.dot(glu(gu[..., :f], gu[..., f:]), lp["down"]).astype(x.dtype)


def _qkv(config, lp, x, cos, sin):
  """Fused projection of x's norm -> rotated q [.., H, E], rotated k [.., K, E], v [.., K, E]."""
  c = config
  h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
  qkv = jnp.dot(rms_norm(x, lp["attn_norm"], c.rms_norm_eps, c.compute_dtype), lp["qkv"])
  qk = rotate(qkv[..., : (h + k) * e].reshape(*x.shape[:-1], h + k, e), cos, sin)
  v = qkv[..., (h + k) * e:].reshape(*x.shape[:-1], k, e)
  return qk[..., :h, :], qk[..., h:, :], v


def _prefill(config, dp, ids_BxP, mask_BxP, cache_len):
  """Run the prompt; returns logits [B, V] after each row's last real token and the per-layer caches."""
  c = config
  b, p = ids_BxP.shape
  h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
  cos, sin = rope_tables(model.default_positions(mask_BxP), e, c.rope_theta)  # [B, P, 1, E/2]
  allowed_BxPxP = model.allowed_keys(mask_BxP)  # as the model: the same masks
  x = dp["embed_VxD"][ids_BxP]
  caches = []
  for lp in dp["layers"]:
    q, kk, v = _qkv(c, lp, x, cos, sin)
    kk, v = kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)       # [B, K, P, E]
    q = q.reshape(b, p, k, h // k, e).transpose(0, 2, 3, 1, 4)      # [B, K, G, P, E]
    a = attend_grouped(q, [kk], [v], allowed_BxPxP).transpose(0, 3, 1, 2, 4)
    x = x + jnp.dot(a.reshape(b, p, h * e), lp["o"]).astype(x.dtype)
    x = _mlp(c, lp, x)
    pad = ((0, 0), (0, 0), (0, cache_len - p), (0, 0))
    caches.append((jnp.pad(kk, pad), jnp.pad(v, pad)))
  last_B = p - 1 - jnp.argmax(mask_BxP[:, ::-1], axis=1)
  x_last = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
  return _head(c, dp, x_last), caches


def _decode_step(config, dp, tok_B, pos_B, slot, caches, key_mask_BxS):
  """One token per row at cache slot `slot` (key_mask must already include it) -> logits, caches."""
  c = config
  b = tok_B.shape[0]
  h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
  cos, sin = rope_tables(pos_B, e, c.rope_theta)              # [B, 1, E/2]
  x = dp["embed_VxD"][tok_B]
  new_caches = []
  for lp, (ck, cv) in zip(dp["layers"], caches):
    q, kk, v = _qkv(c, lp, x, cos, sin)
    ck = jax.lax.dynamic_update_slice(ck, kk[:, :, None, :].astype(ck.dtype), (0, 0, slot, 0))
    cv = jax.lax.dynamic_update_slice(cv, v[:, :, None, :].astype(cv.dtype), (0, 0, slot, 0))
    a = attend_grouped(q.reshape(b, k, h // k, 1, e), [ck], [cv], key_mask_BxS[:, None, :])
    x = x + jnp.dot(a.reshape(b, h * e), lp["o"]).astype(x.dtype)
    x = _mlp(c, lp, x)
    new_caches.append((ck, cv))
  return _head(c, dp, x), new_caches


@functools.partial(jax.jit, static_argnums=0)
def decode_logits(config: LlamaConfig, params, prompt_ids_BxP, prompt_mask_BxP, next_ids_BxT):
  """Logits of the fast path, teacher-forced: [B, 1+T, V] after the prompt and after each next id.

  For tests: must equal `model.forward` on the concatenated sequence at the same positions.
  """
  dp = decode_params(config, params)
  b, p = prompt_ids_BxP.shape
  t = next_ids_BxT.shape[1]
  mask = prompt_mask_BxP.astype(bool)
  logits, caches = _prefill(config, dp, prompt_ids_BxP, mask, p + t)
  key_mask = jnp.concatenate([mask, jnp.zeros((b, t), bool)], axis=1)
  n_valid = jnp.sum(mask, axis=1).astype(jnp.int32)
  out = [logits]
  for i in range(t):
    key_mask = key_mask.at[:, p + i].set(True)
    logits, caches = _decode_step(config, dp, next_ids_BxT[:, i], n_valid + i, p + i, caches, key_mask)
    out.append(logits)
  return jnp.stack(out, axis=1)


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


def draw(logits_BxV, u_B, temperature, top_p, top_k: int = 0, use_top_p: bool = False):
  """One token per row from softmax(logits / T), restricted to the top-k and the top-p nucleus.

  u_B: uniforms in [0, 1); temperature, top_p: scalars or [B] (per row); temperature <= 0 is
  greedy. Returns (token_B int32, logprob_B), the log-probability under the (tempered, truncated)
  distribution drawn from (0 for greedy).
  """
  b, v = logits_BxV.shape
  t_Bx1 = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))[:, None]
  greedy_Bx1 = t_Bx1 <= 0
  scaled = logits_BxV * (1.0 / jnp.where(greedy_Bx1, 1.0, t_Bx1))
  greedy = greedy_Bx1[:, 0]
  if top_k or use_top_p:  # candidates in descending order, then inverse CDF over the kept prefix
    vals_BxC, idx_BxC = jax.lax.top_k(scaled, top_k if top_k else v)
    w = jnp.exp(vals_BxC - vals_BxC[:, :1])
    n_keep = jnp.full((b,), w.shape[1], jnp.int32)
    if use_top_p:
      cum = jnp.cumsum(w, axis=-1)
      before = (cum - w) / cum[:, -1:]
      p_Bx1 = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))[:, None]
      n_keep = jnp.sum(before < p_Bx1, axis=-1).astype(jnp.int32)  # >= 1: before[0] == 0
      w = jnp.where(jnp.arange(w.shape[1])[None, :] < n_keep[:, None], w, 0.0)
    pick, total = _icdf(w, u_B, n_keep)
    pick = jnp.where(greedy, 0, pick)
    tok = jnp.take_along_axis(idx_BxC, pick[:, None], axis=1)[:, 0]
    logp = jnp.log(jnp.take_along_axis(w, pick[:, None], axis=1)[:, 0]) - jnp.log(total)
  else:
    m = jnp.max(scaled, axis=-1, keepdims=True)
    w = jnp.exp(scaled - m)
    tok, total = _icdf_blocked(w, u_B)
    tok = jnp.where(greedy, jnp.argmax(logits_BxV, axis=-1), tok)
    logp = jnp.take_along_axis(scaled - m, tok[:, None], axis=1)[:, 0] - jnp.log(total)
  return tok.astype(jnp.int32), jnp.where(greedy, 0.0, logp)


# ----------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _sample_jit(config, max_new_tokens, top_k, use_top_p,
                params, ids_BxP, mask_BxP, key, temperature, top_p, eos_id, pad_id):
  c = config
  n = max_new_tokens
  b, p = ids_BxP.shape
  mask_BxP = mask_BxP.astype(bool)
  dp = decode_params(c, params)
  logits, caches = _prefill(c, dp, ids_BxP, mask_BxP, p + n)
  key_mask = jnp.concatenate([mask_BxP, jnp.zeros((b, n), bool)], axis=1)
  n_valid = jnp.sum(mask_BxP, axis=1).astype(jnp.int32)

  def emit(i, logits, state):
    tokens, logps, lengths, done = state
    u = jax.random.uniform(jax.random.fold_in(key, i), (b,))
    tok, logp = draw(logits, u, temperature, top_p, top_k, use_top_p)
    tokens = jax.lax.dynamic_update_slice(tokens, jnp.where(done, pad_id, tok)[:, None], (0, i))
    logps = jax.lax.dynamic_update_slice(logps, jnp.where(done, 0.0, logp)[:, None], (0, i))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | (tok == eos_id)  # eos_id -1: never
    return tok, (tokens, logps, lengths, done)

  state = (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  tok, state = emit(0, logits, state)

  def cond(carry):
    i, _, _, _, state = carry
    return (i < n) & ~jnp.all(state[3])

  def body(carry):
    i, tok, caches, key_mask, state = carry
    slot = p + i - 1
    key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), bool), (0, slot))
    logits, caches = _decode_step(c, dp, tok, n_valid + i - 1, slot, caches, key_mask)
    tok, state = emit(i, logits, state)
    return i + 1, tok, caches, key_mask, state

  carry = (jnp.ones((), jnp.int32), tok, caches, key_mask, state)
  *_, (tokens, logps, lengths, _) = jax.lax.while_loop(cond, body, carry)
  return SampleOutput(tokens, lengths, logps)


def sample(config: LlamaConfig, params, prompt_ids_BxP, prompt_mask_BxP, key, *,
           max_new_tokens: int, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: Optional[int] = None, pad_id: int = 0) -> SampleOutput:
  """Sample `max_new_tokens` new tokens per row after (left- or right-padded) prompts.

  temperature: traced, a scalar or one per row (<= 0 is greedy); top_k: static, 0 = off; top_p:
  traced, scalar or per row, 1.0 = off (whether it is on at all is decided here from its value, so
  full-vocabulary sampling pays nothing for it).
  eos_id: None means config.eos_token_id; None or -1 there disables stopping. Rows are
  reproducible from `key` on the same devices; params and prompts may arrive sharded (e.g. the
  batch over 'data': the same uniforms and the same tokens up to rounding, see the module doc).
  """
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
  b = prompt_ids_BxP.shape[0]
  rows = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), (b,))  # one shape: one compile
  if eos_id is None:
    eos_id = config.eos_token_id
  eos_id = -1 if eos_id is None or int(eos_id) < 0 else int(eos_id)
  return _sample_jit(config, int(max_new_tokens), top_k, use_top_p, params,
                     jnp.asarray(prompt_ids_BxP, jnp.int32), prompt_mask_BxP, key,
                     rows(temperature), rows(top_p),
                     jnp.asarray(eos_id, jnp.int32), jnp.asarray(pad_id, jnp.int32))
