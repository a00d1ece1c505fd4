"""The Llama architecture (SmolLM2) in Flax linen.

RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied or untied embeddings, causal +
padding masks, layers under `nn.scan` (one compiled layer, any depth). The modules own the
parameters; the math they apply is kdjax.llm.model.layers', the same functions the sampler's decode
layout calls (kdjax.llm.model.sampling), so training, scoring and decoding share one definition.
Every parameter carries logical axis names; `kdjax.sharding` maps them onto a device mesh.

Shapes in names: B batch, T query length, S key length, D hidden, H heads, K kv heads,
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

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.llm.model import targets
from kdjax.llm.model.config import LlamaConfig
# the layer math (re-exported: model.rotary, model.attend, model.swiglu, model.tied_lm_head)
from kdjax.llm.model.layers import attend, lm_head, rms_norm, rotary, swiglu, tied_lm_head  # noqa: F401
from kdjax.sharding import constrain

_ACT = ("batch", "length", "act_embed")  # the residual stream's logical axes [B, T, D]


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
    return rms_norm(x_BxTxD, scale, self.eps, self.dtype)


def _dense(name, features, axes, cfg):
  return nn.DenseGeneral(features=features, use_bias=False, dtype=cfg.compute_dtype,
                         param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_init(axes),
                         name=name)


class Attention(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, allowed_BxTxS):
    c = self.config
    h, k, e = c.num_heads, c.num_kv_heads, c.head_dim
    q = _dense("q", (h, e), ("embed", "heads", "head_dim"), c)(x_BxTxD)
    kk = _dense("k", (k, e), ("embed", "kv_heads", "head_dim"), c)(x_BxTxD)
    v = _dense("v", (k, e), ("embed", "kv_heads", "head_dim"), c)(x_BxTxD)
    q = rotary(q, positions_BxT, c.rope_theta)
    kk = rotary(kk, positions_BxT, c.rope_theta)
    out = attend(q, kk, v, allowed_BxTxS, c.attention)
    o = nn.DenseGeneral(features=c.hidden_size, axis=(-2, -1), use_bias=False,
                        dtype=c.compute_dtype, param_dtype=jnp.dtype(c.param_dtype),
                        kernel_init=_init(("heads", "head_dim", "embed")), name="o")
    return o(out)


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
  def __call__(self, x_BxTxD, positions_BxT, allowed_BxTxS):
    c = self.config
    norm = lambda name: RMSNorm(c.rms_norm_eps, c.compute_dtype, jnp.dtype(c.param_dtype), name=name)
    x_BxTxD = constrain(x_BxTxD, _ACT)
    attn_out = Attention(c, name="attn")(norm("attn_norm")(x_BxTxD), positions_BxT, allowed_BxTxS)
    x_BxTxD = constrain(x_BxTxD + attn_out, _ACT)
    x_BxTxD = x_BxTxD + MLP(c, name="mlp")(norm("mlp_norm")(x_BxTxD))
    return constrain(x_BxTxD, _ACT), None


def allowed_keys(attention_mask_BxT: jax.Array) -> jax.Array:
  """[B, T, T]: a query sees the real keys up to itself, and always itself: a pad's query (which
  has no real key before it in a left-padded row) then depends on nothing later, not on the row."""
  t = attention_mask_BxT.shape[1]
  causal_TxS, own_TxS = jnp.tril(jnp.ones((t, t), bool)), jnp.eye(t, dtype=bool)
  return (causal_TxS[None] & attention_mask_BxT[:, None, :]) | own_TxS[None]


def default_positions(attention_mask_BxT: jax.Array) -> jax.Array:
  """Each token's position: the number of real tokens before it (pads share their neighbour's)."""
  return jnp.maximum(jnp.cumsum(attention_mask_BxT, axis=1) - 1, 0)


class Llama(nn.Module):
  """Causal LM. __call__(tokens, positions, attention_mask) -> logits_BxTxV (float32); with
  head=False the final-normed hidden states [B, T, D] instead of the logits (for a loss that
  applies the head itself: kdjax.llm.train.head_nll). Decoding token by token is the sampler's
  (kdjax.llm.model.sampling), on the same layer functions."""
  config: LlamaConfig
  head: bool = True

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: Optional[jax.Array] = None,
               attention_mask_BxT: Optional[jax.Array] = None):
    c = self.config
    if attention_mask_BxT is None:
      attention_mask_BxT = jnp.ones(tokens_BxT.shape, bool)
    attention_mask_BxT = attention_mask_BxT.astype(bool)
    if positions_BxT is None:
      positions_BxT = default_positions(attention_mask_BxT)
    allowed_BxTxS = allowed_keys(attention_mask_BxT)

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
                     in_axes=(nn.broadcast, nn.broadcast), length=c.num_layers,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x_BxTxD, _ = layers(c, name="layers")(x_BxTxD, positions_BxT, allowed_BxTxS)
    x_BxTxD = RMSNorm(c.rms_norm_eps, c.compute_dtype, jnp.dtype(c.param_dtype),
                      name="final_norm")(x_BxTxD)
    if not self.head:
      return x_BxTxD
    if c.tie_embeddings:
      return tied_lm_head(x_BxTxD, embed.embedding.astype(c.compute_dtype))
    kernel = _Kernel((c.hidden_size, c.vocab_size), ("embed", "vocab"), c, name="lm_head")()
    return lm_head(x_BxTxD, kernel, "dv")


def init_params(config: LlamaConfig, rng: jax.Array, unbox: bool = True):
  """Random parameters (normal(0.02), norms at one). With unbox=False, keeps the logical metadata."""
  variables = Llama(config).init(rng, jnp.zeros((1, 4), jnp.int32))
  params = variables["params"]
  return nn.meta.unbox(params) if unbox else params


# The two below trace the whole model's init (~0.12 s each for the test-tiny model, more for real
# ones) and a study asks for them a dozen times per model (shardings, checkpoint targets, plans):
# cached per config (a frozen dataclass). Callers get shared trees: they map them, never mutate.
@functools.lru_cache(maxsize=64)
def abstract_params(config: LlamaConfig):
  """The parameter tree a config implies, as ShapeDtypeStructs (no memory)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=64)
def logical_axes(config: LlamaConfig):
  """The logical axis names of every parameter, as a pytree of PartitionSpecs like the params."""
  abstract = jax.eval_shape(lambda: Llama(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return nn.get_partition_spec(abstract["params"])


def forward(config: LlamaConfig, params, tokens_BxT, attention_mask_BxT=None, positions_BxT=None):
  """Logits [B, T, V] (float32) of a full sequence."""
  return Llama(config).apply({"params": params}, tokens_BxT, positions_BxT, attention_mask_BxT)


def hidden_states(config: LlamaConfig, params, tokens_BxT, attention_mask_BxT=None):
  """The final-normed hidden states [B, T, D] (compute dtype): what the LM head multiplies."""
  return Llama(config, head=False).apply({"params": params}, tokens_BxT, None, attention_mask_BxT)


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
