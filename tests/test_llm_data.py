"""kdjax.llm.data: atomic shards, loading, deterministic resumable batches, per-process rows."""

import os

import jax
import numpy as np
import pytest

from kdjax import sharding
from kdjax.cli import UserError
from kdjax.llm import data as data_lib


def _write(directory, n, shards=2, seed=0):
  seqs = data_lib.synthetic_sequences(n, 256, seed, min_len=2, max_len=20)
  w = data_lib.ShardWriter(str(directory))
  per = -(-n // shards)
  for i in range(0, n, per):
    w.write(seqs[i:i + per], texts=[f"t{j}" for j in range(i, min(i + per, n))])
  return seqs


def test_shard_writer_and_loading(tmp_path):
  d = tmp_path / "ds"
  seqs = _write(d, 10, shards=3)
  assert data_lib.num_complete_shards(str(d)) == 3
  assert sorted(os.listdir(d)) == ["shard-00000", "shard-00001", "shard-00002"]
  ds = data_lib.load_dataset_dir(str(d))
  assert len(ds) == 10 and set(ds.column_names) == {"input_ids", "text", "length", "prompt_len"}
  assert ds[4]["input_ids"] == seqs[4].tolist() and ds[4]["length"] == len(seqs[4])
  assert ds[9]["text"] == "t9"
  rows = data_lib.TokenRows(ds)
  for i in range(10):
    np.testing.assert_array_equal(rows.row(i), seqs[i])


def test_killed_writer_leaves_only_complete_shards(tmp_path):
  d = tmp_path / "ds"
  _write(d, 4, shards=1)
  os.makedirs(d / ".tmp-shard-00001")  # a writer killed mid-save
  assert data_lib.num_complete_shards(str(d)) == 1
  assert len(data_lib.load_dataset_dir(str(d))) == 4
  w = data_lib.ShardWriter(str(d))  # a restarted writer cleans up and continues numbering
  assert not os.path.exists(d / ".tmp-shard-00001")
  assert w.write([[1, 2, 3]]).endswith("shard-00001")
  assert len(data_lib.load_dataset_dir(str(d))) == 5


def test_not_a_dataset_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    data_lib.load_dataset_dir(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("x")
  with pytest.raises(UserError, match="holds no dataset shards"):
    data_lib.load_dataset_dir(str(tmp_path / "empty"))
  with pytest.raises(UserError, match="fewer than one batch"):
    data_lib.BatchIterator([[1, 2]] * 3, batch_size=4, seq_len=8)


def test_batches_pad_truncate_and_are_deterministic(tmp_path):
  seqs = [[5] * k for k in (1, 3, 8, 12, 4, 6, 2)]
  it = data_lib.BatchIterator(seqs, batch_size=3, seq_len=6, seed=1, pad_id=0)
  assert it.steps_per_epoch == 2
  b = it.local_batch(0, 0)
  assert b["input_ids"].shape == (3, 6) and b["input_ids"].dtype == np.int32
  rows = it.global_rows(0, 0)
  for k, r in enumerate(rows):
    n = min(len(seqs[r]), 6)
    assert b["attention_mask"][k].sum() == n and np.all(b["input_ids"][k, n:] == 0)
  # position (epoch, index) -> the same rows in a fresh iterator; epochs differ; no row repeats
  it2 = data_lib.BatchIterator(seqs, batch_size=3, seq_len=6, seed=1)
  np.testing.assert_array_equal(it2.global_rows(1, 1), it.global_rows(1, 1))
  assert len(set(it.global_rows(0, 0)) | set(it.global_rows(0, 1))) == 6
  assert not all(np.array_equal(it.global_rows(0, i), it.global_rows(1, i)) for i in range(2))
  assert it.position(5) == (2, 1)
  other = data_lib.BatchIterator(seqs, batch_size=3, seq_len=6, seed=2)
  assert not all(np.array_equal(other.global_rows(0, i), it.global_rows(0, i)) for i in range(2))
  plain = data_lib.BatchIterator(seqs, batch_size=3, seq_len=6, shuffle=False)
  np.testing.assert_array_equal(plain.global_rows(0, 1), [3, 4, 5])


def test_eval_batches_cover_every_row_once():
  seqs = [[1, 2, 3]] * 5
  batches = list(data_lib.eval_batches(seqs, 2, 4))
  assert len(batches) == 3
  assert sum(int(b["attention_mask"].sum()) for b in batches) == 15
  assert batches[-1]["attention_mask"][1].sum() == 0  # filler row


def test_prompt_lengths_travel_from_disk_to_target_masks(tmp_path):
  """Rows written with their prompt length come back as batches whose target mask covers exactly
  the tokens after the prompt; rows written without one (old datasets) have prompt length 1."""
  import datasets
  seqs = [[7] * k for k in (6, 4, 9, 2)]
  data_lib.ShardWriter(str(tmp_path / "ds")).write(seqs, prompt_lens=[3, 3, 1, 3])
  rows = data_lib.TokenRows(data_lib.load_dataset_dir(str(tmp_path / "ds")))
  np.testing.assert_array_equal(rows.prompt_lens, [3, 3, 1, 3])
  (batch,) = data_lib.eval_batches(rows, 4, 8)
  want = np.zeros((4, 8), bool)
  want[0, 3:6], want[1, 3:4], want[2, 1:8] = True, True, True  # row 3: all prompt, truncated to 8
  np.testing.assert_array_equal(batch["target_mask"], want)
  it = data_lib.BatchIterator(rows, batch_size=2, seq_len=8, seed=3)
  b = it.local_batch(0, 1)
  for k, r in enumerate(it.global_rows(0, 1)):
    np.testing.assert_array_equal(b["target_mask"][k], want[r])
  # a dataset saved before the prompt_len column: every row's prompt is its first token
  datasets.Dataset.from_dict({"input_ids": seqs}).save_to_disk(str(tmp_path / "old" / "shard-00000"))
  assert not data_lib.has_prompt_lens(str(tmp_path / "old"))
  assert data_lib.has_prompt_lens(str(tmp_path / "ds"))
  old = data_lib.TokenRows(data_lib.load_dataset_dir(str(tmp_path / "old")))
  np.testing.assert_array_equal(old.prompt_lens, 1)
  (b,) = data_lib.eval_batches(old, 4, 8)
  np.testing.assert_array_equal(b["target_mask"], b["attention_mask"] & (np.arange(8) >= 1))


def test_process_rows_and_global_batch():
  mesh = sharding.make_mesh(2, 2, 2)
  bsh = sharding.batch_sharding(mesh)
  rows = data_lib.process_rows(bsh, (8, 4), 0)
  np.testing.assert_array_equal(rows, np.arange(8))  # one process holds every row
  local = {"input_ids": np.arange(32, dtype=np.int32).reshape(8, 4)}
  g = data_lib.global_batch(local, bsh, (8, 4))
  assert g["input_ids"].sharding == bsh
  np.testing.assert_array_equal(np.asarray(g["input_ids"]), local["input_ids"])
  ssh = sharding.batch_sharding(mesh, students=True)
  assert len(data_lib.process_rows(ssh, (3, 8, 4), 1)) == 8


def test_shard_index_past_99999(tmp_path):
  """Names and numbering agree past five digits (a fabricated index: shards 0..99997 are absent):
  shards 99998, 99999, 100000 load in index order, not name order, and the next write is 100001."""
  d = tmp_path / "ds"
  w = data_lib.ShardWriter(str(d))
  for i in range(3):
    w.write([[i, i]])
  for old, new in ((2, 100000), (1, 99999), (0, 99998)):
    os.rename(d / f"shard-{old:05d}", d / data_lib.shard_name(new))
  os.makedirs(d / "shard-000004")  # not how index 4 is spelled: not a shard
  assert data_lib.num_complete_shards(str(d)) == 100001
  assert list(data_lib.load_dataset_dir(str(d))["input_ids"]) == [[0, 0], [1, 1], [2, 2]]
  for i in (3, 4):  # a rerun keeps appending where the last one stopped
    assert data_lib.ShardWriter(str(d)).write([[i, i]]).endswith(f"shard-{100001 + i - 3}")
  assert list(data_lib.load_dataset_dir(str(d))["input_ids"])[-2:] == [[3, 3], [4, 4]]
