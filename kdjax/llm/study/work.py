"""What one unit of the study's work does (kdjax.llm.study.pipeline runs the units): bookkeeping of a
unit's directory (DONE.json, written by process 0), stage timing, seed keys, sampling a dataset
shard by shard (shards dealt across processes), scoring a dataset (batches dealt across processes,
totals summed), training a run. Every function here runs on every process of a multi-process
launch and meets the others at barriers (kdjax.distributed.sync) where files change hands.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from kdjax import cli, distributed
from kdjax.cli import UserError
from kdjax.llm import data
from kdjax.llm.dataset_record import verify_dataset_dir
from kdjax.llm.model import embeddings, evaluate, sample_rows
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.study.records import DONE
from kdjax.llm.train import loop as trainlib
from kdjax.llm.train.state import params_checksum
from kdjax.llm.weights import loading

# ----------------------------------------------------------------------------- bookkeeping


def is_done(path: str) -> bool:
  return os.path.exists(os.path.join(path, DONE))


def mark_done(path: str, info: dict) -> None:
  """Write DONE.json (process 0 only: every process reaches the same point with the same info)."""
  if jax.process_index() == 0:
    cli.atomic_write_json(os.path.join(path, DONE), info)


@contextlib.contextmanager
def stage(workdir: str, name: str, timings: dict):
  """Log a stage's start and time; record wall and process-CPU seconds in DIR/timings.json (CPU
  seconds say how long a stage takes when the machine is shared: wall ~ CPU / cores when alone)."""
  logging.info("stage %s: start", name)
  t0, c0 = time.perf_counter(), time.process_time()
  yield
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  before = timings.get(name, {"wall_s": 0.0, "cpu_s": 0.0})  # a stage run in two passes adds up
  wall, cpu = wall + before["wall_s"], cpu + before["cpu_s"]
  timings[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
  logging.info("stage %s: %.1f s (%.1f CPU s)", name, wall, cpu)
  if jax.process_index():
    return
  path = os.path.join(workdir, "timings.json")
  old = cli.read_json(path) if os.path.exists(path) else {}
  old.update(timings)
  cli.atomic_write_json(path, old)


def seed_key(seed: int, *path: int) -> jax.Array:
  """fold_in chain from the seed: one independent stream per (purpose, index, ...)."""
  key = jax.random.key(seed)
  for i in path:
    key = jax.random.fold_in(key, i)
  return key


# ----------------------------------------------------------------------------- models and data


def data_parallel(params, batch: int):
  """Params replicated on every local device and a sharding that splits a batch over them, so
  sampling and scoring use all devices; (params, None) on one device or an indivisible batch."""
  devices = jax.local_devices()
  if len(devices) == 1 or batch % len(devices):
    return params, None
  mesh = Mesh(np.array(devices), ("data",))
  return jax.device_put(params, NamedSharding(mesh, P())), NamedSharding(mesh, P("data"))


def _put(x, sharding):
  return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)


def load_dataset(path: str):
  """A dataset directory as one datasets.Dataset (UserError naming it when missing or empty)."""
  return data.load_dataset_dir(path)


def _device_batches(ds, batch: int, seq_len: int, shard, desc: str, me: int = 0, procs: int = 1):
  """The scoring batches of a dataset that process `me` of `procs` takes (batch i when
  i % procs == me), placed on its devices, behind a progress bar."""
  mine = (b for i, b in enumerate(data.eval_batches(ds, batch, seq_len)) if i % procs == me)
  total = len(range(me, math.ceil(len(ds) / batch), procs))
  return tqdm(({k: _put(v, shard) for k, v in b.items()} for b in mine), total=total, desc=desc,
              unit="batch", leave=False)


def mean_loglik(config, params, ds, batch: int, seq_len: int, desc: str) -> float:
  """Mean per-token log-likelihood of a dataset under a model: sum of next-token log-probs over
  the generated tokens (kdjax.llm.model.targets) / their number (the paper's precision and recall).

  With several processes, batch i is scored by process i % P on its own devices and the totals are
  summed over processes (in float64: the same figure, to rounding, whatever the process count)."""
  params, shard = data_parallel(params, batch)
  batches = _device_batches(ds, batch, seq_len, shard, desc, jax.process_index(),
                            jax.process_count())
  total, count = distributed.sum_over_processes(
      evaluate.loglik_totals(config, params, batches))
  if count == 0:
    raise UserError(f"{desc}: no target tokens to evaluate (no sequence has a token after its "
                    "prompt)")
  return float(total / count)


def loglik_and_embeddings(config, params, ds, batch: int, seq_len: int, desc: str,
                          loglik: bool = True):
  """(mean_loglik's number, or None without loglik; the rows' embeddings [N, D]) in one forward
  pass per batch (kdjax.llm.model.embeddings), batched and spread over devices as mean_loglik."""
  params, shard = data_parallel(params, batch)
  batches = _device_batches(ds, batch, seq_len, shard, desc)
  try:
    return embeddings.loglik_sums_and_embeddings(config, params, batches, len(ds), loglik)
  except ValueError as e:
    raise UserError(f"{desc}: {e}") from None


# ----------------------------------------------------------------------------- sampling


def sample_dataset(out_dir: str, config, params, prompt: list[int], tokenizer, key, *,
                   num: int, temperature: float, cfg: StudyConfig, eos_id: Optional[int],
                   desc: str, draw_kwargs: Optional[dict] = None) -> None:
  """Sample `num` sequences into out_dir, shard by shard; shard i uses fold_in(key, i).

  Row r of shard i is row r % R of chunk r // R, drawn from fold_in(fold_in(key, i), r // R) by
  one device running the sampler on R = --sample_batch_size rows (kdjax.llm.model.sample_rows),
  so a shard's samples are a function of its key, R and the params alone: the same tokens, bit
  for bit, on any number of devices and processes. Shard i is sampled by process i % P; a process
  deals the chunks of its shards to its devices, one chunk per device per call, and writes a
  shard when its chunks are in. Resumes from the shards already complete; marks out_dir done when
  all are written. draw_kwargs: sampler keywords (top_k, top_p, ...) for sampling.sample.
  """
  if is_done(out_dir):
    return
  shards = math.ceil(num / cfg.shard_size)
  me, procs = jax.process_index(), jax.process_count()
  if me == 0:
    data.ShardWriter(out_dir)  # clears a killed writer's leftovers before anyone writes
  distributed.sync("kdjax_sample_start")
  complete = data.complete_shards(out_dir)
  todo = [i for i in range(shards) if i % procs == me and i not in complete]
  rows = lambda i: min(cfg.shard_size, num - i * cfg.shard_size)
  sampler = sample_rows.ChunkSampler(config, params, prompt, rows_per_device=cfg.sample_batch_size,
                                     max_new_tokens=cfg.max_new_tokens, eos_id=eos_id,
                                     draw_kwargs=draw_kwargs)
  chunks = [(i, c) for i in todo for c in range(math.ceil(rows(i) / sampler.rows))]
  writer = data.ShardWriter(out_dir, cleanup=False)
  bar = tqdm(total=num * cfg.max_new_tokens,
             initial=(num - sum(rows(i) for i in todo)) * cfg.max_new_tokens, desc=desc,
             unit="tok", unit_scale=True, smoothing=0.1)
  pending = {i: [] for i in todo}  # shard -> its chunks' rows so far, in chunk order
  for g in range(0, len(chunks), sampler.devices):
    group = chunks[g:g + sampler.devices]
    out = sampler([sample_rows.chunk_key(jax.random.fold_in(key, i), c) for i, c in group],
                  temperature)
    for k, (i, c) in enumerate(group):
      lo, n = k * sampler.rows, min(sampler.rows, rows(i) - c * sampler.rows)
      pending[i] += [prompt + out.tokens_BxN[lo + r, :out.lengths_B[lo + r]].tolist()
                     for r in range(n)]
      bar.update(n * cfg.max_new_tokens)
      if len(pending[i]) == rows(i):
        ids_rows = pending.pop(i)
        writer.write(ids_rows, [tokenizer.decode(ids) for ids in ids_rows],
                     prompt_lens=[len(prompt)] * len(ids_rows), index=i)
  bar.close()
  distributed.sync("kdjax_sample_done")  # every shard written before the directory is done
  record = verify_dataset_dir(out_dir) if me == 0 else None
  mark_done(out_dir, {"sequences": num, "shards": shards, "temperature": temperature,
                      "dataset": record and record.to_json()})


# ----------------------------------------------------------------------------- training


def train_models(out_dir: str, tc) -> None:
  """Run the training run `tc` (runs.train_config: one model per train dir, several vmapped
  together); DONE.json lists each model's best (or, without validation data, final) checkpoint,
  relative to out_dir (a copied or moved workdir reads its own)."""
  if is_done(out_dir):
    return
  for d in list(tc.train_data) + ([tc.val_data] if tc.val_data else []):
    load_dataset(d)  # a clear error for an empty or missing dataset before any compile
  summary = trainlib.train(tc, out_dir, overwrite=True)  # its key matched: resume, or start over
  # when only a flag no number depends on changed (e.g. --checkpoint_every)
  best = os.path.relpath(summary["best_dir"], out_dir)
  if summary.get("num_students") is None:  # the best checkpoint may not be the final parameters
    models = [{"checkpoint": best, "best_step": summary["best_step"],
               "val_perplexity": summary["best_val_perplexity"],
               "params_checksum": params_checksum(
                   loading.load_model_checkpoint(summary["best_dir"])[1])}]
  else:  # without validation data each student's kept checkpoint is its final parameters
    models = [{"checkpoint": os.path.join(best, str(i)), "params_checksum": c}
              for i, c in enumerate(summary["student_checksums"])]
  mark_done(out_dir, {"models": models, "steps": summary["steps"],
                      "final_loss": summary["final_loss"],
                      "params_checksum": summary["params_checksum"]})
