"""TensorBoard scalar event files, written without TensorFlow or tensorboardX.

`tensorboard --logdir DIR` reads what ScalarWriter writes: a file `events.out.tfevents.<time>.
<host>.<pid>` of TFRecords, each an `Event` protocol buffer (tensorboard's event.proto): first one with
`file_version = "brain.Event:2"`, then one per scalar with `wall_time`, `step` and a `Summary`
holding one `Value{tag, simple_value}`. A TFRecord is the data's length (uint64, little endian),
the length's masked CRC-32C, the data, the data's masked CRC-32C.

Why not tensorboardX: importing it imports torch where torch is installed (1.3 s, ~1.8 s with its
own imports, in every training process of the test suite), for four scalar fields.
tests/test_events.py reads these files back with tensorboardX's own protocol buffers and CRC.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CASTAGNOLI = 0x82F63B78  # CRC-32C's polynomial, bit-reversed


def _crc_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CASTAGNOLI if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: the CRC rotated right by 15 bits plus a constant (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  """One protocol-buffer field: its key (number, wire type), then payload (length-prefixed for
  wire type 2)."""
  key = _varint(number << 3 | wire_type)
  return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def event(wall_time: float, step: int = 0, *, tag: str | None = None, value: float = 0.0,
          file_version: str | None = None) -> bytes:
  """An `Event` message: wall_time (1, double), step (2, int64), file_version (3, string) or a
  summary (5) of one value: tag (1, string), simple_value (2, float)."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step & (2**64 - 1)))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if tag is not None:
    summary_value = _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    out += _field(5, 2, _field(1, 2, summary_value))
  return out


def record(data: bytes) -> bytes:
  """One TFRecord around data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data
          + struct.pack("<I", masked_crc32c(data)))


class ScalarWriter:
  """add_scalar(tag, value, step) into a new event file under logdir, each written through (a
  killed run keeps every scalar it logged); close()."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(record(event(now, file_version="brain.Event:2")))
    self._file.flush()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write(record(event(time.time(), int(step), tag=tag, value=float(value))))
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
