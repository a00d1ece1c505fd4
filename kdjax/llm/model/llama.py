"""The Llama architecture (SmolLM2) in Flax linen.

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied or untied embeddings, causal +
padding masks, an explicit KV cache, layers under `nn.scan` (one compiled layer, any depth).
Every parameter carries logical axis names; `kdjax.sharding` maps them onto a device mesh.

Shapes in names: B batch, T query length, S cache/key length, D hidden, H heads, K kv heads,
G = H // K query heads per kv head, E head_dim, F MLP width, V vocabulary, L layers.

Parameter tree (the canonical layout; convert.py maps checkpoints onto it):
  embed/embedding                 [V, D]        (vocab, embed)
  layers/attn_norm/scale          [L, D]        (layers, norm)
  layers/attn/{q,k,v}/kernel      [L, D, H|K, E](layers, embed, heads|kv_heads, head_dim)
  layers/attn/o/kernel            [L, H, E, D]  (layers, heads, head_dim, embed)
  layers/mlp_norm/scale           [L, D]
  layers/mlp/{gate,up}/kernel     [L, D, F]     (layers, embed, mlp)
  layers/mlp/down/kernel          [L, F, D]     (layers, mlp, embed)
  final_norm/scale                [D]
  lm_head/kernel                  [D, V]        (embed, vocab)   only when not tied
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.llm.model import targets
from kdjax.llm.model.config import LlamaConfig
from kdjax.sharding import constrain

_ACT = ("batch", "length", "act_embed")  # the residual stream's logical axes [B, T, D]

_MASKED = -1e30  # finite, and every query may see itself: no softmax row is empty


class KVCache(NamedTuple):
  """Keys and values of every layer, written in slot order. mask_BxS marks filled, unpadded slots."""
  k_LxBxSxKxE: jax.Array
  v_LxBxSxKxE: jax.Array
  mask_BxS: jax.Array   # bool
  index: jax.Array      # int32 scalar: the next slot to write

  @classmethod
  def empty(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    dtype = dtype or config.compute_dtype
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def rotary(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, HF Llama's convention (rotate the two halves of head_dim)."""
  e = x_BxTxNxE.shape[-1]
  inv_freq_E2 = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_E2[None, None, :]
  cos = jnp.cos(angles_BxTxE2)[:, :, None, :]
  sin = jnp.sin(angles_BxTxE2)[:, :, None, :]
  x = x_BxTxNxE.astype(jnp.float32)
  x1, x2 = x[..., : e // 2], x[..., e // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


@jax.custom_vjp
def tied_lm_head(x_BxTxD: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
  """Logits x @ embedding.T of a tied LM head, with a hand-written backward pass.

  Autodiff would form the embedding gradient as g_(BT)xV^T @ x_(BT)xD, a dot over a transposed
  400 MB operand at tiny-49k scale that XLA:CPU runs at about half its matmul speed; here it is
  x^T @ g -> [D, V] (a fast layout) followed by a cheap [D, V] -> [V, D] transpose. Same values.
  """
  return jnp.einsum("btd,vd->btv", x_BxTxD, embedding_VxD)


def _tied_lm_head_fwd(x_BxTxD, embedding_VxD):
  return tied_lm_head(x_BxTxD, embedding_VxD), (x_BxTxD, embedding_VxD)


def _tied_lm_head_bwd(residuals, g_BxTxV):
  x_BxTxD, embedding_VxD = residuals
  g_BxTxV = g_BxTxV.astype(x_BxTxD.dtype)
  dx_BxTxD = jnp.einsum("btv,vd->btd", g_BxTxV, embedding_VxD)
  de_DxV = jnp.einsum("btv,btd->dv", g_BxTxV, x_BxTxD)
  # the barrier keeps XLA's simplifier from folding the transpose back into the dot (which would
  # make it the slow transposed-operand form again)
  de_DxV = jax.lax.optimization_barrier(de_DxV)
  return dx_BxTxD, de_DxV.T.astype(embedding_VxD.dtype)


tied_lm_head.defvjp(_tied_lm_head_fwd, _tied_lm_head_bwd)


def _init(names, init=nn.initializers.normal(0.02)):
  return nn.with_logical_partitioning(init, names)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x_BxTxD):
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (x_BxTxD.shape[-1],),
                       self.param_dtype)
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


def _dense(name, shape_in, features, axes, cfg, axis=-1):
  return nn.DenseGeneral(features=features, axis=axis, use_bias=False, dtype=cfg.compute_dtype,
                         param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_init(axes),
                         name=name)


def attend(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, allowed_BxTxS, impl: str = "einsum"):
  """Grouped-query attention: softmax(q k^T / sqrt(E), keys not allowed masked) v, [B, T, H, E]
  in q's dtype; query head j reads kv head j // G (G = H // K). Every query must be allowed at
  least one key (the model lets each see itself), so a masked score's weight is exactly 0 whatever
  the fill (-1e30 here; -0.7 x float32 max inside jax.nn.dot_product_attention).

  impl (LlamaConfig.attention): "einsum" the explicit scores below (float32 scores and softmax);
  "dot_product" jax.nn.dot_product_attention with jax's default implementation (XLA); "cudnn" its
  cuDNN flash attention (NVIDIA GPUs, bfloat16 / float16; jax raises elsewhere).
  """
  b, t, h, e = q_BxTxHxE.shape
  k = k_BxSxKxE.shape[2]
  kk, v = k_BxSxKxE.astype(q_BxTxHxE.dtype), v_BxSxKxE.astype(q_BxTxHxE.dtype)
  if impl != "einsum":
    return jax.nn.dot_product_attention(q_BxTxHxE, kk, v, mask=allowed_BxTxS[:, None],
                                        scale=e ** -0.5,
                                        implementation="cudnn" if impl == "cudnn" else None)
  q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, k, h // k, e)
  scores = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, kk,
                      preferred_element_type=jnp.float32) * (e ** -0.5)
  scores = jnp.where(allowed_BxTxS[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxHxE.dtype)
  return jnp.einsum("bkgts,bske->btkge", probs, v).reshape(b, t, h, e)


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, allowed_BxTxS, layer_cache):
    c = self.config
    h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
    q = _dense("q", None, (h, e), ("embed", "heads", "head_dim"), c)(x_BxTxD)
    kk = _dense("k", None, (k, e), ("embed", "kv_heads", "head_dim"), c)(x_BxTxD)
    v = _dense("v", None, (k, e), ("embed", "kv_heads", "head_dim"), c)(x_BxTxD)
    q = rotary(q, positions_BxT, c.rope_theta)
    kk = rotary(kk, positions_BxT, c.rope_theta)
    new_cache = None
    if layer_cache is not None:
      cache_k, cache_v, index = layer_cache
      kk = jax.lax.dynamic_update_slice_in_dim(cache_k, kk.astype(cache_k.dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=1)
      new_cache = (kk, v)
    out = attend(q, kk, v, allowed_BxTxS, c.attention)
    o = nn.DenseGeneral(features=c.hidden_size, axis=(-2, -1), use_bias=False,
                        dtype=c.compute_dtype, param_dtype=jnp.dtype(c.param_dtype),
                        kernel_init=_init(("heads", "head_dim", "embed")), name="o")
    return o(out), new_cache


def _t(a_2d):
  """A transposed dot operand XLA must materialize: without the barrier its simplifier folds the
  transpose into the consuming dot, choosing a transposed-operand form that runs slower on CPU."""
  return jax.lax.optimization_barrier(a_2d.T)


@jax.custom_vjp
def swiglu(x_BxTxD, gate_DxF, up_DxF, down_FxD):
  """The SwiGLU MLP (silu(x Wg) * (x Wu)) Wd, with a hand-written backward pass.

  Autodiff is correct too; it let XLA write the [tokens, F] activation gradients transposed (a
  slow strided write) to feed the weight-gradient dots. Here every dot takes its operands in the
  fast layout: the transposes are of the small [tokens, D] arrays and of the weights.
  """
  return _swiglu_fwd(x_BxTxD, gate_DxF, up_DxF, down_FxD)[0]


def _swiglu_fwd(x_BxTxD, gate_DxF, up_DxF, down_FxD):
  g = jnp.einsum("btd,df->btf", x_BxTxD, gate_DxF)
  u = jnp.einsum("btd,df->btf", x_BxTxD, up_DxF)
  y = jnp.einsum("btf,fd->btd", nn.silu(g) * u, down_FxD)
  return y, (x_BxTxD, gate_DxF, up_DxF, down_FxD, g, u)


def _swiglu_bwd(res, dy_BxTxD):
  x_BxTxD, gate_DxF, up_DxF, down_FxD, g, u = res
  b, t, d = x_BxTxD.shape
  x_NxD, dy_NxD = x_BxTxD.reshape(b * t, d), dy_BxTxD.reshape(b * t, d).astype(x_BxTxD.dtype)
  g_NxF, u_NxF = g.reshape(b * t, -1), u.reshape(b * t, -1)
  sig_NxF = jax.nn.sigmoid(g_NxF)
  silu_NxF = g_NxF * sig_NxF
  dh_NxF = dy_NxD @ _t(down_FxD)
  du_NxF = dh_NxF * silu_NxF
  dg_NxF = dh_NxF * u_NxF * sig_NxF * (1 + g_NxF * (1 - sig_NxF))
  x_DxN, dy_DxN = _t(x_NxD), _t(dy_NxD)
  d_gate = x_DxN @ dg_NxF
  d_up = x_DxN @ du_NxF
  # [D, F] is the dot's fast output layout; the barrier keeps the transpose after it
  d_down = jax.lax.optimization_barrier(dy_DxN @ (silu_NxF * u_NxF)).T
  dx_NxD = dg_NxF @ _t(gate_DxF) + du_NxF @ _t(up_DxF)
  return (dx_NxD.reshape(b, t, d), d_gate.astype(gate_DxF.dtype), d_up.astype(up_DxF.dtype),
          d_down.astype(down_FxD.dtype))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class _Kernel(nn.Module):
  """A dense layer's kernel alone (same parameter path and metadata as nn.DenseGeneral's)."""
  shape: tuple
  axes: tuple
  config: LlamaConfig

  @nn.compact
  def __call__(self):
    c = self.config
    return self.param("kernel", _init(self.axes), self.shape,
                      jnp.dtype(c.param_dtype)).astype(c.compute_dtype)


class MLP(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    c = self.config
    d, f = c.hidden_size, c.intermediate_size
    gate = _Kernel((d, f), ("embed", "mlp"), c, name="gate")()
    up = _Kernel((d, f), ("embed", "mlp"), c, name="up")()
    down = _Kernel((f, d), ("mlp", "embed"), c, name="down")()
    return swiglu(x_BxTxD.astype(c.compute_dtype), gate, up, down)


class Block(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD, layer_cache, positions_BxT, allowed_BxTxS):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.compute_dtype, jnp.dtype(c.param_dtype), name=name)
    x_BxTxD = constrain(x_BxTxD, _ACT)
    attn_out, new_cache = Attention(c, name="attn")(norm("attn_norm")(x_BxTxD), positions_BxT,
                                                   allowed_BxTxS, layer_cache)
    x_BxTxD = constrain(x_BxTxD + attn_out, _ACT)
    x_BxTxD = x_BxTxD + MLP(c, name="mlp")(norm("mlp_norm")(x_BxTxD))
    return constrain(x_BxTxD, _ACT), new_cache


class Llama(nn.Module):
  """Causal LM. __call__(tokens, positions, attention_mask, cache) -> (logits_BxTxV f32, cache);
  with head=False the final-normed hidden states [B, T, D] instead of the logits (for a loss that
  applies the head itself: kdjax.llm.train.head_nll)."""
  config: LlamaConfig
  head: bool = True

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: Optional[jax.Array] = None,
               attention_mask_BxT: Optional[jax.Array] = None,
               cache: Optional[KVCache] = None):
    c = self.config
    b, t = tokens_BxT.shape
    if attention_mask_BxT is None:
      attention_mask_BxT = jnp.ones((b, t), bool)
    attention_mask_BxT = attention_mask_BxT.astype(bool)
    if positions_BxT is None:
      positions_BxT = jnp.maximum(jnp.cumsum(attention_mask_BxT, axis=1) - 1, 0)
      if cache is not None:  # continue counting from the filled slots
        positions_BxT = positions_BxT + jnp.sum(cache.mask_BxS, axis=1, keepdims=True)

    # A query sees the real keys up to itself, and always itself: a pad's query (which has no real
    # key before it in a left-padded row) then depends on nothing later, not on the whole row.
    if cache is None:
      causal_TxS, own_TxS = jnp.tril(jnp.ones((t, t), bool)), jnp.eye(t, dtype=bool)
      allowed_BxTxS = (causal_TxS[None] & attention_mask_BxT[:, None, :]) | own_TxS[None]
      layer_caches = None
    else:
      s = cache.mask_BxS.shape[1]
      key_mask_BxS = jax.lax.dynamic_update_slice_in_dim(cache.mask_BxS, attention_mask_BxT,
                                                         cache.index, axis=1)
      slot_S, own_T = jnp.arange(s), cache.index + jnp.arange(t)
      causal_TxS = slot_S[None, :] <= own_T[:, None]
      own_TxS = slot_S[None, :] == own_T[:, None]
      allowed_BxTxS = (causal_TxS[None] & key_mask_BxS[:, None, :]) | own_TxS[None]
      layer_caches = (cache.k_LxBxSxKxE, cache.v_LxBxSxKxE, jnp.broadcast_to(cache.index, (c.num_layers,)))

    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                     param_dtype=jnp.dtype(c.param_dtype),
                     embedding_init=_init(("vocab", "embed")), name="embed")
    # the lookup would otherwise inherit the table's sharding (embed over fsdp) and XLA would carry
    # it through every layer: each device all B rows with 1/fsdp of D instead of B/fsdp whole rows
    x_BxTxD = constrain(embed(tokens_BxT), _ACT)

    block = Block
    if c.remat != "none":
      policy = None if c.remat == "layer" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
      block = nn.remat(Block, prevent_cse=False, policy=policy)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x_BxTxD, new_layer_caches = layers(c, name="layers")(x_BxTxD, layer_caches, positions_BxT,
                                                         allowed_BxTxS)
    x_BxTxD = RMSNorm(c.rms_norm_eps, c.compute_dtype, jnp.dtype(c.param_dtype),
                      name="final_norm")(x_BxTxD)
    if not self.head:
      logits = x_BxTxD
    elif c.tie_embeddings:
      logits = tied_lm_head(x_BxTxD, embed.embedding.astype(c.compute_dtype)).astype(jnp.float32)
    else:
      logits = _dense("lm_head", None, c.vocab_size, ("embed", "vocab"), c)(x_BxTxD)
      logits = logits.astype(jnp.float32)

    new_cache = None
    if cache is not None:
      new_cache = KVCache(new_layer_caches[0], new_layer_caches[1], key_mask_BxS, cache.index + t)
    return logits, new_cache


def init_params(config: LlamaConfig, rng: jax.Array, unbox: bool = True):
  """Random parameters (normal(0.02), norms at one). With unbox=False, keeps the logical metadata."""
  variables = Llama(config).init(rng, jnp.zeros((1, 4), jnp.int32))
  params = variables["params"]
  return nn.meta.unbox(params) if unbox else params


def logical_axes(config: LlamaConfig):
  """The logical axis names of every parameter, as a pytree of PartitionSpecs like the params."""
  abstract = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return nn.get_partition_spec(abstract["params"])


def forward(config: LlamaConfig, params, tokens_BxT, attention_mask_BxT=None, positions_BxT=None):
  """Logits [B, T, V] (float32) of a full sequence, no cache."""
  logits, _ = Llama(config).apply({"params": params}, tokens_BxT, positions_BxT, attention_mask_BxT)
  return logits


def hidden_states(config: LlamaConfig, params, tokens_BxT, attention_mask_BxT=None):
  """The final-normed hidden states [B, T, D] (compute dtype): what the LM head multiplies."""
  x, _ = Llama(config, head=False).apply({"params": params}, tokens_BxT, None, attention_mask_BxT)
  return x


def head_weight(config: LlamaConfig, params) -> tuple[jax.Array, str]:
  """The LM head's weight in the compute dtype and its layout: the tied embedding table [V, D]
  ("vd") or the lm_head kernel [D, V] ("dv")."""
  if config.tie_embeddings:
    return params["embed"]["embedding"].astype(config.compute_dtype), "vd"
  return params["lm_head"]["kernel"].astype(config.compute_dtype), "dv"


def token_logprobs(config: LlamaConfig, params, input_ids_BxT, attention_mask_BxT=None,
                   target_mask_BxT=None):
  """log p(token_{t+1} | tokens_<=t) for t in [0, T-1): [B, T-1], zero where token t+1 is not a
  target (kdjax.llm.model.targets: padding, predicted from padding, or a prompt token). target_mask_BxT:
  `targets.target_mask(attention_mask, prompt_len)`; None: prompt length 1 (every real token after
  a row's first one is a target)."""
  if attention_mask_BxT is None:
    attention_mask_BxT = jnp.ones(input_ids_BxT.shape, bool)
  attention_mask_BxT = jnp.asarray(attention_mask_BxT)
  counted_BxT = targets.counted(attention_mask_BxT, target_mask_BxT)
  logits = forward(config, params, input_ids_BxT, attention_mask_BxT)[:, :-1]
  next_ids = input_ids_BxT[:, 1:]
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, next_ids[..., None], axis=-1)[..., 0]
  return jnp.where(counted_BxT[:, 1:], picked - logz, 0.0)
