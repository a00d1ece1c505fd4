"""What a unit of the study leaves on disk (kdjax/llm/study/units.py makes the units): KEY.json,
the key it was made for and what that key digests; DONE.json, written last (atomically) with
what its stage computed; and the checks that its outputs are what DONE.json records, so that the
cache reuses only what it has checked: datasets by their shards, rows and content digests,
training runs by each checkpoint's parameter checksum, scores by their numbers and embeddings'
rows, a learning-rate selection by its log-likelihoods and choice. `unit` arguments are
kdjax.llm.study.units.Unit (its dir(), key and what)."""

from __future__ import annotations

import os
import shutil
from typing import Optional

from kdjax import checkpoint, cli
from kdjax.llm.dataset_record import DatasetRecord, check_dataset_dir
from kdjax.llm.model import embeddings
from kdjax.llm.train.state import params_checksum
from kdjax.llm.weights import loading

KEY = "KEY.json"
DONE = "DONE.json"


def read_key(path: str) -> Optional[dict]:
  try:
    return cli.read_json(os.path.join(path, KEY))
  except (OSError, ValueError):
    return None


def read_record(path: str) -> dict:
  """A done unit's DONE.json (a UserError naming it when unreadable)."""
  try:
    record = cli.read_json(os.path.join(path, DONE))
  except (OSError, ValueError) as e:
    raise cli.UserError(f"{os.path.join(path, DONE)}: unreadable ({' '.join(str(e).split())[:80]})")
  if not isinstance(record, dict):
    raise cli.UserError(f"{os.path.join(path, DONE)}: not a JSON object")
  return record


def _check_dataset(path: str, record: dict) -> Optional[str]:
  if "dataset" not in record:
    return "no dataset record in DONE.json"
  want = DatasetRecord.from_json(record["dataset"])
  if want.num_rows != record.get("sequences"):
    return f"DONE.json says {record.get('sequences')} sequences, its record {want.num_rows}"
  return check_dataset_dir(path, want)


def _check_training(path: str, record: dict) -> Optional[str]:
  models = record.get("models")
  if not isinstance(models, list) or not models:
    return "no models in DONE.json"
  for j, m in enumerate(models):
    ckpt = os.path.join(path, str(m.get("checkpoint", "")))
    if os.path.isabs(str(m.get("checkpoint", ""))) or not checkpoint.is_model_checkpoint(ckpt):
      return f"model {j}: checkpoint {m.get('checkpoint')!r} missing"
    try:
      got = params_checksum(loading.load_model_checkpoint(ckpt)[1])
    except cli.UserError as e:
      return f"model {j}: {e}"
    if got != m.get("params_checksum"):
      return f"model {j}: params checksum {got}, recorded {m.get('params_checksum')}"
  return None


def _check_embeddings(path: str, rows: Optional[int]) -> Optional[str]:
  try:
    emb = embeddings.load(path)
  except cli.UserError as e:
    return str(e)
  if emb.ndim != 2 or (rows is not None and emb.shape[0] != rows):
    return f"embeddings.npy holds {emb.shape}, expected {rows} rows"
  return None


def _check_selection(path: str, record: dict) -> Optional[str]:
  lls, chosen = record.get("select_loglik"), record.get("chosen")
  if not isinstance(lls, dict) or not isinstance(chosen, list) or not set(chosen) <= set(lls):
    return "DONE.json has no select_loglik per student and chosen students among them"
  return None


def _check_scores(path: str, record: dict) -> Optional[str]:
  for field in ("precision", "recall", "val_perplexity"):
    if not isinstance(record.get(field), (int, float)):
      return f"DONE.json has no {field}"
  return _check_embeddings(path, record.get("rows"))


_CHECKS = {"pstar": _check_dataset, "teacher_samples": _check_dataset,
           "student_samples": _check_dataset, "teacher": _check_training,
           "students": _check_training, "scores": _check_scores, "selection": _check_selection,
           "pstar_embeddings": lambda path, r: _check_embeddings(path, r.get("sequences")),
           "teacher_entropy": lambda path, r: (None if isinstance(r.get("entropy"), (int, float))
                                               else "DONE.json has no entropy")}


def check_outputs(unit, workdir: str) -> Optional[str]:
  """None when a done unit's outputs are what its DONE.json records (datasets: shards, rows and
  content digests; training runs: each checkpoint present with its recorded params checksum;
  scores: the numbers and the embeddings' rows), else the reason, in a few words."""
  path = unit.dir(workdir)
  try:
    record = read_record(path)
  except cli.UserError:
    return "DONE.json unreadable"
  return _CHECKS[unit.what["unit"]](path, record)


def status(unit, workdir: str) -> tuple[str, str]:
  """(verdict, reason): 'cached' (done for its key, its outputs checked), 'resume' (same key,
  not done: a killed run's partial output), 'run' (no unit or another key: stale) or 'redo' (done
  for its key, but its outputs are not what its record says: the reason names what is wrong)."""
  path = unit.dir(workdir)
  k = read_key(path)
  if k is None or k.get("key") != unit.key:
    return "run", ""
  if not os.path.exists(os.path.join(path, DONE)):
    return "resume", ""
  reason = check_outputs(unit, workdir)
  return ("redo", reason) if reason else ("cached", "")


def claim(unit, workdir: str, redo: bool = False) -> None:
  """Make the unit's directory the unit's: a directory of another key (or without one, or with
  `redo`: outputs that failed their check) is removed first, then KEY.json records the key and
  what it was computed from (for people reading the workdir)."""
  path = unit.dir(workdir)
  k = read_key(path)
  if k is not None and k.get("key") == unit.key and not redo:
    return
  if os.path.isdir(path):
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)
  cli.atomic_write_json(os.path.join(path, KEY), {"key": unit.key, "depends_on": unit.what})
