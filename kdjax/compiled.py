"""What a compiled program costs per device, read from XLA's own analysis and its HLO text.

  memory(compiled)              arguments, outputs, temporaries (and what outputs alias) per device
  collectives(hlo_text, n)      bytes each device sends per call, per collective kind

Both read the program XLA will run (after SPMD partitioning: one device's program), not a
formula, so they follow the mesh, the shardings and the constraints as compiled.

Collective bytes are those a device sends under the ring algorithm over a group of n devices
(n = the replica group's size), from the size R of the instruction's result:

  all-gather       R (n-1)/n        (receives the other shards of the gathered result)
  reduce-scatter   R (n-1)          (its input is n R; the ring sends (n-1)/n of it)
  all-reduce       2 R (n-1)/n      (a reduce-scatter then an all-gather)
  all-to-all       R (n-1)/n
  collective-permute  R

Instructions inside a while loop count once per iteration (XLA's known_trip_count; a loop with an
unknown count counts once and is reported in `unknown_trip_counts`).
"""

from __future__ import annotations

import math
import re
from typing import Optional

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*[(\s].*\{\s*$")
_CALLED = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def memory(compiled) -> dict:
  """Bytes per device from `compiled.memory_analysis()`: arguments, outputs, temporaries, the
  outputs that alias (donated) arguments, and `total` = arguments + outputs + temporaries -
  aliased (a donated state is counted once)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _array_bytes(text: str) -> float:
  total = 0.0
  for dtype, dims in _ARRAY.findall(text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
    if size is None:
      continue
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _split_result(rhs: str) -> tuple[str, str]:
  """'(f32[2], f32[]) all-reduce(...), ...' -> ('(f32[2], f32[])', 'all-reduce(...), ...')."""
  if not rhs.startswith("("):
    shape, _, rest = rhs.partition(" ")
    return shape, rest
  depth = 0
  for i, ch in enumerate(rhs):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return rhs[:i + 1], rhs[i + 1:].lstrip()
  return rhs, ""


def _group_size(line: str, num_devices: int) -> int:
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"source_target_pairs=", line)
  return 2 if m else num_devices


def _sent(kind: str, result_bytes: float, n: int) -> float:
  if n <= 1:
    return 0.0
  if kind == "all-gather" or kind == "all-to-all":
    return result_bytes * (n - 1) / n
  if kind == "reduce-scatter":
    return result_bytes * (n - 1)
  if kind == "all-reduce":
    return 2 * result_bytes * (n - 1) / n
  return result_bytes  # collective-permute


def _parse(hlo_text: str):
  """{computation: [instruction lines]} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = _HEADER.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
        continue
      if line.startswith("}"):
        current = None
      continue
    if current is not None and " = " in line:
      comps[current].append(line.strip())
  return comps, entry


def _multipliers(comps: dict, entry: str) -> tuple[dict, int]:
  """How many times each computation runs per call of the entry; loops without a known count."""
  mult, unknown = {entry: 1}, 0
  order = [entry]
  while order:
    name = order.pop()
    for line in comps.get(name, ()):
      called = _CALLED.findall(line)
      branches = _BRANCHES.search(line)
      if branches:
        called += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
      if not called:
        continue
      trip = 1
      if " while(" in line:
        t = _TRIP.search(line)
        if t:
          trip = int(t.group(1))
        else:
          unknown += 1
      for role, callee in called:
        if role == "to_apply" or callee not in comps:
          continue  # reductions' combiners hold no collectives
        k = mult[name] * (trip if role in ("body", "condition") else 1)
        if callee not in mult:
          order.append(callee)
        mult[callee] = max(mult.get(callee, 0), k)
  return mult, unknown


def collectives(hlo_text: str, num_devices: int) -> dict:
  """Per-device bytes sent per call of the program, by collective kind, and their total.

  {kind: {"count": instructions executed, "bytes": bytes sent}, ..., "total_bytes": ...,
  "unknown_trip_counts": loops counted once, "instructions": [{kind, shape (the result's, as
  printed), group (size), times (per call), bytes (sent per execution)}]}"""
  comps, entry = _parse(hlo_text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  mult, unknown = _multipliers(comps, entry)
  out = {k: {"count": 0, "bytes": 0.0} for k in KINDS}
  instructions = []
  for name, lines in comps.items():
    k = mult.get(name, 0)
    if not k:
      continue
    for line in lines:
      shape, rest = _split_result(line.split(" = ", 1)[1])
      op = re.match(r"([\w\-]+)\(", rest)
      if not op:
        continue
      op = op.group(1)
      if op.endswith("-done"):
        continue
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in KINDS:
        continue
      if op.endswith("-start") and kind in ("all-gather", "collective-permute") \
          and shape.startswith("("):
        shape = shape.rsplit(",", 1)[-1]  # (operand, result): the result
      n = _group_size(line, num_devices)
      sent = _sent(kind, _array_bytes(shape), n)
      out[kind]["count"] += k
      out[kind]["bytes"] += k * sent
      instructions.append({"kind": kind, "shape": shape, "group": n, "times": k, "bytes": sent})
  out["total_bytes"] = sum(out[k]["bytes"] for k in KINDS)
  out["instructions"] = instructions
  out["unknown_trip_counts"] = unknown
  return out


def report(compiled, num_devices: Optional[int] = None) -> dict:
  """memory() and collectives() of a compiled jax function, in GB (1e9 bytes)."""
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  mem = memory(compiled)
  coll = collectives(compiled.as_text(), num_devices)
  gb = lambda b: round(b / 1e9, 6)
  return {"memory_per_device_gb": gb(mem["total"]),
          "memory_gb": {k: gb(v) for k, v in mem.items() if k != "total"},
          "collective_gb_per_step": gb(coll["total_bytes"]),
          "collectives_gb": {k: gb(coll[k]["bytes"]) for k in KINDS if coll[k]["count"]},
          "collective_counts": {k: coll[k]["count"] for k in KINDS if coll[k]["count"]},
          "unknown_trip_counts": coll["unknown_trip_counts"]}
