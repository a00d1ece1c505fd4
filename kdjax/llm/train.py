"""Training a causal LM (one model, or N students together under vmap), optionally distilling online.

The pieces, each a pure function of its inputs:
  * `train_step(state, batch, teacher_params, spec)` -> (state, metrics): next-token cross-entropy
    (or a token-level KD objective against a frozen teacher's logits), gradient accumulation over
    micro-batches weighted by tokens (so k micro-batches give exactly the full batch's loss and
    gradient), global-norm clipping, AdamW with a warm-up/stable/decay (WSD) schedule. With
    `spec.num_students = N` every leaf of state and batch has a leading student axis and the step is
    vmapped over it: N independent models trained in one compiled program.
  * `init_state` builds the state born sharded on the mesh (eval_shape -> shardings -> jit(init)).
  * `train(cfg, workdir)` is the loop: data, checkpoints (resume), evaluation, best-model export,
    TensorBoard, progress, NaN stop and DIR/train_summary.json.

The state is a dict {step, params, opt_state, rng}; the teacher never enters it (frozen, outside the
optimizer, never checkpointed with the students).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import checkpoint as ckpt_lib
from kdjax import distributed
from kdjax import sharding as sharding_lib
from kdjax.cli import UserError, atomic_write_json, prepare_workdir, require
from kdjax.llm import data as data_lib
from kdjax.llm import head_nll
from kdjax.llm import loading
from kdjax.llm import model
from kdjax.llm import targets
from kdjax.llm.config import LlamaConfig


# ----------------------------------------------------------------------------- the step


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
  kd_temperature: float = 1.0


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


def _next_token_targets(ids_BxT, mask_BxT, target_mask_BxT=None):
  """Position t predicts token t+1: targets shifted left; the loss mask is whether token t+1 is a
  target (kdjax.llm.targets; target_mask_BxT: the batch's, None: prompt length 1), the last
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


def _loss_sums(params, batch, teacher_params, spec: StepSpec):
  """(objective summed over target tokens, (nll sum, target count)) of one (micro-)batch."""
  ids_BxT, mask_BxT = batch["input_ids"], batch["attention_mask"].astype(bool)
  targets_BxT, tmask_BxT = _next_token_targets(ids_BxT, mask_BxT, batch.get("target_mask"))
  count = jnp.sum(tmask_BxT.astype(jnp.float32))
  if spec.teacher is None:
    # plain next-token training: the head and the cross-entropy fused (never forms the logits)
    w, layout = model.head_weight(spec.model, params)
    nll_sum = head_nll.head_nll_sum(model.hidden_states(spec.model, params, ids_BxT, mask_BxT),
                                    w, targets_BxT, tmask_BxT.astype(jnp.float32), layout)
    return nll_sum, (nll_sum, count)
  logits_BxTxV = model.forward(spec.model, params, ids_BxT, mask_BxT)
  nll_sum = jnp.sum(jnp.where(tmask_BxT, _token_nll(logits_BxTxV, targets_BxT), 0.0))
  from kdjax.objectives import tokens
  teacher_BxTxV = jax.lax.stop_gradient(
      model.forward(spec.teacher, teacher_params, ids_BxT, mask_BxT))
  kd_mean = tokens.by_name(spec.objective)(logits_BxTxV, teacher_BxTxV, tmask_BxT,
                                           spec.kd_temperature)
  return kd_mean * count, (nll_sum, count)  # token-weighted sum: micro-batches add up exactly


def loss_and_grads(params, batch, teacher_params, spec: StepSpec):
  """Per-token loss and its gradient over the whole batch, accumulated over spec.grad_accum
  micro-batches (sums of losses and gradients, one division by the total token count)."""
  k = spec.grad_accum
  grad_fn = jax.value_and_grad(_loss_sums, has_aux=True)
  if k == 1:
    (loss_sum, (nll_sum, count)), grads = grad_fn(params, batch, teacher_params, spec)
  else:
    # Interleaved micro-batches (row r goes to micro-batch r % k): each device's contiguous block
    # of rows feeds every micro-batch, so no data moves between devices.
    def split(x_BxT):
      b = x_BxT.shape[0]
      return x_BxT.reshape((b // k, k) + x_BxT.shape[1:]).swapaxes(0, 1)
    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      (l, (n, c)), g = grad_fn(params, mb, teacher_params, spec)
      gsum, lsum, nsum, csum = carry
      return (jax.tree.map(jnp.add, gsum, g), lsum + l, nsum + n, csum + c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero = jnp.zeros((), jnp.float32)
    (grads, loss_sum, nll_sum, count), _ = jax.lax.scan(body, (zeros, zero, zero, zero), micro)
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
  return loss_sum / denom, nll_sum / denom, count, grads


def _update(params, opt_state, rng, step, batch, teacher_params, spec: StepSpec):
  loss, nll, count, grads = loss_and_grads(params, batch, teacher_params, spec)
  tx = make_optimizer(spec)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  rng = jax.random.fold_in(rng, step)  # advanced every step (for stochastic objectives later)
  lr = wsd_schedule(spec.lr, spec.total_steps, spec.warmup_frac, spec.decay_frac)(step)
  metrics = {"loss": loss, "nll": nll, "tokens": count, "grad_norm": optax.global_norm(grads),
             "lr": lr}
  return params, opt_state, rng, metrics


def train_step(state: dict, batch: dict, teacher_params, spec: StepSpec):
  """One optimizer step: (state, batch) -> (state, metrics). Pure; jit it with `spec` static.

  state = {step, params, opt_state, rng}; batch = {input_ids, attention_mask, optional
  target_mask (kdjax.llm.targets)} of shape [B, T] ([N, B, T] with N students: student i trains on
  batch[i]).
  """
  update = functools.partial(_update, spec=spec)
  if spec.num_students is not None:
    update = jax.vmap(update, in_axes=(0, 0, 0, None, 0, None))
  params, opt_state, rng, metrics = update(state["params"], state["opt_state"], state["rng"],
                                           state["step"], batch, teacher_params)
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics


def _eval_sums(params, batch, spec: StepSpec):
  from kdjax.llm import evaluate
  fn = functools.partial(evaluate.loglik_sums, spec.model)
  if spec.num_students is not None:
    fn = jax.vmap(fn, in_axes=(0, None, None, None))
  return fn(params, batch["input_ids"], batch["attention_mask"].astype(bool),
            batch.get("target_mask"))


# ----------------------------------------------------------------------------- state and shardings


def _init_fn(spec: StepSpec, key, params=None):
  """The initial state from a PRNG key (random init: student i from fold_in(key, i)) or params."""
  tx = make_optimizer(spec)
  n = spec.num_students
  if params is None:
    if n is None:
      params = model.init_params(spec.model, jax.random.fold_in(key, 0))
    else:
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
      params = jax.vmap(lambda k: model.init_params(spec.model, k))(keys)
  elif n is not None:
    params = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), params)
  opt_state = tx.init(params) if n is None else jax.vmap(tx.init)(params)
  rng = jax.random.fold_in(key, 1 << 20)  # raw uint32[2] key: plain data in checkpoints
  if n is not None:
    rng = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": rng}


def _path_key(path) -> tuple:
  return tuple(str(k) for k in path)


def state_shardings(spec: StepSpec, mesh, abstract_state):
  """Shardings of the whole state: params by the logical-axis table, optimizer moments like the
  parameter they belong to (matched by tree path and shape), everything else replicated."""
  pshard = sharding_lib.param_shardings(spec.model, mesh, spec.num_students)
  by_path = {}
  for (path, s), a in zip(jax.tree_util.tree_flatten_with_path(pshard)[0],
                          jax.tree.leaves(abstract_state["params"])):
    by_path[_path_key(path)] = (s, a.shape)
  rep = sharding_lib.replicated(mesh)

  def opt_leaf(path, leaf):
    key = _path_key(path)
    for n in range(len(key), 0, -1):
      hit = by_path.get(key[-n:])
      if hit is not None and hit[1] == leaf.shape:
        return hit[0]
    return rep

  return {"step": rep, "params": pshard,
          "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"]),
          "rng": rep}


def init_state(spec: StepSpec, mesh, seed: int, params=None):
  """(state, shardings): the initial state, born sharded on `mesh`."""
  key = jax.random.PRNGKey(seed)
  abstract = jax.eval_shape(functools.partial(_init_fn, spec), key, params)
  shardings = state_shardings(spec, mesh, abstract)
  init = jax.jit(functools.partial(_init_fn, spec), out_shardings=shardings)
  return init(key, params), shardings


def abstract_state(spec: StepSpec, shardings):
  """ShapeDtypeStructs (with shardings) of the state: the restore target."""
  abstract = jax.eval_shape(functools.partial(_init_fn, spec), jax.random.PRNGKey(0), None)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def compile_train_step(spec: StepSpec, shardings, batch_sharding, teacher_shardings=None):
  """train_step jitted once: shardings in and out, the state donated."""
  step = functools.partial(train_step, spec=spec)
  return jax.jit(step, in_shardings=(shardings, batch_sharding, teacher_shardings),
                 out_shardings=(shardings, None), donate_argnums=(0,))


# ----------------------------------------------------------------------------- checksums


def _host_leaves(tree) -> list[np.ndarray]:
  leaves = jax.tree.leaves(tree)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    leaves = [multihost_utils.process_allgather(x, tiled=True) for x in leaves]
  return [np.asarray(jax.device_get(x)) for x in leaves]


def params_checksum(params) -> str:
  """sha256 over the float32 bytes of the parameter leaves in tree order (collective)."""
  h = hashlib.sha256()
  for leaf in _host_leaves(params):
    h.update(np.ascontiguousarray(leaf, dtype=np.float32).tobytes())
  return h.hexdigest()


def _student_checksums(params, n: int) -> list[str]:
  leaves = _host_leaves(params)
  out = []
  for i in range(n):
    h = hashlib.sha256()
    for leaf in leaves:
      h.update(np.ascontiguousarray(leaf[i], dtype=np.float32).tobytes())
    out.append(h.hexdigest())
  return out


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. train_data: one dataset dir per student (several = N students, vmapped);
  `synthetic:N` = N random sequences generated from the seed into the workdir."""
  model: str = "preset:test-tiny"
  train_data: tuple = ()
  val_data: str = ""
  teacher: str = ""
  objective: str = "fkl"
  kd_temperature: float = 1.0
  batch_size: int = 16
  seq_len: int = 128
  steps: int = 0                 # total optimizer steps; 0: use epochs
  epochs: int = 0
  lr: float = 5e-4
  warmup_frac: float = 0.01
  decay_frac: float = 0.2
  weight_decay: float = 0.0
  clip: float = 1.0
  grad_accum: int = 1
  dtype: str = "float32"
  mesh: str = ""                 # "data=2,fsdp=2,tensor=1"; default: all devices on data
  eval_every: int = 0            # steps between validations (0: only at the end)
  eval_batch_size: int = 0       # 0: batch_size
  checkpoint_every: int = 0      # steps between checkpoints (0: only at the end)
  keep_checkpoints: int = 2
  seed: int = 0
  pad_id: int = 0
  log_every: int = 10
  progress: bool = True
  force_students: bool = False   # a student axis even with one train dataset (tests, pipeline)
  debug_nan_at_step: int = 0     # testing only: poison the params before this step (1-based)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["train_data"] = list(self.train_data)
    for k in ("progress", "log_every", "debug_nan_at_step"):  # not part of the run's identity
      d.pop(k)
    return d


def validate(cfg: TrainConfig) -> None:
  require(len(cfg.train_data) >= 1, "--train_data is required (a dataset dir, comma list, or synthetic:N)")
  require(cfg.batch_size >= 1, f"--batch_size={cfg.batch_size} must be >= 1")
  require(cfg.seq_len >= 2, f"--seq_len={cfg.seq_len} must be >= 2")
  require(cfg.steps >= 0 and cfg.epochs >= 0, "--steps and --epochs must be >= 0")
  require((cfg.steps > 0) != (cfg.epochs > 0), "give exactly one of --steps or --epochs (> 0)")
  require(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr={cfg.lr} must be a positive number")
  require(0 <= cfg.warmup_frac <= 1, f"--warmup_frac={cfg.warmup_frac} must be in [0, 1]")
  require(0 <= cfg.decay_frac <= 1, f"--decay_frac={cfg.decay_frac} must be in [0, 1]")
  require(cfg.warmup_frac + cfg.decay_frac <= 1, "--warmup_frac + --decay_frac must be <= 1")
  require(cfg.weight_decay >= 0, f"--weight_decay={cfg.weight_decay} must be >= 0")
  require(cfg.clip >= 0, f"--clip={cfg.clip} must be >= 0 (0 disables clipping)")
  require(cfg.grad_accum >= 1, f"--grad_accum={cfg.grad_accum} must be >= 1")
  require(cfg.batch_size % cfg.grad_accum == 0,
          f"--batch_size={cfg.batch_size} is not a multiple of --grad_accum={cfg.grad_accum}")
  require(cfg.dtype in ("float32", "bfloat16", "float16"),
          f"--dtype={cfg.dtype!r}: expected float32, bfloat16 or float16")
  require(cfg.kd_temperature > 0, f"--kd_temperature={cfg.kd_temperature} must be > 0")
  require(cfg.eval_every >= 0 and cfg.checkpoint_every >= 0,
          "--eval_every and --checkpoint_every must be >= 0")
  require(cfg.keep_checkpoints >= 1, "--keep_checkpoints must be >= 1")
  require(cfg.eval_batch_size >= 0, "--eval_batch_size must be >= 0")
  if cfg.teacher:
    from kdjax.objectives import tokens
    tokens.by_name(cfg.objective)  # one-line error for an unknown objective


def load_spec(spec: str, seed: int = 0):
  """(config, params) of a model spec (kdjax.llm.loading, the one parser of specs); a preset
  without @SEED is initialised from `seed`."""
  return loading.load_model(spec, default_seed=seed)


def _initial_model(spec: str, seed: int, mesh):
  """(config, initial params) of the model to train. `preset:NAME`: params None (init_state draws
  them born sharded from --seed); `preset:NAME@SEED`: the init that spec names everywhere, born
  sharded on the mesh; other specs: host copies (identical on every process) that init_state
  places on the mesh."""
  if loading.parse_spec(spec)[0] == "preset":
    config, preset_seed = loading.parse_preset(spec)
    if preset_seed is None:
      return config, None
    shardings = sharding_lib.param_shardings(config, mesh)
    return config, loading.init_preset(config, preset_seed, shardings)
  config, params = load_spec(spec, seed)
  return config, jax.device_get(params)


def preflight(cfg: TrainConfig):
  """Everything checkable before data or weights are read: the flags, the mesh and the batch sizes
  it must divide, the model specs (kdjax.llm.loading.validate_spec) and the teacher's vocabulary.
  Returns (mesh, eval batch size). The SmolLM2 study runs it on each of its training runs first."""
  validate(cfg)
  mesh = sharding_lib.make_mesh(*sharding_lib.parse_mesh(cfg.mesh))
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  require(cfg.batch_size % batch_shards == 0,
          f"--batch_size={cfg.batch_size} is not a multiple of data x fsdp = {batch_shards}")
  eval_b = cfg.eval_batch_size or cfg.batch_size
  require(eval_b % batch_shards == 0,
          f"--eval_batch_size={eval_b} is not a multiple of data x fsdp = {batch_shards}")
  config = loading.validate_spec(cfg.model)
  if cfg.teacher:
    teacher = loading.validate_spec(cfg.teacher)
    require(teacher.vocab_size == config.vocab_size,
            f"--teacher vocabulary {teacher.vocab_size} != student vocabulary {config.vocab_size}")
  return mesh, eval_b


def resolve_dataset(spec: str, workdir: str, vocab_size: int, seed: int, name: str) -> str:
  """A dataset dir; `synthetic:N` is generated (deterministically from seed) into the workdir."""
  if not spec.startswith("synthetic:"):
    return spec
  try:
    n = int(spec.split(":", 1)[1])
  except ValueError:
    raise UserError(f"{spec!r}: expected synthetic:N with N an integer") from None
  require(n >= 1, f"{spec!r}: N must be >= 1")
  directory = os.path.join(workdir, "data", f"{name}-synthetic-{n}-seed{seed}")
  if jax.process_index() == 0 and data_lib.num_complete_shards(directory) == 0:
    data_lib.ShardWriter(directory).write(data_lib.synthetic_sequences(n, vocab_size, seed))
  distributed.sync("kdjax_synthetic_data")
  return directory


def _fmt_step_dir(checkpointer, step):
  return checkpointer.step_dir(step) if step is not None else "none (no checkpoint yet)"


def train(cfg: TrainConfig, workdir: str, overwrite: bool = False) -> dict:
  """Train (or resume) and return the summary written to workdir/train_summary.json.

  Layout: workdir/config.json (the run's identity), checkpoints/<step>/ (orbax, last
  keep_checkpoints), best/ (or best/<i> per student: standalone model checkpoints, `ckpt:` specs),
  tb/ (TensorBoard), train_summary.json. Rerunning the same cfg resumes from the latest checkpoint;
  a finished run returns its summary without training.
  """
  mesh, eval_b = preflight(cfg)
  primary = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  # --- models
  config, init_params = _initial_model(cfg.model, cfg.seed, mesh)
  config = config.replace(dtype=cfg.dtype)
  teacher_config, teacher_params = None, None
  if cfg.teacher:
    teacher_config, teacher_params = load_spec(cfg.teacher, cfg.seed + 1)
    teacher_params = jax.device_get(teacher_params)
    teacher_config = teacher_config.replace(dtype=cfg.dtype)

  # --- data
  n_data = len(cfg.train_data)
  num_students = n_data if (n_data > 1 or cfg.force_students) else None
  train_dirs = [resolve_dataset(s, workdir, config.vocab_size, cfg.seed + 1000 * i, f"train{i}")
                for i, s in enumerate(cfg.train_data)]
  iters = [data_lib.BatchIterator(data_lib.load_dataset_dir(d), cfg.batch_size, cfg.seq_len,
                                  seed=cfg.seed + i, pad_id=cfg.pad_id, name=f"--train_data {d}")
           for i, d in enumerate(train_dirs)]
  val_rows = None
  if cfg.val_data:
    val_dir = resolve_dataset(cfg.val_data, workdir, config.vocab_size, cfg.seed + 999_999, "val")
    val_rows = data_lib.TokenRows(data_lib.load_dataset_dir(val_dir))
  total = cfg.steps or cfg.epochs * min(it.steps_per_epoch for it in iters)
  _prepare(cfg, workdir, overwrite)  # inputs are valid: now the workdir may change

  # --- step, state
  spec = StepSpec(model=config, total_steps=total, lr=cfg.lr, warmup_frac=cfg.warmup_frac,
                  decay_frac=cfg.decay_frac, weight_decay=cfg.weight_decay, clip=cfg.clip,
                  grad_accum=cfg.grad_accum, num_students=num_students, teacher=teacher_config,
                  objective=cfg.objective, kd_temperature=cfg.kd_temperature)
  students = num_students is not None
  bsharding = sharding_lib.batch_sharding(mesh, students)
  tshard = None
  if teacher_params is not None:
    tshard = sharding_lib.param_shardings(teacher_config, mesh)
    teacher_params = jax.device_put(teacher_params, tshard)

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=cfg.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is None:
    state, shardings = init_state(spec, mesh, cfg.seed, init_params)
    meta = {"best_val_perplexity": [None] * (num_students or 1),
            "best_step": [None] * (num_students or 1), "last_loss": None,
            "last_val_perplexity": None}
    positions = [[0, 0] for _ in iters]
  else:
    abstract = jax.eval_shape(functools.partial(_init_fn, spec), jax.random.PRNGKey(0), None)
    shardings = state_shardings(spec, mesh, abstract)
    state, meta = checkpointer.restore(latest, abstract_state(spec, shardings))
    positions = [list(p) for p in meta["data_position"]]
    if primary:
      print(f"resuming from {checkpointer.step_dir(latest)} (step {latest} of {total})", flush=True)
  del init_params
  step_fn = compile_train_step(spec, shardings, bsharding, tshard)
  eval_fn = jax.jit(functools.partial(_eval_sums, spec=spec),
                    in_shardings=(shardings["params"], sharding_lib.batch_sharding(mesh)))

  b = cfg.batch_size
  gshape = (num_students, b, cfg.seq_len) if students else (b, cfg.seq_len)
  local_rows = data_lib.process_rows(bsharding, gshape, 1 if students else 0)
  eval_sharding = sharding_lib.batch_sharding(mesh)
  eval_rows = data_lib.process_rows(eval_sharding, (eval_b, cfg.seq_len), 0)

  def make_batch():
    parts = [it.local_batch(e, i, local_rows) for it, (e, i) in zip(iters, positions)]
    for it, pos in zip(iters, positions):  # advance the data position
      pos[1] += 1
      if pos[1] == it.steps_per_epoch:
        pos[0], pos[1] = pos[0] + 1, 0
    local = parts[0] if not students else {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    return data_lib.global_batch(local, bsharding, gshape)

  def evaluate_now():
    sums = None
    for batch in data_lib.eval_batches(val_rows, eval_b, cfg.seq_len, cfg.pad_id):
      local = {k: v[eval_rows] for k, v in batch.items()}
      s = eval_fn(state["params"], data_lib.global_batch(local, eval_sharding, (eval_b, cfg.seq_len)))
      sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
    total_lp, count = (np.atleast_1d(np.asarray(x, np.float64)) for x in jax.device_get(sums))
    return [float(math.exp(-t / max(c, 1.0))) for t, c in zip(total_lp, count)]

  take_student = jax.jit(lambda p, i: jax.tree.map(lambda x: x[i], p),
                         out_shardings=sharding_lib.param_shardings(config, mesh))

  def export_best(i, step, ppl):
    params = state["params"] if not students else take_student(state["params"], i)
    target = os.path.join(workdir, "best") if not students else os.path.join(workdir, "best", str(i))
    ckpt_lib.export_model(target, config, params, {"step": step, "val_perplexity": ppl,
                                                   "student": i if students else None})

  writer = None
  if primary:
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(os.path.join(workdir, "tb"))
  from tqdm import tqdm
  start = int(jax.device_get(state["step"]))
  bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
             disable=not (primary and cfg.progress), desc=os.path.basename(workdir) or "train")
  pending = []   # (step, metrics) dispatched but not yet read
  clock = [time.perf_counter(), 0.0]  # (last time, tokens since)
  t_start = time.perf_counter()
  tokens_seen = 0.0

  def read(step, metrics):
    nonlocal tokens_seen
    m = jax.device_get(metrics)
    loss = np.atleast_1d(np.asarray(m["loss"], np.float64))
    gnorm = np.atleast_1d(np.asarray(m["grad_norm"], np.float64))
    if not (np.all(np.isfinite(loss)) and np.all(np.isfinite(gnorm))):
      checkpointer.wait()
      good = checkpointer.latest_step()
      what = "loss" if not np.all(np.isfinite(loss)) else "gradient norm"
      bar.close()
      raise UserError(
          f"non-finite {what} ({loss.tolist() if what == 'loss' else gnorm.tolist()}) at step "
          f"{step}: training stopped; the last good checkpoint "
          f"{_fmt_step_dir(checkpointer, good)} is kept untouched")
    meta["last_loss"] = loss.tolist() if students else float(loss[0])
    toks = float(np.sum(m["tokens"]))
    tokens_seen += toks
    clock[1] += toks
    now = time.perf_counter()
    if writer is not None and (step % cfg.log_every == 0 or step == total):
      writer.add_scalar("train/lr", float(np.atleast_1d(m["lr"])[0]), step)
      for i, l in enumerate(loss):
        suffix = f"/{i}" if students else ""
        writer.add_scalar("train/loss" + suffix, float(l), step)
        writer.add_scalar("train/grad_norm" + suffix, float(gnorm[i]), step)
    if now - clock[0] > 1.0 or step == total:
      bar.set_postfix(loss=f"{float(np.mean(loss)):.4f}", tok_s=f"{clock[1] / (now - clock[0]):.0f}")
      clock[0], clock[1] = now, 0.0
    bar.update(1)

  def drain():
    while pending:
      read(*pending.pop(0))

  for step in range(start + 1, total + 1):
    batch = make_batch()
    if cfg.debug_nan_at_step == step:
      state = dict(state, params=jax.tree.map(lambda p: p * jnp.nan, state["params"]))
    state, metrics = step_fn(state, batch, teacher_params)
    pending.append((step, metrics))
    while len(pending) > 1:  # step N is queued before step N-1's metrics are read
      read(*pending.pop(0))
    do_eval = val_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                        or step == total)
    do_ckpt = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total
    if do_eval or do_ckpt:
      drain()  # never evaluate or save a state whose loss was not checked finite
    if do_eval:
      ppls = evaluate_now()
      meta["last_val_perplexity"] = ppls if students else ppls[0]
      for i, ppl in enumerate(ppls):
        if writer is not None:
          writer.add_scalar("val/perplexity" + (f"/{i}" if students else ""), ppl, step)
        best = meta["best_val_perplexity"][i]
        if best is None or ppl < best:
          meta["best_val_perplexity"][i], meta["best_step"][i] = ppl, step
          export_best(i, step, ppl)
      logging.info("step %d: val perplexity %s", step, ppls)
    if do_ckpt:
      meta["data_position"] = positions
      meta["step"] = step
      checkpointer.save(step, state, json.loads(json.dumps(meta)))
  drain()
  bar.close()
  checkpointer.close()
  if writer is not None:
    writer.close()

  # --- without validation data the final parameters are the exported model
  n = num_students or 1
  if val_rows is None:
    for i in range(n):
      export_best(i, total, None)

  summary = {
      "steps": total,
      "final_loss": (float(np.mean(meta["last_loss"])) if students else meta["last_loss"]),
      "params_checksum": params_checksum(state["params"]),
      "num_students": num_students,
      "val_perplexity": meta.get("last_val_perplexity"),
      "best_val_perplexity": meta["best_val_perplexity"] if students else meta["best_val_perplexity"][0],
      "best_step": meta["best_step"] if students else meta["best_step"][0],
      "best_dir": os.path.join(workdir, "best"),
      "tokens_per_step": cfg.batch_size * cfg.seq_len * n,
      "resumed_from_step": start if start else None,
      "train_seconds_this_run": round(time.perf_counter() - t_start, 3),
      "mesh": dict(mesh.shape),
      "process_count": jax.process_count(),
  }
  if students:
    summary["final_losses"] = meta["last_loss"]
    summary["student_checksums"] = _student_checksums(state["params"], num_students)
  if primary:
    atomic_write_json(os.path.join(workdir, "train_summary.json"), summary)
  distributed.sync("kdjax_train_done")
  return summary


def _prepare(cfg: TrainConfig, workdir: str, overwrite: bool) -> bool:
  """Record cfg in the workdir (process 0); a new or overwritten config clears stale outputs."""
  same = 0
  if jax.process_index() == 0:
    same = int(prepare_workdir(workdir, cfg.to_dict(), overwrite))
    if not same:
      for name in ("checkpoints", "best", "tb", "train_summary.json"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.unlink(path)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    same = int(multihost_utils.broadcast_one_to_all(np.int32(same)))
  return bool(same)
