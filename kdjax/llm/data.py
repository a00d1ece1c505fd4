"""Token datasets on disk and a deterministic, resumable, per-process batch iterator.

On disk a dataset is a directory of shards `shard-00000`, `shard-00001`, ... each an HF `datasets`
Dataset (save_to_disk) with columns input_ids (list[int32]), text (str, may be empty), length
(int32) and prompt_len (int32: how many leading tokens of the row are prompt, context that is never
scored; kdjax.llm.model.targets. Datasets written without the column read as prompt length 1). `ShardWriter` writes each shard into a temporary directory and renames it into place, so
a killed writer leaves only complete shards, and a restarted one continues after them.

`BatchIterator` turns a dataset into fixed-shape batches: rows are truncated or padded to
`seq_len` (pad id + attention mask, and a target mask: which tokens are scored), shuffled per epoch by (seed, epoch), and the batch at data
position (epoch, index) is a pure function of those two numbers, so a resumed run reads exactly
the batches an uninterrupted one would. Each process materialises only the rows of the global batch
that its devices hold; `global_batch` assembles them into one global jax.Array.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable, Optional, Sequence

import jax
import numpy as np
from absl import logging

from kdjax.cli import UserError
from kdjax.llm.model import targets

# Shard i is named shard-<i, zero-padded to at least five digits>: shard-00000 ... shard-99999,
# shard-100000, ... Only that exact spelling of each index is a shard (shard-000001 is not).
_SHARD = re.compile(r"^shard-(\d{5,})$")


def _features():
  import datasets
  return datasets.Features({
      "input_ids": datasets.Sequence(datasets.Value("int32")),
      "text": datasets.Value("string"),
      "length": datasets.Value("int32"),
      "prompt_len": datasets.Value("int32"),
  })


def shard_name(index: int) -> str:
  return f"shard-{index:05d}"


def _shard_indices(directory: str) -> list[int]:
  """The indices of the complete shards in `directory`, ascending (numerically, not by name)."""
  if not os.path.isdir(directory):
    return []
  found = (_SHARD.match(n) for n in os.listdir(directory))
  return sorted(int(m.group(1)) for m in found if m and m.group(0) == shard_name(int(m.group(1))))


def shard_dirs(directory: str) -> list[str]:
  """The complete shards of `directory` in index order (partial ones live under temporary names)."""
  return [os.path.join(directory, shard_name(i)) for i in _shard_indices(directory)]


def num_complete_shards(directory: str) -> int:
  """The index the next shard gets: 1 + the highest complete index (0 when there is none). Shards
  are written in order 0, 1, 2, ..., so this is also how many are complete."""
  indices = _shard_indices(directory)
  return indices[-1] + 1 if indices else 0


def complete_shards(directory: str) -> set[int]:
  """The indices of the complete shards in a directory (several writers may fill it out of order:
  the study's processes each write their own shards)."""
  return set(_shard_indices(directory)) if os.path.isdir(directory) else set()


class ShardWriter:
  """Appends shards to a dataset directory, atomically, numbering after the complete ones (or at
  a given index: one of several writers sharing the directory)."""

  def __init__(self, directory: str, cleanup: bool = True):
    self.directory = directory
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory) if cleanup else ():  # leftovers of a killed writer
      if name.startswith(".tmp-shard-"):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

  def write(self, input_ids: Sequence[Sequence[int]], texts: Optional[Sequence[str]] = None,
            prompt_lens: Optional[Sequence[int]] = None, index: Optional[int] = None) -> str:
    """Write one shard (as shard `index`, default the next after the complete ones); returns its
    path. texts default to empty strings, prompt_lens (each row's prompt tokens) to 1."""
    import datasets
    input_ids = [np.asarray(row, np.int32).tolist() for row in input_ids]
    texts = list(texts) if texts is not None else [""] * len(input_ids)
    if len(texts) != len(input_ids):
      raise ValueError(f"{len(texts)} texts for {len(input_ids)} sequences")
    prompt_lens = [1] * len(input_ids) if prompt_lens is None else [int(p) for p in prompt_lens]
    if len(prompt_lens) != len(input_ids):
      raise ValueError(f"{len(prompt_lens)} prompt lengths for {len(input_ids)} sequences")
    ds = datasets.Dataset.from_dict(
        {"input_ids": input_ids, "text": texts, "length": [len(r) for r in input_ids],
         "prompt_len": prompt_lens}, features=_features())
    index = num_complete_shards(self.directory) if index is None else index
    final = os.path.join(self.directory, shard_name(index))
    tmp = os.path.join(self.directory, f".tmp-{shard_name(index)}")
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
    ds.save_to_disk(tmp)
    os.rename(tmp, final)
    return final


def shard_data_files(shard: str) -> list[str]:
  """The arrow files of one shard, as its state.json lists them (none: a shard of zero rows,
  which `datasets` writes without a data file and cannot load). OSError / ValueError when the
  shard's state.json is missing or unreadable."""
  with open(os.path.join(shard, "state.json")) as f:
    files = json.load(f)["_data_files"]
  return [os.path.join(shard, entry["filename"]) for entry in files]


def _load_shard(directory: str, path: str):
  """One shard as a datasets.Dataset, None when it holds no rows; UserError when unreadable."""
  import datasets
  try:
    if not shard_data_files(path):
      return None
    part = datasets.load_from_disk(path)
  except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
    raise UserError(f"dataset directory {directory}: unreadable shard {os.path.basename(path)}: "
                    f"{' '.join(str(e).split())[:200]}") from None
  if not isinstance(part, datasets.Dataset) or "input_ids" not in part.column_names:
    raise UserError(f"dataset shard {path} has no input_ids column")
  return part if len(part) else None


def load_dataset_dir(directory: str, vocab_size: Optional[int] = None,
                     seq_len: Optional[int] = None):
  """All complete shards of `directory`, concatenated in order, as one datasets.Dataset. Shards of
  zero rows are skipped (one warning line). With vocab_size: rows a model of that vocabulary
  cannot train on are refused (check_token_rows), before anything trains."""
  import datasets
  paths = shard_dirs(directory)
  if not paths:
    what = "does not exist" if not os.path.exists(directory) else "holds no dataset shards"
    raise UserError(f"dataset directory {directory} {what} (expected shard-00000, ...)")
  parts = []
  for p in paths:
    part = _load_shard(directory, p)
    if part is None:
      logging.warning("dataset directory %s: %s holds no rows, skipped", directory,
                      os.path.basename(p))
    else:
      parts.append(part)
  if not parts:
    raise UserError(f"dataset directory {directory} is empty (0 sequences)")
  ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
  if vocab_size is not None:
    check_token_rows(ds, directory, vocab_size, seq_len)
  return ds


def check_token_rows(dataset, name: str, vocab_size: int, seq_len: Optional[int] = None) -> None:
  """UserError naming `name`, the (0-based) row and the value when a row has a token id outside
  [0, vocab_size) or nothing to predict (no target: kdjax.llm.model.targets; within its first
  seq_len tokens when given). Vectorised over the arrow columns: a min / max per chunk, and the
  offending row located only when there is one."""
  table = dataset.flatten_indices().data if getattr(dataset, "_indices", None) else dataset.data
  prompt = (table.column("prompt_len").to_numpy() if "prompt_len" in table.column_names
            else np.ones(table.num_rows, np.int64))
  start = 0
  for chunk in table.column("input_ids").chunks:
    offsets = chunk.offsets.to_numpy()
    values = chunk.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    if len(values) and (values.min() < 0 or values.max() >= vocab_size):
      k = int(np.flatnonzero((values < 0) | (values >= vocab_size))[0])
      row = start + int(np.searchsorted(offsets, offsets[0] + k, side="right")) - 1
      raise UserError(f"dataset {name}: row {row} holds token id {int(values[k])}, outside the "
                      f"model's vocabulary [0, {vocab_size})")
    lengths = np.diff(offsets)
    if seq_len is not None:
      lengths = np.minimum(lengths, seq_len)
    firsts = np.maximum(prompt[start:start + len(lengths)], 1)
    empty = np.flatnonzero(lengths <= firsts)
    if len(empty):
      j = int(empty[0])
      within = f" within its first {seq_len} tokens" if seq_len is not None else ""
      raise UserError(f"dataset {name}: row {start + j} has nothing to predict{within} "
                      f"({int(np.diff(offsets)[j])} tokens, prompt length {int(firsts[j])})")
    start += len(lengths)


def has_prompt_lens(directory: str) -> bool:
  """Whether a dataset's rows record their prompt length (the prompt_len column; without it every
  row reads as prompt length 1). True for a directory without shards yet, or of zero-row shards
  only; UserError naming the shard when it is unreadable."""
  for p in shard_dirs(directory):
    part = _load_shard(directory, p)
    if part is not None:
      return "prompt_len" in part.column_names
  return True


class TokenRows:
  """Random access to the token rows of a dataset without copying it (arrow buffers, zero-copy),
  and each row's prompt length (the dataset's prompt_len column, or `prompt_lens`, or 1)."""

  def __init__(self, dataset, prompt_lens: Optional[Sequence[int]] = None):
    if isinstance(dataset, (list, tuple)):  # plain lists of token ids (tests, small data)
      self._chunks = [(np.concatenate([np.asarray(r, np.int32) for r in dataset] or
                                      [np.zeros(0, np.int32)]),
                       np.cumsum([0] + [len(r) for r in dataset]))]
    else:
      if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()
      if prompt_lens is None and "prompt_len" in dataset.column_names:
        prompt_lens = dataset.data.column("prompt_len").to_numpy()
      column = dataset.data.column("input_ids")
      self._chunks = []
      for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        self._chunks.append((values, offsets))
    sizes = [len(o) - 1 for _, o in self._chunks]
    self._starts = np.cumsum([0] + sizes)
    self.num_rows = int(self._starts[-1])
    self.prompt_lens = (np.ones(self.num_rows, np.int32) if prompt_lens is None
                        else np.asarray(prompt_lens, np.int32).reshape(-1))
    if len(self.prompt_lens) != self.num_rows:
      raise ValueError(f"{len(self.prompt_lens)} prompt lengths for {self.num_rows} rows")

  def __len__(self):
    return self.num_rows

  def row(self, i: int) -> np.ndarray:
    c = int(np.searchsorted(self._starts, i, side="right") - 1)
    values, offsets = self._chunks[c]
    j = i - self._starts[c]
    return values[offsets[j]:offsets[j + 1]]

  def batch(self, indices: Iterable[int], seq_len: int, pad_id: int) -> dict:
    """Rows truncated / right-padded to seq_len: {input_ids [n, seq_len] int32, attention_mask and
    target_mask [n, seq_len] bool} (targets: the tokens after each row's prompt, kdjax.llm.model.targets)."""
    indices = np.asarray(list(indices), np.int64)
    ids = np.full((len(indices), seq_len), pad_id, np.int32)
    mask = np.zeros((len(indices), seq_len), bool)
    for k, i in enumerate(indices):
      r = self.row(int(i))[:seq_len]
      ids[k, :len(r)] = r
      mask[k, :len(r)] = True
    return {"input_ids": ids, "attention_mask": mask,
            "target_mask": targets.target_mask(mask, self.prompt_lens[indices])}


def process_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int], axis: int) -> np.ndarray:
  """The global row indices (along `axis`) held by this process's devices, in ascending order."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    sl = index[axis]
    rows.update(range(*sl.indices(global_shape[axis])))
  return np.array(sorted(rows), np.int64)


class BatchIterator:
  """Deterministic batches of one dataset: position (epoch, index) -> the same rows, always.

  Global batch `batch_size`; each epoch is a permutation of the rows seeded by (seed, epoch)
  (no shuffle: dataset order), cut into `steps_per_epoch = len // batch_size` full batches (the
  remainder is dropped in that epoch; it is seen in other epochs' permutations).
  """

  def __init__(self, dataset, batch_size: int, seq_len: int, seed: int = 0, pad_id: int = 0,
               shuffle: bool = True, name: str = "dataset"):
    self.rows = dataset if isinstance(dataset, TokenRows) else TokenRows(dataset)
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.pad_id, self.shuffle = pad_id, shuffle
    if len(self.rows) < batch_size:
      raise UserError(f"{name} has {len(self.rows)} sequences, fewer than one batch of {batch_size}")
    self.steps_per_epoch = len(self.rows) // batch_size
    self._perm_epoch, self._perm = None, None

  def position(self, step: int) -> tuple[int, int]:
    """Data position (epoch, index) of global step `step` (0-based)."""
    return divmod(int(step), self.steps_per_epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      n = len(self.rows)
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
      self._perm_epoch = epoch
    return self._perm

  def global_rows(self, epoch: int, index: int) -> np.ndarray:
    if not 0 <= index < self.steps_per_epoch:
      raise ValueError(f"batch index {index} outside epoch of {self.steps_per_epoch}")
    b = self.batch_size
    return self._permutation(epoch)[index * b:(index + 1) * b]

  def local_batch(self, epoch: int, index: int, local_rows: Optional[np.ndarray] = None):
    """This process's part: {'input_ids', 'attention_mask', 'target_mask'} numpy arrays of
    len(local_rows) rows."""
    rows = self.global_rows(epoch, index)
    if local_rows is not None:
      rows = rows[local_rows]
    return self.rows.batch(rows, self.seq_len, self.pad_id)


def eval_batches(dataset, batch_size: int, seq_len: int, pad_id: int = 0, limit: int = 0):
  """Every row once, in order (limit > 0: the first `limit` rows only); the last batch is filled
  with all-padding rows (masks False)."""
  rows = dataset if isinstance(dataset, TokenRows) else TokenRows(dataset)
  n = min(len(rows), limit) if limit > 0 else len(rows)
  for start in range(0, n, batch_size):
    idx = list(range(start, min(start + batch_size, n)))
    batch = rows.batch(idx, seq_len, pad_id)
    if len(idx) < batch_size:
      fill = batch_size - len(idx)
      batch = {k: np.concatenate([v, np.full((fill, seq_len), pad_id if k == "input_ids" else 0,
                                             v.dtype)]) for k, v in batch.items()}
    yield batch


def global_batch(local: dict, sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> dict:
  """Assemble each process's rows into global jax.Arrays of `global_shape` with `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, tuple(global_shape))
          for k, v in local.items()}


def synthetic_sequences(n: int, vocab_size: int, seed: int, min_len: int = 8,
                        max_len: int = 64) -> list[np.ndarray]:
  """n random token sequences of random lengths (deterministic in seed): smoke tests and demos."""
  rng = np.random.default_rng([seed, 7919])
  lengths = rng.integers(min_len, max_len + 1, size=n)
  return [rng.integers(0, vocab_size, size=int(k), dtype=np.int32) for k in lengths]
