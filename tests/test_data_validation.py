"""Datasets a model cannot train on are refused in one line; zero-row shards are skipped; damaged
shards are named, never a traceback (kdjax.llm.data)."""

import json
import shutil
import time

import datasets
import numpy as np
import pyarrow as pa
import pytest

from kdjax.cli import UserError
from kdjax.llm import data as data_lib
from kdjax.llm import dataset_record


def _refusal(directory, vocab_size=256, seq_len=None) -> str:
  with pytest.raises(UserError) as e:
    data_lib.load_dataset_dir(str(directory), vocab_size, seq_len)
  message = str(e.value)
  assert "\n" not in message and str(directory) in message
  return message


def test_zero_row_shard_is_skipped(tmp_path, caplog):
  w = data_lib.ShardWriter(str(tmp_path / "ds"))
  w.write([[1, 2, 3], [4, 5]])
  w.write([])  # datasets saves it without a data file and cannot load it back
  w.write([[6, 7]])
  ds = data_lib.load_dataset_dir(str(tmp_path / "ds"), vocab_size=256)
  assert list(ds["input_ids"]) == [[1, 2, 3], [4, 5], [6, 7]]
  assert "shard-00001 holds no rows, skipped" in caplog.text
  assert data_lib.has_prompt_lens(str(tmp_path / "ds"))
  only = data_lib.ShardWriter(str(tmp_path / "only"))
  only.write([])
  with pytest.raises(UserError, match="is empty"):
    data_lib.load_dataset_dir(str(tmp_path / "only"))


@pytest.mark.parametrize("bad,value", [(-4, "-4"), (256, "256"), (70000, "70000")])
def test_token_ids_outside_the_vocabulary_name_row_and_value(tmp_path, bad, value):
  w = data_lib.ShardWriter(str(tmp_path / "ds"))
  w.write([[1, 2, 3]] * 3)
  rows = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
  rows[1][2] = bad
  w.write(rows)  # global row 4 (shard 1, row 1)
  message = _refusal(tmp_path / "ds")
  assert f"row 4 holds token id {value}," in message and "[0, 256)" in message
  assert len(data_lib.load_dataset_dir(str(tmp_path / "ds"))) == 6  # no vocabulary: not checked


def test_rows_with_nothing_to_predict(tmp_path):
  data_lib.ShardWriter(str(tmp_path / "one")).write([[1, 2], [3, 4], [5]])
  assert "row 2 has nothing to predict" in _refusal(tmp_path / "one")
  data_lib.ShardWriter(str(tmp_path / "empty")).write([[1, 2], []])
  assert "row 1 has nothing to predict" in _refusal(tmp_path / "empty")
  # a prompt as long as the row: nothing after it; a prompt filling seq_len: nothing within it
  data_lib.ShardWriter(str(tmp_path / "prompt")).write([[1, 2, 3], [1, 2, 3, 4, 5]],
                                                      prompt_lens=[2, 3])
  data_lib.load_dataset_dir(str(tmp_path / "prompt"), 256)
  message = _refusal(tmp_path / "prompt", seq_len=3)
  assert "row 1 has nothing to predict within its first 3 tokens" in message
  assert "prompt length 3" in message
  data_lib.load_dataset_dir(str(tmp_path / "prompt"), 256, seq_len=4)


def test_check_follows_arrow_chunks_and_selections(tmp_path):
  """Rows are numbered across shards (one arrow chunk each) and in a selected dataset."""
  w = data_lib.ShardWriter(str(tmp_path / "ds"))
  for k in range(3):
    w.write([[k, k + 1]] * 5)
  ds = data_lib.load_dataset_dir(str(tmp_path / "ds"))
  assert len(ds.data.column("input_ids").chunks) == 3
  with pytest.raises(UserError, match="row 10 holds token id 3,"):
    data_lib.check_token_rows(ds, "ds", vocab_size=3)
  with pytest.raises(UserError, match="row 0 holds token id 3,"):
    data_lib.check_token_rows(ds.select(range(10, 15)), "ds", vocab_size=3)
  data_lib.check_token_rows(ds.select(range(10)), "ds", vocab_size=3)


def test_truncated_shard_is_one_line(tmp_path):
  data_lib.ShardWriter(str(tmp_path / "ds")).write(data_lib.synthetic_sequences(32, 256, 0))
  (arrow,) = (tmp_path / "ds" / "shard-00000").glob("*.arrow")
  arrow.write_bytes(arrow.read_bytes()[:arrow.stat().st_size // 2])
  for fn in (data_lib.load_dataset_dir, data_lib.has_prompt_lens):
    with pytest.raises(UserError, match="unreadable shard shard-00000"):
      fn(str(tmp_path / "ds"))


def test_check_is_vectorised():
  """1M rows of 32 tokens are checked in well under a second (a Python loop per row is not)."""
  n, t = 1_000_000, 32
  values = np.random.default_rng(0).integers(0, 1000, n * t, dtype=np.int32)
  ids = pa.ListArray.from_arrays(pa.array(np.arange(0, n * t + 1, t, dtype=np.int32)),
                                 pa.array(values))
  ds = datasets.Dataset(pa.table({"input_ids": ids}))
  start = time.perf_counter()
  data_lib.check_token_rows(ds, "big", 1000, 128)
  assert time.perf_counter() - start < 1.0


# ----------------------------------------------------------------------------- dataset records


def _recorded(tmp_path, shards=4, per=8):
  d = tmp_path / "ds"
  w = data_lib.ShardWriter(str(d))
  seqs = data_lib.synthetic_sequences(shards * per, 256, 0)
  for i in range(shards):
    w.write(seqs[i * per:(i + 1) * per])
  record = dataset_record.verify_dataset_dir(str(d))
  assert dataset_record.check_dataset_dir(str(d), record) is None
  return d, record


def _arrow(d, index):
  (path,) = (d / data_lib.shard_name(index)).glob("*.arrow")
  return path


def test_record_counts_rows_and_survives_a_copy_and_json(tmp_path):
  d, record = _recorded(tmp_path)
  assert record.shards == (0, 1, 2, 3) and record.rows == (8, 8, 8, 8) and record.num_rows == 32
  assert len(set(record.digests)) == 4
  shutil.copytree(d, tmp_path / "moved")  # names shards only: a copy matches
  again = dataset_record.DatasetRecord.from_json(json.loads(json.dumps(record.to_json())))
  assert again == record
  assert dataset_record.check_dataset_dir(str(tmp_path / "moved"), again) is None
  with pytest.raises(ValueError, match="not a dataset record"):
    dataset_record.DatasetRecord.from_json({"shards": [0], "rows": [1]})
  # the same rows written again digest alike; other rows do not
  data_lib.ShardWriter(str(tmp_path / "same")).write(data_lib.synthetic_sequences(32, 256, 0)[:8])
  assert dataset_record.verify_dataset_dir(str(tmp_path / "same")).digests[0] == record.digests[0]
  zero = data_lib.ShardWriter(str(tmp_path / "zero"))
  zero.write([])
  assert dataset_record.verify_dataset_dir(str(tmp_path / "zero")).rows == (0,)


def test_deleted_shard(tmp_path):
  d, record = _recorded(tmp_path)
  shutil.rmtree(d / "shard-00003")
  assert dataset_record.check_dataset_dir(str(d), record) == "shard 3 missing"
  shutil.rmtree(d)
  assert dataset_record.check_dataset_dir(str(d), record) == "directory missing"


def test_extra_shard(tmp_path):
  d, record = _recorded(tmp_path)
  data_lib.ShardWriter(str(d)).write([[1, 2]])
  assert dataset_record.check_dataset_dir(str(d), record) == "shard 4 not in the record"


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.0])
def test_truncated_arrow_file(tmp_path, keep):
  d, record = _recorded(tmp_path)
  path = _arrow(d, 1)
  path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
  assert (dataset_record.check_dataset_dir(str(d), record)
          == "shard 1 truncated (unreadable arrow file)")
  with pytest.raises(UserError, match="shard 1 truncated"):
    dataset_record.verify_dataset_dir(str(d))


def test_shard_of_fewer_rows(tmp_path):
  """A shard rewritten with fewer rows (a whole, readable file) is named by its row count."""
  d, record = _recorded(tmp_path)
  shutil.rmtree(d / "shard-00002")
  data_lib.ShardWriter(str(d)).write(data_lib.synthetic_sequences(6, 256, 5), index=2)
  assert dataset_record.check_dataset_dir(str(d), record) == "shard 2: rows 6, recorded 8"


def test_edited_arrow_file(tmp_path):
  """One token changed in place: same size, same rows, still readable; the digest differs."""
  d, record = _recorded(tmp_path)
  path = _arrow(d, 0)
  raw = bytearray(path.read_bytes())
  needle = np.asarray(data_lib.synthetic_sequences(32, 256, 0)[3][:4], "<i4").tobytes()
  at = bytes(raw).index(needle)
  raw[at] ^= 1
  path.write_bytes(bytes(raw))
  assert len(data_lib.load_dataset_dir(str(d))) == 32  # still a loadable dataset
  assert dataset_record.check_dataset_dir(str(d), record) == "shard 0: content digest differs"


def test_damaged_state_json_and_missing_arrow(tmp_path):
  d, record = _recorded(tmp_path)
  (d / "shard-00002" / "state.json").write_text("")
  assert (dataset_record.check_dataset_dir(str(d), record)
          == "shard 2 damaged (unreadable state.json)")
  d, record = _recorded(tmp_path / "b")
  _arrow(d, 3).unlink()
  assert dataset_record.check_dataset_dir(str(d), record).startswith("shard 3: arrow file ")
