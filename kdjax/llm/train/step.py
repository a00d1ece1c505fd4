"""The train step: loss, gradients (accumulated over micro-batches), AdamW with a WSD schedule.

`train_step(state, batch, teacher_params, spec, temperatures=None)` -> (state, metrics) is pure;
`compile_train_step` jits it once with shardings and the state donated. Three kinds of step, all
from the same pieces:

  * one model (spec.num_students None), or N students vmapped over a leading student axis of
    state and batch (batch [N, B, T]: student i trains on batch[i]);
  * next-token cross-entropy, or a token-level KD objective (kdjax.objectives.tokens) against a
    frozen teacher's logits. With spec.tempered_teacher the target is softmax(z_teacher / T) with
    T the step's `temperatures` argument (a traced scalar, or one per student: one compiled step
    for every temperature) and the student untempered; otherwise spec.kd_temperature tempers both;
  * spec.shared_batch: N students on ONE batch [B, T] (no student axis): the batch is broadcast
    into the vmap and the teacher runs once per (micro-)batch, outside it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from kdjax import sharding as sharding_lib
from kdjax.llm.model import evaluate
from kdjax.llm.model import llama as model
from kdjax.llm.model import targets
from kdjax.llm.model.config import LlamaConfig
from kdjax.llm.train import head_kd, head_nll
from kdjax.objectives import tokens


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a train step (hashable: it is a jit static argument)."""
  model: LlamaConfig
  total_steps: int
  lr: float = 5e-4
  warmup_frac: float = 0.01
  decay_frac: float = 0.2
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip: float = 1.0                 # global-norm clipping; 0 disables
  grad_accum: int = 1
  num_students: Optional[int] = None  # None: one model, no student axis
  teacher: Optional[LlamaConfig] = None
  objective: str = "fkl"            # kdjax.objectives.tokens name, used when teacher is set
  kd_temperature: float = 1.0       # tempers both models (unless tempered_teacher)
  tempered_teacher: bool = False    # target softmax(z_teacher / T), T = the step's temperatures
  teacher_knob: str = "temperature"  # with tempered_teacher: what the step's `temperatures` are,
  #                                    T, or the values of a truncation (top_p, min_p, top_k) of
  #                                    the teacher at T = 1 (kdjax.llm.model.truncation)
  shared_batch: bool = False        # one [B, T] batch for all students, teacher once per batch
  lr_scales: tuple = ()             # student i's peak learning rate is lr x lr_scales[i]
  common_streams: bool = False      # every student initialised from stream 0 (TrainConfig's
  #                                   common_random_numbers)
  platform: str = "cpu"             # what the step is compiled for (compile_train_step sets it):
  #                                   the fused heads' chunk rows (head_nll.chunk_rows)


def wsd_schedule(peak: float, total_steps: int, warmup_frac: float, decay_frac: float):
  """Warm-up / stable / decay: linear ramp to `peak` over the first warmup_frac of the steps,
  constant, then linear decay towards 0 over the last decay_frac (the paper's 1% / 20%)."""
  warm = int(round(warmup_frac * total_steps))
  decay = int(round(decay_frac * total_steps))
  decay_start = total_steps - decay

  def schedule(count):
    s = jnp.asarray(count, jnp.float32)
    ramp = jnp.minimum((s + 1.0) / max(warm, 1), 1.0) if warm > 0 else 1.0
    down = jnp.clip((total_steps - s) / max(decay, 1), 0.0, 1.0) if decay > 0 else 1.0
    return peak * ramp * jnp.where(s >= decay_start, down, 1.0)

  return schedule


def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on norm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(spec: StepSpec) -> optax.GradientTransformation:
  schedule = wsd_schedule(spec.lr, spec.total_steps, spec.warmup_frac, spec.decay_frac)
  return optax.chain(
      optax.clip_by_global_norm(spec.clip) if spec.clip > 0 else optax.identity(),
      optax.adamw(schedule, b1=spec.b1, b2=spec.b2, eps=spec.eps,
                  weight_decay=spec.weight_decay, mask=_decay_mask))


# ----------------------------------------------------------------------------- losses


def _next_token_targets(ids_BxT, mask_BxT, target_mask_BxT=None):
  """Position t predicts token t+1: targets shifted left; the loss mask is whether token t+1 is a
  target (kdjax.llm.model.targets; target_mask_BxT: the batch's, None: prompt length 1), the last
  position masked out.

  Kept at full length T (not sliced to T-1) so the [B, T, V] logits are never copied or padded.
  """
  counted_BxT = targets.counted(mask_BxT, target_mask_BxT)
  targets_BxT = jnp.concatenate([ids_BxT[:, 1:], jnp.zeros_like(ids_BxT[:, :1])], axis=1)
  tmask_BxT = jnp.concatenate([counted_BxT[:, 1:], jnp.zeros_like(counted_BxT[:, :1])], axis=1)
  return targets_BxT, tmask_BxT


def _token_nll(logits_BxTxV, targets_BxT):
  """-log softmax(logits)[target] per token. The target logit is picked by a compare-and-select
  over the vocabulary (fused by XLA), not take_along_axis, whose gradient is a slow scatter."""
  vocab_1x1xV = jnp.arange(logits_BxTxV.shape[-1], dtype=targets_BxT.dtype)[None, None, :]
  picked_BxT = jnp.sum(jnp.where(vocab_1x1xV == targets_BxT[..., None], logits_BxTxV, 0.0),
                       axis=-1)
  return jax.nn.logsumexp(logits_BxTxV, axis=-1) - picked_BxT


def teacher_logits(spec: StepSpec, teacher_params, batch):
  """The frozen teacher's logits [B, T, V] of a batch (no gradient flows into them)."""
  return jax.lax.stop_gradient(model.forward(spec.teacher, teacher_params, batch["input_ids"],
                                             batch["attention_mask"].astype(bool)))


def _layout(config) -> str:
  return "vd" if config.tie_embeddings else "dv"


def teacher_head_inputs(spec: StepSpec, teacher_params, batch):
  """(final hidden states [B, T, E], head weight) of the frozen teacher: what its head multiplies,
  for the fused tempered-teacher loss (no gradient flows into them)."""
  ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
  x = model.hidden_states(spec.teacher, teacher_params, ids, mask)
  w, _ = model.head_weight(spec.teacher, teacher_params)
  return jax.lax.stop_gradient(x), jax.lax.stop_gradient(w)


def kd_mean(spec: StepSpec, logits_BxTxV, teacher_BxTxV, tmask_BxT):
  """The objective's mean over target tokens, both models tempered by spec.kd_temperature
  (train_lm's --kd_temperature; the teacher-only tempered kinds take the fused path below)."""
  return tokens.by_name(spec.objective)(logits_BxTxV, teacher_BxTxV, tmask_BxT,
                                        spec.kd_temperature)


def _head_kd(spec: StepSpec, x_NxBxTxD, w_N, teacher, temps_N, targets_BxT, tmask_BxT):
  """kdjax.llm.train.head_kd.head_kd_sums of N students' hidden states and head weights against the
  teacher's (hidden states, head weight), on each device's own rows (head_nll.over_batch_shards).
  temps_N: the students' temperatures, or under a truncation knob its values (T = 1)."""
  layouts = (_layout(spec.model), _layout(spec.teacher))
  if spec.teacher_knob == "temperature":
    inv_temps_N, knob_N = 1.0 / temps_N, temps_N
  else:
    inv_temps_N, knob_N = jnp.ones_like(temps_N), temps_N
  rows = head_kd.chunk_rows(spec.platform, spec.model.hidden_size)
  fn = lambda *args: head_kd.head_kd_sums(spec.objective, *args, layouts, spec.teacher_knob, rows)
  return head_nll.over_batch_shards(
      fn, (x_NxBxTxD, w_N, *teacher, inv_temps_N, knob_N, targets_BxT,
           tmask_BxT.astype(jnp.float32)), (1, None, 0, None, None, None, 0, 0))


def _loss_sums(params, batch, teacher_params, spec: StepSpec, temperature=None,
               teacher_BxTxV=None):
  """(objective summed over target tokens, (nll sum, target count)) of one (micro-)batch.
  teacher_BxTxV: what the caller already has of the teacher (shared batches): its logits, or with
  spec.tempered_teacher its head inputs (teacher_head_inputs)."""
  ids_BxT, mask_BxT = batch["input_ids"], batch["attention_mask"].astype(bool)
  targets_BxT, tmask_BxT = _next_token_targets(ids_BxT, mask_BxT, batch.get("target_mask"))
  count = jnp.sum(tmask_BxT.astype(jnp.float32))
  if spec.teacher is None:
    # plain next-token training: the head and the cross-entropy fused (never forms the logits)
    w, layout = model.head_weight(spec.model, params)
    x_BxTxD = model.hidden_states(spec.model, params, ids_BxT, mask_BxT)
    nll_sum = head_nll.over_batch_shards(
        functools.partial(head_nll.head_nll_sum, w_layout=layout,
                          rows=head_nll.chunk_rows(spec.platform, spec.model.hidden_size)),
        (x_BxTxD, w, targets_BxT, tmask_BxT.astype(jnp.float32)), (0, None, 0, 0))
    return nll_sum, (nll_sum, count)
  if spec.tempered_teacher:
    # the heads and the loss fused by chunks of positions (kdjax.llm.train.head_kd): no [B, T, V] array
    if teacher_BxTxV is None:
      teacher_BxTxV = teacher_head_inputs(spec, teacher_params, batch)
    w, layout = model.head_weight(spec.model, params)
    x_BxTxD = model.hidden_states(spec.model, params, ids_BxT, mask_BxT)
    kd_1, nll_1 = _head_kd(spec, x_BxTxD[None], w[None], teacher_BxTxV,
                           jnp.reshape(temperature, (1,)), targets_BxT, tmask_BxT)
    return kd_1[0], (jax.lax.stop_gradient(nll_1[0]), count)
  logits_BxTxV = model.forward(spec.model, params, ids_BxT, mask_BxT)
  if teacher_BxTxV is None:
    teacher_BxTxV = teacher_logits(spec, teacher_params, batch)
  nll_sum = jnp.sum(jnp.where(tmask_BxT, _token_nll(logits_BxTxV, targets_BxT), 0.0))
  kd = kd_mean(spec, logits_BxTxV, teacher_BxTxV, tmask_BxT)
  return kd * count, (nll_sum, count)  # token-weighted sum: micro-batches add up exactly


# ----------------------------------------------------------------------------- gradients


def _accumulate(sums_and_grads, params, batch, k: int):
  """sums_and_grads(params, micro_batch) -> ((loss_sum, (nll_sum, count)), grads), summed over
  k interleaved micro-batches (row r goes to micro-batch r % k: each device's contiguous block of
  rows feeds every micro-batch, so no data moves between devices)."""
  if k == 1:
    return sums_and_grads(params, batch)

  def split(x_BxT):
    b = x_BxT.shape[0]
    return x_BxT.reshape((b // k, k) + x_BxT.shape[1:]).swapaxes(0, 1)

  micro = jax.tree.map(split, batch)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(sums_and_grads, params, first))

  def body(carry, mb):
    return jax.tree.map(jnp.add, carry, sums_and_grads(params, mb)), None

  return jax.lax.scan(body, zeros, micro)[0]


def _per_token(sums):
  """(loss, nll, count, grads) per target token from the accumulated sums."""
  (loss_sum, (nll_sum, count)), grads = sums
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
  return loss_sum / denom, nll_sum / denom, count, grads


def loss_and_grads(params, batch, teacher_params, spec: StepSpec, temperature=None):
  """Per-token loss and its gradient over the whole batch, accumulated over spec.grad_accum
  micro-batches (sums of losses and gradients, one division by the total token count)."""
  grad_fn = jax.value_and_grad(_loss_sums, has_aux=True)
  fn = lambda p, mb: grad_fn(p, mb, teacher_params, spec, temperature)
  return _per_token(_accumulate(fn, params, batch, spec.grad_accum))


def shared_loss_and_grads(params_N, batch, teacher_params, spec: StepSpec, temperatures_N):
  """loss_and_grads of N students on ONE batch [B, T] (student i at temperatures_N[i]): per
  micro-batch the teacher's body runs once, and its head once per chunk of positions, shared by
  the students (kdjax.llm.train.head_kd: each chunk's teacher logits, then each student's loss and
  gradients in turn); the students' bodies are vmapped. Every output has a leading student axis."""
  def sums(p_N, mb):
    ids_BxT, mask_BxT = mb["input_ids"], mb["attention_mask"].astype(bool)
    targets_BxT, tmask_BxT = _next_token_targets(ids_BxT, mask_BxT, mb.get("target_mask"))
    x_N = jax.vmap(lambda p: model.hidden_states(spec.model, p, ids_BxT, mask_BxT))(p_N)
    w_N = jax.vmap(lambda p: model.head_weight(spec.model, p)[0])(p_N)
    kd_N, nll_N = _head_kd(spec, x_N, w_N, teacher_head_inputs(spec, teacher_params, mb),
                           temperatures_N, targets_BxT, tmask_BxT)
    count = jnp.sum(tmask_BxT.astype(jnp.float32))
    return jnp.sum(kd_N), (kd_N, jax.lax.stop_gradient(nll_N), count)

  def fn(p_N, mb):
    (_, (kd_N, nll_N, count)), grads_N = jax.value_and_grad(sums, has_aux=True)(p_N, mb)
    return (kd_N, (nll_N, jnp.broadcast_to(count, kd_N.shape))), grads_N

  return jax.vmap(_per_token)(_accumulate(fn, params_N, batch, spec.grad_accum))


# ----------------------------------------------------------------------------- the step


def _apply(params, opt_state, rng, step, grads, lr_scale, spec: StepSpec):
  """The optimizer update of one model: (params, opt_state, rng, lr, grad_norm). lr_scale scales
  the whole AdamW update (decay included): AdamW at peak learning rate spec.lr x lr_scale."""
  updates, opt_state = make_optimizer(spec).update(grads, opt_state, params)
  if spec.lr_scales:
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
  params = optax.apply_updates(params, updates)
  rng = jax.random.fold_in(rng, step)  # advanced every step (for stochastic objectives later)
  lr = wsd_schedule(spec.lr, spec.total_steps, spec.warmup_frac, spec.decay_frac)(step)
  return params, opt_state, rng, lr * lr_scale, optax.global_norm(grads)


def _lr_scales(spec: StepSpec):
  """[N] (or a scalar for one model) of each model's learning-rate scale."""
  n = spec.num_students
  scales = spec.lr_scales or (1.0,) * (n or 1)
  return jnp.asarray(scales, jnp.float32) if n is not None else jnp.float32(scales[0])


def _update(params, opt_state, rng, step, batch, teacher_params, temperature, lr_scale,
            spec: StepSpec):
  """One model's step on its own batch: (params, opt_state, rng, metrics)."""
  loss, nll, count, grads = loss_and_grads(params, batch, teacher_params, spec, temperature)
  params, opt_state, rng, lr, gnorm = _apply(params, opt_state, rng, step, grads, lr_scale, spec)
  return params, opt_state, rng, {"loss": loss, "nll": nll, "tokens": count,
                                  "grad_norm": gnorm, "lr": lr}


def _shared_update(params, opt_state, rng, step, batch, teacher_params, temperatures, lr_scales,
                   spec):
  """N students' step on one shared batch (spec.shared_batch)."""
  loss, nll, count, grads = shared_loss_and_grads(params, batch, teacher_params, spec,
                                                  temperatures)
  apply = jax.vmap(functools.partial(_apply, spec=spec), in_axes=(0, 0, 0, None, 0, 0))
  params, opt_state, rng, lr, gnorm = apply(params, opt_state, rng, step, grads, lr_scales)
  return params, opt_state, rng, {"loss": loss, "nll": nll, "tokens": count,
                                  "grad_norm": gnorm, "lr": lr}


def train_step(state: dict, batch: dict, teacher_params, spec: StepSpec, temperatures=None):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit it with `spec` static.

  state = {step, params, opt_state, rng}; batch = {input_ids, attention_mask, optional
  target_mask (kdjax.llm.model.targets)} of shape [B, T] ([N, B, T] with N students: student i trains on
  batch[i]; [B, T] for all of them with spec.shared_batch). temperatures: the teachers' softmax
  temperatures of spec.tempered_teacher (a scalar, or [N] with students), else None.
  """
  if spec.shared_batch:
    update = functools.partial(_shared_update, spec=spec)
  else:
    update = functools.partial(_update, spec=spec)
    if spec.num_students is not None:
      t_axis = None if temperatures is None else 0
      update = jax.vmap(update, in_axes=(0, 0, 0, None, 0, None, t_axis, 0))
  params, opt_state, rng, metrics = update(state["params"], state["opt_state"], state["rng"],
                                           state["step"], batch, teacher_params, temperatures,
                                           _lr_scales(spec))
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics


def compile_train_step(spec: StepSpec, shardings, batch_sharding, teacher_shardings=None):
  """train_step jitted once: shardings in and out, the state donated. Called as
  step(state, batch, teacher_params), plus the temperatures when spec.tempered_teacher."""
  mesh = shardings["step"].mesh
  spec = dataclasses.replace(spec, platform=mesh.devices.flat[0].platform)

  def step(state, batch, teacher_params, *temperatures):
    with sharding_lib.use_mesh(mesh):  # the model's activation constraints follow this mesh
      return train_step(state, batch, teacher_params, spec, *temperatures)

  in_shardings = (shardings, batch_sharding, teacher_shardings)
  if spec.tempered_teacher:
    in_shardings += (shardings["step"],)  # replicated
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, None),
                 donate_argnums=(0,))


def _eval_sums(params, batch, spec: StepSpec):
  """(sum of target log-probs, target count) of a validation batch ([N] each with students)."""
  fn = functools.partial(evaluate.loglik_sums, spec.model)
  if spec.num_students is not None:
    fn = jax.vmap(fn, in_axes=(0, None, None, None))
  return fn(params, batch["input_ids"], batch["attention_mask"].astype(bool),
            batch.get("target_mask"))
