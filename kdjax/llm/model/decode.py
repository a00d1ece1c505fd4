"""The sampler's decode layout: a prefill and one-token steps over a KV cache in blocks, and their cost.

Layout. The canonical parameters are rearranged once per sampling call into per-layer arrays with
fused q|k|v and gate|up kernels in the compute dtype (`decode_params`): layers are a Python loop
inside the step, so no step slices stacked weights; every kernel is stored output-major [N, K] (the
dot x @ W^T streams W about twice as fast on XLA:CPU at a few rows), and the tied embedding serves
as the LM head as is. The math on those arrays is kdjax.llm.model.layers', the functions the Flax
model calls (rms_norm, rotate, attend_grouped, glu, lm_head): only the fused projections are laid
out here.

KV cache in blocks. Each layer's cache is a list of blocks (K, V) of KV_BLOCK slots, [B, K, KV_BLOCK,
E] each, covering the prompt and every new token but the last (which is drawn, never fed back). A
step whose new token goes to slot s writes block s // KV_BLOCK and attends over blocks 0 .. s //
KV_BLOCK only (`attend_grouped` takes the blocks as they lie: one dot per block, one softmax over
their scores): its attention reads the slots filled so far rounded up to a block, not the whole
cache. The block index is static, so the sampler runs one compiled loop per block
(kdjax.llm.model.sampling); every block count gives the same logits to float rounding (the
softmax's sums run in another order), a single block exactly the full-cache attention.

`decode_cost` prices a sampling call exactly as it runs (FLOPs, bytes), for the study's plan.
`decode_logits` is the same path teacher-forced, for parity tests against model.forward.

Shapes in names: B batch, P prompt length, S slots, D hidden, H heads, K kv heads, E head_dim,
G = H // K, F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.llm.model import llama as model
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.model.layers import attend_grouped, glu, lm_head, rms_norm, rope_tables, rotate

KV_BLOCK = 128  # KV cache slots per block on an accelerator: a step reads the blocks filled so far
CPU_KV_BLOCK = 64  # and on a CPU


def kv_block(platform: str) -> int:
  """KV cache slots per block for a program compiled for `platform`. On an accelerator 128, a
  matrix unit's tile (a v5p MXU is 128 wide): a smaller block would feed it half-empty tiles. On a
  CPU the step's attention dots cost by the slots they read, a block less per dot: 64 reads fewer
  empty slots (SmolLM2-135M, 16 rows, 512 new tokens: 143.6 vs 137.1 tokens/s here, median of 3
  interleaved calls) at twice the compiled loops (compile 43 s vs 15 s)."""
  return CPU_KV_BLOCK if platform == "cpu" else KV_BLOCK


def _rows(w_KxN: jax.Array, dtype) -> jax.Array:
  """A kernel [K, N] stored output-major [N, K] in `dtype`. XLA:CPU's dot runs a few-row x @ W^T
  with W [N, K] at about twice the bandwidth of x @ W with W [K, N] once W is larger than the
  caches (16 rows x a 512 MB kernel: 11.1 vs 4.8 GB/s here), and decoding is those dots. The
  barrier keeps the simplifier from folding the transpose back into the dots that read it."""
  return jax.lax.optimization_barrier(w_KxN.T.astype(dtype))


def _dot_rows(x_xK: jax.Array, w_NxK: jax.Array) -> jax.Array:
  """x @ W for W stored output-major (`_rows`): [..., K] x [N, K] -> [..., N]."""
  return jnp.einsum("...k,nk->...n", x_xK, w_NxK)


def decode_params(config: LlamaConfig, params) -> dict:
  """The canonical parameter tree rearranged for decoding: per layer, fused q|k|v and gate|up
  kernels, every kernel output-major ([N, K], `_rows`) in the compute dtype, the LM head [V, D]."""
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
    layers.append(dict(attn_norm=lay["attn_norm"]["scale"][i], qkv=_rows(qkv, dt),
                       o=_rows(lay["attn"]["o"]["kernel"][i].reshape(h * e, d), dt),
                       mlp_norm=lay["mlp_norm"]["scale"][i], gate_up=_rows(gate_up, dt),
                       down=_rows(lay["mlp"]["down"]["kernel"][i], dt)))
  head, layout = model.head_weight(c, params)
  return dict(embed_VxD=params["embed"]["embedding"].astype(dt), layers=layers,
              final_norm=params["final_norm"]["scale"],
              head_VxD=head if layout == "vd" else _rows(head, dt))


def _head(config, dp, x_BxD):
  x = rms_norm(x_BxD, dp["final_norm"], config.rms_norm_eps, config.compute_dtype)
  return lm_head(x, dp["head_VxD"], "vd")


def _mlp(config, lp, x):
  """x + the SwiGLU MLP of its norm, on the fused gate|up kernel."""
  c = config
  gu = _dot_rows(rms_norm(x, lp["mlp_norm"], c.rms_norm_eps, c.compute_dtype), lp["gate_up"])
  f = c.intermediate_size
  return x + _dot_rows(glu(gu[..., :f], gu[..., f:]), lp["down"]).astype(x.dtype)


def _qkv(config, lp, x, cos, sin):
  """Fused projection of x's norm -> rotated q [.., H, E], rotated k [.., K, E], v [.., K, E]."""
  c = config
  h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
  qkv = _dot_rows(rms_norm(x, lp["attn_norm"], c.rms_norm_eps, c.compute_dtype), lp["qkv"])
  qk = rotate(qkv[..., : (h + k) * e].reshape(*x.shape[:-1], h + k, e), cos, sin)
  v = qkv[..., (h + k) * e:].reshape(*x.shape[:-1], k, e)
  return qk[..., :h, :], qk[..., h:, :], v


def num_blocks(slots: int, kv_block: int = KV_BLOCK) -> int:
  """Blocks of a cache holding `slots` slots (at least one)."""
  return max(1, -(-slots // kv_block))


def prefill(config, dp, ids_BxP, mask_BxP, slots: int, kv_block: int = KV_BLOCK):
  """Run the prompt: logits [B, V] after each row's last real token, and per layer a cache of
  num_blocks(max(slots, P)) blocks [(K, V) [B, K, kv_block, E]] holding the prompt's keys/values."""
  c = config
  b, p = ids_BxP.shape
  h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
  cos, sin = rope_tables(model.default_positions(mask_BxP), e, c.rope_theta)  # [B, P, 1, E/2]
  allowed_BxPxP = model.allowed_keys(mask_BxP)  # as the model: the same masks
  x = dp["embed_VxD"][ids_BxP]
  nb = num_blocks(max(slots, p), kv_block)
  pad = ((0, 0), (0, 0), (0, nb * kv_block - p), (0, 0))
  caches = []
  for lp in dp["layers"]:
    q, kk, v = _qkv(c, lp, x, cos, sin)
    kk, v = kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)       # [B, K, P, E]
    q = q.reshape(b, p, k, h // k, e).transpose(0, 2, 3, 1, 4)      # [B, K, G, P, E]
    a = attend_grouped(q, [kk], [v], allowed_BxPxP).transpose(0, 3, 1, 2, 4)
    x = x + _dot_rows(a.reshape(b, p, h * e), lp["o"]).astype(x.dtype)
    x = _mlp(c, lp, x)
    kk, v = jnp.pad(kk, pad), jnp.pad(v, pad)
    caches.append([(kk[:, :, j * kv_block:(j + 1) * kv_block], v[:, :, j * kv_block:(j + 1) * kv_block])
                   for j in range(nb)])
  last_B = p - 1 - jnp.argmax(mask_BxP[:, ::-1], axis=1)
  x_last = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
  return _head(c, dp, x_last), caches


def decode_step(config, dp, tok_B, pos_B, slot, caches, key_mask_BxS, block: int):
  """One token per row into cache slot `slot` (traced), which lies in block `block` (static): it
  attends over blocks 0 .. block only (key_mask must already include the slot) -> logits, caches."""
  c = config
  b = tok_B.shape[0]
  h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
  kv_block = caches[0][0][0].shape[2]
  offset = slot - block * kv_block
  allowed_Bx1xS = key_mask_BxS[:, None, :(block + 1) * kv_block]
  cos, sin = rope_tables(pos_B, e, c.rope_theta)              # [B, 1, E/2]
  x = dp["embed_VxD"][tok_B]
  new_caches = []
  for lp, blocks in zip(dp["layers"], caches):
    q, kk, v = _qkv(c, lp, x, cos, sin)
    ck, cv = blocks[block]
    ck = jax.lax.dynamic_update_slice(ck, kk[:, :, None, :].astype(ck.dtype), (0, 0, offset, 0))
    cv = jax.lax.dynamic_update_slice(cv, v[:, :, None, :].astype(cv.dtype), (0, 0, offset, 0))
    blocks = [*blocks[:block], (ck, cv), *blocks[block + 1:]]
    read = blocks[:block + 1]
    a = attend_grouped(q.reshape(b, k, h // k, 1, e), [kb for kb, _ in read], [vb for _, vb in read],
                       allowed_Bx1xS)
    x = x + _dot_rows(a.reshape(b, h * e), lp["o"]).astype(x.dtype)
    x = _mlp(c, lp, x)
    new_caches.append(blocks)
  return _head(c, dp, x), new_caches


@functools.partial(jax.jit, static_argnums=0, static_argnames=("kv_block",))
def decode_logits(config: LlamaConfig, params, prompt_ids_BxP, prompt_mask_BxP, next_ids_BxT,
                  kv_block: int = KV_BLOCK):
  """Logits of the fast path, teacher-forced: [B, 1+T, V] after the prompt and after each next id.

  For tests: must equal `model.forward` on the concatenated sequence at the same positions.
  """
  dp = decode_params(config, params)
  b, p = prompt_ids_BxP.shape
  t = next_ids_BxT.shape[1]
  mask = prompt_mask_BxP.astype(bool)
  logits, caches = prefill(config, dp, prompt_ids_BxP, mask, p + t, kv_block)
  slots = len(caches[0]) * kv_block
  key_mask = jnp.concatenate([mask, jnp.zeros((b, slots - p), bool)], axis=1)
  n_valid = jnp.sum(mask, axis=1).astype(jnp.int32)
  out = [logits]
  for i in range(t):
    key_mask = key_mask.at[:, p + i].set(True)
    logits, caches = decode_step(config, dp, next_ids_BxT[:, i], n_valid + i, p + i, caches,
                                 key_mask, (p + i) // kv_block)
    out.append(logits)
  return jnp.stack(out, axis=1)


def decode_cost(config: LlamaConfig, batch: int, prompt_len: int, new_tokens: int,
                steps: Optional[int] = None, kv_block: int = KV_BLOCK,
                dtype: str = "") -> tuple[float, float]:
  """(FLOPs, bytes) of one sampling call as kdjax.llm.model.sampling.sample runs it.

  The prefill of batch x prompt_len tokens (every projection, attention over all P x P pairs, the
  head on the last position), then one decode step per further token drawn, each applying every
  weight to the batch and attending over the KV blocks filled so far (the step writing slot s reads
  s // kv_block + 1 whole blocks, masked slots included). Bytes: each pass reads the weights once
  (in `dtype`, default the compute dtype; norms in the parameter dtype) plus one embedding row per
  token; the prefill writes the cache's blocks; a step reads its KV blocks and writes one slot;
  each pass writes float32 logits [batch, V]. Activations are not counted.

  steps: tokens the loop draws, default new_tokens. The loop stops when EVERY row has ended, and a
  row that ended earlier still rides along in the batch, so pass the longest row's length in the
  batch (from a stage's own samples where known), not the mean: a mean length does not price it.
  """
  c = config
  steps = new_tokens if steps is None else min(int(steps), new_tokens)
  w, wn = c.dtype_bytes(dtype), c.dtype_bytes(c.param_dtype)
  d, h, k, e, f, v, n = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.intermediate_size, c.vocab_size, c.num_layers)
  layer_weights = d * (h + 2 * k) * e + h * e * d + 3 * d * f
  matmul_flops = 2 * (n * layer_weights + d * v)                      # per token, head included
  weight_bytes = (n * layer_weights + v * d) * w + (2 * n + 1) * d * wn
  kv_slot_bytes = 2 * n * batch * k * e * w                           # K and V, every layer
  p = prompt_len
  flops = batch * (p * 2 * n * layer_weights + 2 * d * v) + 4 * n * batch * h * e * p * p
  cache_slots = num_blocks(p + new_tokens - 1, kv_block) * kv_block
  bytes_ = weight_bytes + batch * p * d * w + cache_slots * kv_slot_bytes + batch * v * 4
  for i in range(1, steps):
    read = ((p + i - 1) // kv_block + 1) * kv_block                   # slots of the blocks read
    flops += batch * (matmul_flops + 4 * n * h * e * read)
    bytes_ += weight_bytes + batch * d * w + (read + 1) * kv_slot_bytes + batch * v * 4
  return float(flops), float(bytes_)
