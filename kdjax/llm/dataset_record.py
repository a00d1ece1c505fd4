"""What a dataset directory held when it was written, and whether it still holds exactly that.

A cache that reuses a dataset (the SmolLM2 study's stages) records it when it is complete and
checks the record before reusing it: a shard deleted by hand, a truncated arrow file or an edited
one must make the dataset be redone, never be read as a smaller or different dataset.

`verify_dataset_dir(path)` reads a complete directory (kdjax.llm.data's layout: shard-00000, ...,
each a `datasets` save_to_disk directory whose state.json lists its arrow files) and returns its
`DatasetRecord`: the shard indices, each shard's rows, and each shard's content digest (SHA-256 of
every byte of its arrow files, the only bytes `load_dataset_dir` reads rows from: ~0.3 s for 1M
rows of 32 tokens; state.json and dataset_info.json hold a fingerprint of their own, so they are
left out and two writes of the same rows digest alike). Rows are counted by reading each arrow stream through a memory map (the record
batches' headers; no copy), which also proves the file whole: a file cut short fails there.

`check_dataset_dir(path, record)` returns None when the directory matches the record, else one
short reason ("shard 3 missing", "shard 1 truncated (unreadable arrow file)", "shard 2: rows 24,
recorded 32", "shard 0: content digest differs"); it never raises on a damaged directory. Records
name shards by index only, never by absolute path, so a copied or moved directory matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Optional

from kdjax.cli import UserError
from kdjax.llm import data

@dataclasses.dataclass(frozen=True)
class DatasetRecord:
  """A complete dataset directory: its shard indices, rows per shard, content digest per shard."""
  shards: tuple
  rows: tuple
  digests: tuple

  @property
  def num_rows(self) -> int:
    return sum(self.rows)

  def to_json(self) -> dict:
    return {"shards": list(self.shards), "rows": list(self.rows), "digests": list(self.digests)}

  @classmethod
  def from_json(cls, d) -> "DatasetRecord":
    """The record `to_json` wrote; ValueError when `d` is not one."""
    try:
      record = cls(tuple(int(i) for i in d["shards"]), tuple(int(r) for r in d["rows"]),
                   tuple(str(h) for h in d["digests"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"not a dataset record: {e!r}") from None
    if not len(record.shards) == len(record.rows) == len(record.digests):
      raise ValueError("not a dataset record: shards, rows and digests differ in length")
    return record


class _Damaged(Exception):
  """A shard that cannot be read; its message is the reason."""


def _arrow_rows(path: str) -> int:
  """Rows of one arrow stream file, read through a memory map (headers only, no copy)."""
  import pyarrow as pa
  with pa.memory_map(path) as source:
    return sum(batch.num_rows for batch in pa.ipc.open_stream(source))


def _scan_shard(directory: str, index: int) -> tuple[int, str]:
  """(rows, content digest) of shard `index`; _Damaged naming what is wrong."""
  shard = os.path.join(directory, data.shard_name(index))
  try:
    files = data.shard_data_files(shard)
  except (OSError, ValueError, KeyError, TypeError):
    raise _Damaged(f"shard {index} damaged (unreadable state.json)") from None
  rows, h = 0, hashlib.sha256()
  for path in files:
    name = os.path.basename(path)
    if not os.path.isfile(path):
      raise _Damaged(f"shard {index}: arrow file {name} missing")
    try:
      rows += _arrow_rows(path)
      with open(path, "rb") as f:
        h.update(f"{name}\0{hashlib.file_digest(f, 'sha256').hexdigest()}\0".encode())
    except (OSError, ValueError):  # pyarrow.ArrowInvalid is a ValueError
      raise _Damaged(f"shard {index} truncated (unreadable arrow file)") from None
  return rows, h.hexdigest()[:32]


def verify_dataset_dir(path: str) -> DatasetRecord:
  """The record of a complete dataset directory; UserError naming what is wrong when a shard
  cannot be read (a directory just written by ShardWriter always can)."""
  indices = sorted(data.complete_shards(path))
  if not indices:
    what = "does not exist" if not os.path.exists(path) else "holds no dataset shards"
    raise UserError(f"dataset directory {path} {what} (expected shard-00000, ...)")
  scanned = []
  for i in indices:
    try:
      scanned.append(_scan_shard(path, i))
    except _Damaged as e:
      raise UserError(f"dataset directory {path}: {e}") from None
  return DatasetRecord(tuple(indices), tuple(r for r, _ in scanned), tuple(h for _, h in scanned))


def check_dataset_dir(path: str, record: DatasetRecord) -> Optional[str]:
  """None when `path` holds exactly the dataset `record` describes, else a short reason."""
  if not os.path.isdir(path):
    return "directory missing"
  try:
    present = data.complete_shards(path)
  except OSError as e:
    return f"directory unreadable ({e.strerror})"
  for i in record.shards:
    if i not in present:
      return f"shard {i} missing"
  extra = sorted(present - set(record.shards))
  if extra:
    return f"shard {extra[0]} not in the record"
  for i, rows, digest in zip(record.shards, record.rows, record.digests):
    try:
      found, found_digest = _scan_shard(path, i)
    except _Damaged as e:
      return str(e)
    if found != rows:
      return f"shard {i}: rows {found}, recorded {rows}"
    if found_digest != digest:
      return f"shard {i}: content digest differs"
  return None
