"""kdjax.events' TensorBoard files, read back with tensorboardX's own protocol buffers and CRC-32C
(an independent implementation of the format TensorBoard reads)."""

import pytest
from tensorboardX import crc32c as tbx_crc
from tensorboardX.record_writer import masked_crc32c as tbx_masked

from kdjax import events
from tests.helpers import read_events


@pytest.mark.parametrize("data", [b"", b"a", b"123456789", bytes(range(256)) * 3])
def test_crc32c_is_castagnolis(data):
  assert events.crc32c(data) == tbx_crc.crc32c(data)
  assert events.masked_crc32c(data) == tbx_masked(data)
  if data == b"123456789":
    assert events.crc32c(data) == 0xE3069283  # the CRC-32C check value


def test_scalars_read_back_with_tensorboards_protos(tmp_path):
  w = events.ScalarWriter(str(tmp_path / "tb"))
  w.add_scalar("train/loss", 2.5, 1)
  w.add_scalar("train/loss/0", -1e-3, 300)
  w.add_scalar("val/perplexity", float("inf"), 2**40)
  w.close()
  first, *rest = read_events(w.path)
  assert first.file_version == "brain.Event:2" and first.wall_time > 1.7e9
  assert [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in rest] == [
      (1, "train/loss", 2.5), (300, "train/loss/0", pytest.approx(-1e-3)),
      (2**40, "val/perplexity", float("inf"))]
  assert all(e.wall_time >= first.wall_time for e in rest)
