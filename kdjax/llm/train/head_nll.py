"""The LM head and next-token cross-entropy fused, for training:
sum_t w_t * -log softmax(x_t W)[y_t].

Autodiff of `logits = x @ W; nll = logsumexp(logits) - logits[y]` streams the [B, T, V] logits
through memory about seven times (written by the matmul, read for the max, for the exponentials'
sum and for the picked logit, read and written again for the softmax gradient, read by both
gradient matmuls); at tiny-49k scale that is 400 MB per pass on a CPU with about 10 GB/s. Here
the forward pass walks over chunks of positions: a chunk's logits stay close to the cache while its
log-sum-exp, the softmax part of its logits' gradient, its input gradient dx and its share of the
weight gradient dW^T += x^T @ dsoftmax ([D, V], the dot's fast layout) are formed; no [B, T, V]
array is ever written. The one-hot part of the gradient (-w at the target) is gathers and a scatter
of rows. The gradients are formed in the forward pass for a unit cotangent and scaled by the real
one in the backward pass (the loss is a sum, so that is exact).

Numerics: the same float32 softmax as the unfused loss (logits in float32 whatever the compute
dtype, max-shifted exponentials). tests/test_llm_train.py checks values and gradients against
autodiff of the unfused loss.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kdjax import sharding as sharding_lib

# Rows (batch x positions) per chunk: enough for the matmuls to run near full speed, few enough
# that a chunk's float32 logits (rows x V x 4 bytes: 50 MB at V = 49152) stay close to the cache.
CHUNK_ROWS = 256


def chunk_rows(platform: str, hidden: int, cpu_rows: int = CHUNK_ROWS) -> int:
  """Rows per chunk for a program compiled for `platform`: on CPU `cpu_rows` (a chunk's logits
  close to the cache, measured there). On an accelerator a chunk's logits live in HBM whatever
  their size, and every chunk adds its share of dW to the [D, V] float32 accumulator, a read and
  a write of D x V x 4 bytes: chunks of at least `hidden` (D) rows keep that traffic no larger
  than the chunk's own float32 logits (rows x V x 4) while a chunk's memory stays one [D, V]-sized
  array. (The paper's teacher on a v5p: one 1024-row chunk per chip instead of four, 5% fewer HBM
  bytes per step, by the TPU compiler.)"""
  return cpu_rows if platform == "cpu" else max(cpu_rows, hidden)


def _chunk_len(b: int, t: int, rows: int = CHUNK_ROWS) -> int:
  """Positions per chunk: the largest divisor of t with b * positions <= rows (at least 1)."""
  best = 1
  for c in range(1, t + 1):
    if t % c == 0 and b * c <= max(rows, b):
      best = c
  return best


def _logits(x, w, w_layout):
  spec = "bcd,vd->bcv" if w_layout == "vd" else "bcd,dv->bcv"
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _split(a_BxT, c):
  """[B, T, ...] -> [T / c, B, c, ...]: the chunks along positions (the batch axis stays whole,
  so a batch-sharded array is split without moving data between devices)."""
  b, t = a_BxT.shape[:2]
  return a_BxT.reshape((b, t // c, c) + a_BxT.shape[2:]).swapaxes(0, 1)


def _unsplit(a_NxBxC, b, t):
  return a_NxBxC.swapaxes(0, 1).reshape((b, t) + a_NxBxC.shape[3:])


def _target_rows(w, y, w_layout):
  """The head's weight vector of each target token, [..., D]."""
  return w[y] if w_layout == "vd" else jnp.moveaxis(jnp.take(w, y, axis=1), 0, -1)


def _chunk_nll(x_BxCxD, w, y_BxC, wt_BxC, w_layout, with_grads: bool):
  """A chunk's weighted nll sum and, with_grads, the softmax part of d nll / d logits and the
  input gradient dx. The one-hot part of the logits' gradient (-w at the target) never touches a
  [.., V] array: the target logit is x . W[y], its gradients are gathers and a scatter of rows."""
  logits_BxCxV = _logits(x_BxCxD, w, w_layout)
  top_BxC = jnp.max(logits_BxCxV, axis=-1)
  exp_BxCxV = jnp.exp(logits_BxCxV - top_BxC[..., None])
  sum_BxC = jnp.sum(exp_BxCxV, axis=-1)
  w_y_BxCxD = _target_rows(w, y_BxC, w_layout)
  picked_BxC = jnp.einsum("bcd,bcd->bc", x_BxCxD, w_y_BxCxD, preferred_element_type=jnp.float32)
  nll = jnp.sum(wt_BxC * (top_BxC + jnp.log(sum_BxC) - picked_BxC))
  if not with_grads:
    return nll, None, None
  # d nll / d logits = w * (softmax - onehot): the softmax part here, the one-hot part by rows
  dsoft_BxCxV = (exp_BxCxV * (wt_BxC / sum_BxC)[..., None]).astype(x_BxCxD.dtype)
  spec = "bcv,vd->bcd" if w_layout == "vd" else "bcv,dv->bcd"
  dx_BxCxD = (jnp.einsum(spec, dsoft_BxCxV, w, preferred_element_type=jnp.float32)
              - wt_BxC[..., None] * w_y_BxCxD.astype(jnp.float32)).astype(x_BxCxD.dtype)
  return nll, dsoft_BxCxV, dx_BxCxD


def varying_like(a, ref):
  """a, marked as varying over the manual mesh axes that ref varies over (inside shard_map: a
  loop carry that starts as constant zeros and accumulates per-device values), else a."""
  aval = jax.typeof(ref)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.10; earlier releases call it vma
  varying = manual.varying if manual is not None else getattr(aval, "vma", ())
  axes = tuple(sorted(varying))
  return jax.lax.pcast(a, axes, to="varying") if axes else a


def _scan(x_BxTxD, w, y_BxT, wt_BxT, w_layout, with_grads, rows):
  """(nll sum, dW^T [D, V] float32 of the softmax part or None, dx [N, B, c, D] or None)."""
  b, t = y_BxT.shape
  c = _chunk_len(b, t, rows)

  def body(dw_DxV, xs):
    x_BxCxD = xs[0]
    nll, dsoft_BxCxV, dx_BxCxD = _chunk_nll(x_BxCxD, w, *xs[1:], w_layout=w_layout,
                                            with_grads=with_grads)
    if with_grads:
      dw_DxV = dw_DxV + jnp.einsum("bcd,bcv->dv", x_BxCxD, dsoft_BxCxV,
                                   preferred_element_type=jnp.float32)
    return dw_DxV, (nll, dx_BxCxD)

  dw0 = None
  if with_grads:
    dw0 = varying_like(jnp.zeros(w.shape[::-1] if w_layout == "vd" else w.shape, jnp.float32),
                       x_BxTxD)
  dw_DxV, (nll_N, dx) = jax.lax.scan(
      body, dw0, (_split(x_BxTxD, c), _split(y_BxT, c), _split(wt_BxT, c)))
  return jnp.sum(nll_N), dw_DxV, dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def head_nll_sum(x_BxTxD: jax.Array, w: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                 w_layout: str = "vd", rows: int = CHUNK_ROWS) -> jax.Array:
  """sum_{b,t} weights[b,t] * -log softmax(x[b,t] @ W)[targets[b,t]], a float32 scalar.

  w is the head's weight: [V, D] (w_layout "vd", a tied embedding table) or [D, V] ("dv", an
  lm_head kernel). Differentiable in x and w (not in targets or weights). rows: batch x
  positions per chunk (chunk_rows); the sum is the same up to rounding for any value.
  """
  return _scan(x_BxTxD, w, targets_BxT, weights_BxT.astype(jnp.float32), w_layout, False,
               rows)[0]


def _fwd(x_BxTxD, w, targets_BxT, weights_BxT, w_layout, rows):
  b, t = targets_BxT.shape
  wt_BxT = weights_BxT.astype(jnp.float32)
  nll, dsoft_DxV, dx_NxBxCxD = _scan(x_BxTxD, w, targets_BxT, wt_BxT, w_layout, True, rows)
  # the one-hot part of dW: -w_t x_t added to the row (or column) of target y_t
  y_N = targets_BxT.reshape(-1)
  rows_NxD = (-wt_BxT[..., None] * x_BxTxD.astype(jnp.float32)).reshape(y_N.shape[0], -1)
  if w_layout == "vd":
    # the barrier keeps XLA from folding the transpose into the dot (the slow transposed form)
    onehot_VxD = jnp.zeros(w.shape, jnp.float32).at[y_N].add(rows_NxD)
    dw = jax.lax.optimization_barrier(dsoft_DxV).T + onehot_VxD
  else:
    dw = dsoft_DxV.at[:, y_N].add(rows_NxD.T)
  return nll, (_unsplit(dx_NxBxCxD, b, t), dw.astype(w.dtype), targets_BxT, weights_BxT)


def _bwd(w_layout, rows, residuals, g):
  dx_BxTxD, dw, targets_BxT, weights_BxT = residuals
  del w_layout, rows
  zeros = lambda a: (jnp.zeros(a.shape, jax.dtypes.float0) if not jnp.issubdtype(
      a.dtype, jnp.floating) else jnp.zeros_like(a))
  return ((g * dx_BxTxD).astype(dx_BxTxD.dtype), (g * dw).astype(dw.dtype), zeros(targets_BxT),
          zeros(weights_BxT))


head_nll_sum.defvjp(_fwd, _bwd)


def over_batch_shards(fn, args: tuple, batch_dims: tuple):
  """fn(*args) (sums over batch rows, differentiable) on each device's own rows of a batch-sharded
  batch, its outputs added across devices.

  batch_dims[i]: the batch axis of args[i], or None for an array every device needs whole (the
  head's weight). Under a mesh context (kdjax.sharding.use_mesh) whose batch axes (data x fsdp)
  are not trivial, fn runs under shard_map: the whole arrays are gathered once, each device walks
  its own rows in chunks sized by its own batch, and a whole array's gradient is summed over
  devices once per call (the transpose of `pcast` to varying), not once per chunk as XLA's
  partitioner does with the batch-sharded chunks of a global loop. Elsewhere: fn(*args).
  """

  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else sharding_lib.batch_axes(mesh)
  if not axes:
    return fn(*args)
  batch = axes if len(axes) > 1 else axes[0]
  specs = tuple(P() if d is None else P(*(None,) * d, batch) for d in batch_dims)

  def local(*local_args):
    local_args = [a if d is not None else jax.lax.pcast(a, axes, to="varying")
                  for a, d in zip(local_args, batch_dims)]
    return jax.tree.map(lambda a: jax.lax.psum(a, axes), fn(*local_args))

  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)
