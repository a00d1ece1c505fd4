"""Llama configuration and the named presets (SmolLM2 family plus tiny CPU presets)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kdjax.cli import UserError

REMAT_POLICIES = ("none", "layer", "dots")


ATTENTION_IMPLS = ("einsum", "dot_product", "cudnn")  # LlamaConfig.attention


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 8192
  tie_embeddings: bool = True
  bos_token_id: int = 1
  eos_token_id: int = 2
  # Numerics: parameters are stored in param_dtype; matmuls run in dtype (bfloat16 on accelerators).
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Rematerialisation in the backward pass (memory for compute): "none", "layer" (keep only each
  # layer's input, recompute the rest) or "dots" (keep the matmul outputs without batch dimensions,
  # recompute the elementwise work). True / False read as layer / none (older config.json files).
  remat: str = "none"
  # How model.Attention computes softmax(q k^T) v (kdjax.llm.model.llama.attend): "einsum" (explicit
  # [B, K, G, T, S] scores: the default, whose numbers the tests pin; on CPU "dot_product" runs at
  # about the same speed), "dot_product" (jax.nn.dot_product_attention, jax's default
  # implementation: XLA) or "cudnn" (its cuDNN flash attention: NVIDIA GPUs, bfloat16 / float16).
  # The sampler (kdjax.llm.model.sampling) has its own decode path, always einsums.
  attention: str = "einsum"

  def __post_init__(self):
    if isinstance(self.remat, bool) or self.remat is None:
      object.__setattr__(self, "remat", "layer" if self.remat else "none")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"attention={self.attention!r}: expected one of {', '.join(ATTENTION_IMPLS)}")

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "LlamaConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  def num_params(self) -> int:
    d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
    per_layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention scores."""
    d, hd, n = self.hidden_size, self.head_dim, self.num_layers
    matmul = 2 * (self.num_params() - self.vocab_size * d * (1 if self.tie_embeddings else 2)
                  + self.vocab_size * d)
    attn = 2 * 2 * n * self.num_heads * hd * seq_len / 2  # causal: half the scores on average
    return 3.0 * (matmul + attn)

  def forward_flops_per_token(self, context: int) -> float:
    """Forward matmul FLOPs for one token attending over `context` keys (decode or scoring)."""
    return self.flops_per_token(2 * context) / 3.0  # flops_per_token: causal (T/2 keys), x3

  def dtype_bytes(self, dtype: str = "") -> int:
    """Bytes per element of `dtype` (default: the compute dtype)."""
    return jnp.dtype(dtype or self.dtype).itemsize

  def param_bytes(self, dtype: str = "") -> int:
    """The parameters' bytes in `dtype` (default: param_dtype)."""
    return self.num_params() * self.dtype_bytes(dtype or self.param_dtype)

  def kv_cache_bytes(self, rows: int, slots: int, dtype: str = "") -> int:
    """A KV cache of `rows` x `slots` positions, K and V of every layer (default: compute dtype)."""
    return (2 * self.num_layers * rows * slots * self.num_kv_heads * self.head_dim
            * self.dtype_bytes(dtype))


def _smollm2(**kw) -> LlamaConfig:
  return LlamaConfig(vocab_size=49152, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
                     tie_embeddings=True, **kw)


PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": _smollm2(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                             num_kv_heads=3, rope_theta=100000.0),
    "smollm2-360m": _smollm2(hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15,
                             num_kv_heads=5, rope_theta=100000.0),
    "smollm2-1.7b": _smollm2(hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32,
                             num_kv_heads=32, rope_theta=130000.0),
    # Between the CPU presets and SmolLM2-135M: the one-GPU study's teacher (75.5M params) and
    # students (31.5M) (experiments/flags/llm_gpu1.flags).
    "small-49k": _smollm2(hidden_size=512, intermediate_size=1536, num_layers=16, num_heads=8,
                          num_kv_heads=4, rope_theta=100000.0),
    "mini-49k": _smollm2(hidden_size=384, intermediate_size=1024, num_layers=8, num_heads=6,
                         num_kv_heads=2, rope_theta=100000.0),
    # Full SmolLM2 vocabulary, small body: the smoke-run teacher and benchmarks.
    "tiny-49k": _smollm2(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                         num_kv_heads=2, rope_theta=100000.0),
    # Full vocabulary, smaller still: smoke-run students.
    "micro-49k": _smollm2(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2,
                          num_kv_heads=1, rope_theta=100000.0),
    # Full vocabulary, one narrow layer: the smoke-run students (experiments/flags/llm_smoke.flags).
    "nano-49k": _smollm2(hidden_size=64, intermediate_size=192, num_layers=1, num_heads=1,
                         num_kv_heads=1, rope_theta=100000.0),
    # Small vocabulary: unit tests.
    "test-tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                             max_position_embeddings=512, tie_embeddings=True),
    "test-tiny-untied": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                                    rope_theta=10000.0, max_position_embeddings=512,
                                    tie_embeddings=False),
}


def get_preset(name: str) -> LlamaConfig:
  if name not in PRESETS:
    raise UserError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
  return PRESETS[name]
