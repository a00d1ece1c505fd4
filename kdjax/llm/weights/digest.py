"""A model spec's identity by content: the digest of its files, so that a replaced checkpoint
invalidates everything built from it (the study's cache keys read this, not the spec string).

`spec_digest(spec)`: preset:NAME[@SEED] -> the spec itself (its weights are a function of it);
gguf:FILE -> SHA-256 of the file; hf:DIR -> of its regular files (config, safetensors,
tokenizer), names included; ckpt:DIR -> of every file under it. A file's digest is cached by
(absolute path, size, modification time) in a JSON file (KDJAX_CACHE_DIR, default
~/.cache/kdjax), so a 3 GB checkpoint is hashed once per machine and reused until it changes.
"""

from __future__ import annotations

import hashlib
import os

from kdjax import cli
from kdjax.llm.weights import loading

_CHUNK = 1 << 22


def cache_path() -> str:
  root = os.environ.get("KDJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "kdjax")
  return os.path.join(root, "file_digests.json")


def _read_cache() -> dict:
  try:
    cache = cli.read_json(cache_path())
  except (OSError, ValueError):
    return {}
  return cache if isinstance(cache, dict) else {}


def file_digest(path: str, cache: dict | None = None) -> str:
  """SHA-256 (hex) of a file's bytes, looked up in `cache` by path, size and mtime first."""
  path = os.path.abspath(path)
  st = os.stat(path)
  stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
  if cache is not None and stamp in cache:
    return cache[stamp]
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  if cache is not None:
    cache[stamp] = h.hexdigest()
  return h.hexdigest()


def _files(scheme: str, root: str) -> list[str]:
  if scheme == "gguf":
    return [root]
  if scheme == "hf":
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if os.path.isfile(os.path.join(root, n)))
  return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)


def spec_digest(spec: str) -> str:
  """The content digest of a model spec (see the module docstring); a UserError naming the spec
  when its files are missing."""
  scheme, rest = loading.parse_spec(spec)
  if scheme == "preset":
    return spec
  if not os.path.exists(rest):
    raise cli.UserError(f"model spec {spec!r}: {rest} does not exist")
  cache = _read_cache()
  before = dict(cache)
  h = hashlib.sha256()
  for path in _files(scheme, rest):
    h.update(os.path.relpath(path, rest).encode() + b"\0")
    h.update(file_digest(path, cache).encode())
  if cache != before:
    try:
      os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
      cli.atomic_write_json(cache_path(), cache)
    except OSError:
      pass  # a read-only home: digests are recomputed next time, nothing else changes
  return f"{scheme}:sha256:{h.hexdigest()[:32]}"
