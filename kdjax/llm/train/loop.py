"""Training a causal LM (one model, or N students together under vmap), optionally distilling.

`train(cfg, workdir)` is the loop; each concern lives in its own module and is importable alone:

  * kdjax.llm.train.config: TrainConfig (the run), validate / preflight (one-line errors), the
    models and datasets it names, the workdir's identity.
  * kdjax.llm.train.step: StepSpec and the pure step (state, batch, teacher, temperatures) ->
    (state, metrics): next-token cross-entropy or a token-level KD objective (both models tempered
    by kd_temperature, or the teacher alone by one temperature per student), gradient accumulation,
    clipping, AdamW with a WSD schedule; N students vmapped, on their own batches or one shared.
  * kdjax.llm.train.state: the state {step, params, opt_state, rng} born sharded, its shardings,
    the restore target, start-or-resume, checksums.
  * kdjax.llm.train.batches: the batch source (dataset iterators at explicit positions, or the
    students' own samples keyed by (seed, step, student)).
  * kdjax.llm.train.eval: validation perplexity, best-model selection and export.
  * kdjax.llm.train.log: metrics read one step late, the non-finite stop, TensorBoard, progress.

The names the repository uses from here (StepSpec, TrainConfig, init_state, compile_train_step,
loss_and_grads, ...) are re-exported below.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from kdjax.llm.model import partition
from kdjax import checkpoint as ckpt_lib
from kdjax import distributed
from kdjax import sharding as sharding_lib
from kdjax.cli import atomic_write_json, require
from kdjax.llm import data as data_lib
from kdjax.llm.train.batches import DatasetBatches, OnPolicyBatches
from kdjax.llm.train.config import (  # noqa: F401 (re-exported)
    TrainConfig, _initial_model, _prepare, load_spec, preflight, resolve_dataset, validate)
from kdjax.llm.train.eval import Evaluator, Exporter, update_best
from kdjax.llm.train.log import MetricsLog
from kdjax.llm.train.state import (  # noqa: F401 (re-exported)
    _init_fn, _student_checksums, abstract_state, init_state, params_checksum, start_or_resume,
    state_shardings)
from kdjax.llm.train.step import (  # noqa: F401 (re-exported)
    StepSpec, _eval_sums, _loss_sums, _next_token_targets, _token_nll, compile_train_step,
    loss_and_grads, make_optimizer, shared_loss_and_grads, train_step, wsd_schedule)


# ----------------------------------------------------------------------------- setup


def _models(cfg: TrainConfig, mesh):
  """(student config, its initial params or None, teacher config or None, teacher host params)."""
  config, init_params = _initial_model(cfg.model, cfg.seed, mesh)
  config = config.replace(dtype=cfg.dtype, attention=cfg.attention, remat=cfg.remat)
  if not cfg.teacher:
    return config, init_params, None, None
  teacher_config, teacher_params = load_spec(cfg.teacher, cfg.seed + 1)
  teacher_config = teacher_config.replace(dtype=cfg.dtype, attention=cfg.attention)
  return config, init_params, teacher_config, jax.device_get(teacher_params)


def _datasets(cfg: TrainConfig, workdir: str, vocab_size: int):
  """(train iterators, one per train dir; validation rows: None, one set, or a list of one set
  per student)."""
  dirs = [resolve_dataset(s, workdir, vocab_size, cfg.seed + 1000 * i, f"train{i}")
          for i, s in enumerate(cfg.train_data)]
  streams = cfg.stream_ids() if len(dirs) > 1 else (0,)
  iters = [data_lib.BatchIterator(data_lib.load_dataset_dir(d, vocab_size, cfg.seq_len),
                                  cfg.batch_size, cfg.seq_len,
                                  seed=cfg.seed + s, pad_id=cfg.pad_id, name=f"--train_data {d}")
           for s, d in zip(streams, dirs)]
  val_rows = [data_lib.TokenRows(data_lib.load_dataset_dir(resolve_dataset(
      s, workdir, vocab_size, cfg.seed + 999_999 + 1000 * i, f"val{i or ''}"),
      vocab_size, cfg.seq_len))
      for i, s in enumerate(cfg.val_dirs)]
  for d, rows in zip(cfg.val_dirs, val_rows):
    require(cfg.eval_sequences <= len(rows), f"--eval_sequences={cfg.eval_sequences}: --val_data "
            f"{d} holds only {len(rows)} sequences")
  return iters, (val_rows if len(val_rows) > 1 else val_rows[0] if val_rows else None)


def step_spec(cfg: TrainConfig, config, teacher_config, total: int) -> StepSpec:
  """The StepSpec of a run: teacher_temperatures make the teacher-only tempered step, on one
  shared batch unless on-policy."""
  tempered = bool(cfg.teacher_temperatures)
  return StepSpec(model=config, total_steps=total, lr=cfg.lr, warmup_frac=cfg.warmup_frac,
                  decay_frac=cfg.decay_frac, weight_decay=cfg.weight_decay, clip=cfg.clip,
                  grad_accum=cfg.grad_accum, num_students=cfg.num_students,
                  teacher=teacher_config, objective=cfg.objective,
                  kd_temperature=cfg.kd_temperature, tempered_teacher=tempered,
                  teacher_knob=cfg.teacher_knob,
                  shared_batch=tempered and not cfg.onpolicy,
                  common_streams=cfg.common_random_numbers,
                  lr_scales=tuple(r / cfg.lr for r in cfg.learning_rates))


def batch_source(cfg: TrainConfig, spec: StepSpec, mesh, shardings, iters, positions):
  """(source(step, params) -> batch, its sharding)."""
  stacked = spec.num_students is not None and not spec.shared_batch
  bsharding = sharding_lib.batch_sharding(mesh, stacked)
  t = cfg.train_seq_len
  gshape = (spec.num_students, cfg.batch_size, t) if stacked else (cfg.batch_size, t)
  if cfg.onpolicy:  # GKD's lambda < 1: the rest of each batch p*'s rows (kdjax.llm.train.batches)
    pstar = (DatasetBatches(iters, False, positions, sharding_lib.batch_sharding(mesh),
                            (cfg.batch_size, t)) if cfg.student_data_fraction < 1 else None)
    return OnPolicyBatches(spec.model, shardings["params"], bsharding, seed=cfg.seed,
                           prompt=cfg.prompt, streams=cfg.stream_ids(),
                           batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                           eos_id=cfg.eos_id, pad_id=cfg.pad_id,
                           student_fraction=cfg.student_data_fraction, pstar=pstar), bsharding
  return DatasetBatches(iters, stacked, positions, bsharding, gshape), bsharding


def _place_teacher(teacher_config, teacher_params, mesh):
  """(teacher params on the mesh, their shardings); (None, None) without a teacher."""
  if teacher_config is None:
    return None, None
  tshard = partition.param_shardings(teacher_config, mesh)
  return jax.device_put(teacher_params, tshard), tshard


def _step_extras(cfg: TrainConfig, spec: StepSpec, mesh) -> tuple:
  """The step's arguments after (state, batch, teacher): the teachers' temperatures, if any."""
  if not spec.tempered_teacher:
    return ()
  temps = np.asarray(cfg.teacher_temperatures, np.float32)
  return (jax.device_put(temps, sharding_lib.replicated(mesh)),)


# ----------------------------------------------------------------------------- per-step hooks


def _due(every: int, step: int, total: int) -> bool:
  return bool(every and step % every == 0) or step == total


def _evaluate(step, params, meta, evaluator, exporter, log, students: bool) -> None:
  """Validation perplexities into meta and TensorBoard; improved students exported."""
  ppls = evaluator(params)
  meta["last_val_perplexity"] = ppls if students else ppls[0]
  for i, ppl in enumerate(ppls):
    log.scalar("val/perplexity" + (f"/{i}" if students else ""), ppl, step)
  for i in update_best(meta, ppls, step):
    exporter.export(params, i, step, ppls[i])
  logging.info("step %d: val perplexity %s", step, ppls)


def _save(checkpointer, step: int, state, meta: dict, source, log) -> None:
  meta.update(last_loss=log.last_loss, data_position=source.position(), step=step)
  checkpointer.save(step, state, json.loads(json.dumps(meta)))


def _summary(cfg, total, meta, state, start, t_start, mesh, workdir, last_loss) -> dict:
  n, students = cfg.num_students, cfg.num_students is not None
  per = lambda values: values if students else values[0]  # a list per student, or one value
  summary = {
      "steps": total,
      "final_loss": float(np.mean(last_loss)) if students else last_loss,
      "params_checksum": params_checksum(state["params"]),
      "num_students": n,
      "val_perplexity": meta.get("last_val_perplexity"),
      "best_val_perplexity": per(meta["best_val_perplexity"]),
      "best_step": per(meta["best_step"]),
      "best_dir": os.path.join(workdir, "best"),
      "tokens_per_step": cfg.batch_size * cfg.train_seq_len * (n or 1),
      "resumed_from_step": start if start else None,
      "train_seconds_this_run": round(time.perf_counter() - t_start, 3),
      "mesh": dict(mesh.shape),
      "process_count": jax.process_count(),
  }
  if students:
    summary["final_losses"] = last_loss
    summary["student_checksums"] = _student_checksums(state["params"], n)
  return summary


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, workdir: str, overwrite: bool = False) -> dict:
  """Train (or resume) and return the summary written to workdir/train_summary.json.

  Layout: workdir/config.json (the run's identity), checkpoints/<step>/ (orbax, last
  keep_checkpoints), best/ (or best/<i> per student: standalone model checkpoints, `ckpt:` specs),
  tb/ (TensorBoard), train_summary.json. Rerunning the same cfg resumes from the latest checkpoint;
  a finished run returns its summary without training.
  """
  mesh, eval_b = preflight(cfg)
  primary, workdir = jax.process_index() == 0, os.path.abspath(workdir)
  config, init_params, teacher_config, teacher_params = _models(cfg, mesh)
  iters, val_rows = _datasets(cfg, workdir, config.vocab_size)
  total = cfg.steps or cfg.epochs * min(it.steps_per_epoch for it in iters)
  _prepare(cfg, workdir, overwrite)  # inputs are valid: now the workdir may change
  spec = step_spec(cfg, config, teacher_config, total)
  students = spec.num_students is not None
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       keep=cfg.keep_checkpoints)
  state, shardings, meta, resumed = start_or_resume(spec, mesh, cfg.seed, init_params,
                                                    checkpointer)
  del init_params
  if resumed is not None and primary:
    print(f"resuming from {checkpointer.step_dir(resumed)} (step {resumed} of {total})", flush=True)
  teacher_params, tshard = _place_teacher(teacher_config, teacher_params, mesh)
  source, bsharding = batch_source(cfg, spec, mesh, shardings, iters, meta["data_position"])
  step_fn = compile_train_step(spec, shardings, bsharding, tshard)
  extras = _step_extras(cfg, spec, mesh)
  evaluator = None
  if val_rows is not None:
    evaluator = Evaluator(spec, mesh, shardings["params"], val_rows, eval_b, cfg.seq_len,
                          cfg.pad_id, cfg.eval_sequences)
  exporter = Exporter(workdir, config, mesh, students)
  start, t_start = int(jax.device_get(state["step"])), time.perf_counter()
  log = MetricsLog(workdir, total, start, students, cfg.log_every, cfg.progress,
                   meta["last_loss"], lambda: _last_good(checkpointer))
  for step in range(start + 1, total + 1):
    batch = source(step, state["params"])
    if cfg.debug_nan_at_step == step:
      state = dict(state, params=jax.tree.map(lambda p: p * jnp.nan, state["params"]))
    state, metrics = step_fn(state, batch, teacher_params, *extras)
    log.push(step, metrics)  # reads step N-1's metrics now that step N is queued
    do_eval = evaluator is not None and _due(cfg.eval_every, step, total)
    do_ckpt = _due(cfg.checkpoint_every, step, total)
    if do_eval or do_ckpt:
      log.drain()  # never evaluate or save a state whose loss was not checked finite
    if do_eval:
      _evaluate(step, state["params"], meta, evaluator, exporter, log, students)
    if do_ckpt:
      _save(checkpointer, step, state, meta, source, log)
  log.drain()
  log.close()
  checkpointer.close()
  if val_rows is None:  # without validation data the final parameters are the exported model
    for i in range(spec.num_students or 1):
      exporter.export(state["params"], i, total, None)
  summary = _summary(cfg, total, meta, state, start, t_start, mesh, workdir, log.last_loss)
  if primary:
    atomic_write_json(os.path.join(workdir, "train_summary.json"), summary)
  distributed.sync("kdjax_train_done")
  return summary


def _last_good(checkpointer) -> str:
  """The directory of the latest finished checkpoint (after pending saves land)."""
  checkpointer.wait()
  step = checkpointer.latest_step()
  return checkpointer.step_dir(step) if step is not None else "none (no checkpoint yet)"
