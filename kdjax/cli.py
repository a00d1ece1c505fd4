"""What every entry point shares: one-line errors, flag parsing, a workdir that knows its config.

Entry points call `kdjax.cli.run(main)` instead of `absl.app.run(main)`. Flag errors (bad values,
a missing flagfile, an unknown flag) and `UserError`s raised anywhere below main print a single
`error: ...` line on stderr and exit with status 2 (flags) or 1 (everything else), never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, Callable, Mapping

from absl import app, flags


class UserError(Exception):
  """A problem with the user's input (flag, file, workdir): reported as one line, no traceback."""


def _fail(message: str, code: int) -> None:
  message = " ".join(str(message).split())  # one line, whatever the exception carried
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(e, 2)
  return argv  # unreachable


def run(main: Callable[[list[str]], Any]) -> None:
  """absl.app.run with one-line errors for bad flags and `UserError`."""

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      _fail(e, 1)

  app.run(wrapped, flags_parser=_parse_flags)


def require(condition: bool, message: str) -> None:
  """Raise UserError(message) unless condition: the validation idiom for flags and files."""
  if not condition:
    raise UserError(message)


def parse_float_list(name: str, text: str) -> list[float]:
  """'0.8,1.0' -> [0.8, 1.0], with an error naming the flag."""
  try:
    return [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise UserError(f"--{name}={text!r}: expected a comma-separated list of numbers") from None


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Write to a temporary name in the same folder, fsync, rename: readers never see half a file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n")


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- workdir


CONFIG_NAME = "config.json"


def prepare_workdir(workdir: str, config: Mapping[str, Any], overwrite: bool = False) -> bool:
  """Create `workdir` and record `config` in it.

  A workdir that already holds a different configuration is refused with a message naming the
  differing keys, unless `overwrite`. Returns True when the workdir already held this same
  configuration (so stages can resume), False when it is new (or overwritten).
  """
  require(bool(workdir), "--workdir is required")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_NAME)
  config = json.loads(json.dumps(dict(config)))  # normalise tuples etc. as JSON sees them
  if os.path.exists(path):
    try:
      old = read_json(path)
    except (OSError, ValueError):
      old = None
    if old == config:
      return True
    if not overwrite:
      if isinstance(old, dict):
        keys = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        diff = ", ".join(f"--{k} (was {old.get(k)!r}, now {config.get(k)!r})" for k in keys[:6])
      else:
        diff = "unreadable config.json"
      raise UserError(
          f"workdir {workdir} holds results of another configuration: {diff}; "
          "use another --workdir or pass --overwrite")
  atomic_write_json(path, config)
  return False
