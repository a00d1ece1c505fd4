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

Instructions inside a while loop count once per iteration (XLA's known_trip_count, or, where the
compiler prints none (the TPU compiler), the constant its condition compares the counter with; a loop
with an unknown count counts once and is reported in `unknown_trip_counts`).

  cost(compiled, trips)         FLOPs and bytes accessed per device per call, loops included

XLA's own `cost_analysis()` counts each while loop's body ONCE (the TPU compiler's and XLA:CPU's
alike: a scan over 30 layers is priced as one layer, a 511-step decode loop as one step). `cost`
runs XLA's HloCostAnalysis on the compiled module (the program as compiled, e.g. by the TPU
compiler) and on each loop body alone, and weights every body by its trip count. Loops whose count
depends on the data (a sampler that stops when every row has ended) take theirs from `trips`, in
the order the program runs them.

  tpu_compiler()                libtpu's version, or None: can the TPU compiler run here?
  tpu_devices(generation, n)    n devices of a TPU topology (v5p, v5e, v6e, v4) to compile for

With libtpu installed (setup.py's `tpu` extra) the TPU compiler compiles for a topology on any
machine, CPU only included (`jax.experimental.topologies`; jax.devices() stays the CPU): a program
lowered with shardings over those devices compiles to the TPU executable, with the TPU compiler's
memory analysis and HLO, and nothing runs.
"""

from __future__ import annotations

import functools
import math
import os
import re
from importlib import metadata
from typing import Optional, Sequence

import jax
from jax.experimental import topologies
from jaxlib import _jax
from jaxlib import _hlo

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


# XLA:CPU hands reductions to YNNPACK fusions by default in this jaxlib; the GMM sweep's many small
# per-point reductions then run single-threaded: turning them off made it ~4x faster (bench_gmm).
# Not for the SmolLM2 sampler: there it was ~7% faster (bench_sampling --compare), but its
# reductions then split over the process's threads, so the real checkpoint's p* rows differed
# between 1 process x 4 devices and 2 x 2 (tests/test_sample_rows.py): the rows would depend on the
# machine. The option is a DebugOptions field: the TPU and GPU compilers accept and ignore it.
NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


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


_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^%?([\w.\-]+) = s32\[\]\S* constant\((-?\d+)\)")
_COMPARE_LT = re.compile(r"^ROOT %?[\w.\-]+ = pred\[\]\S* compare\(%?[\w.\-]+, %?([\w.\-]+)\), "
                         r"direction=LT")


def _trip_count(while_line: str, comps: dict) -> Optional[int]:
  """A while loop's trip count: XLA's known_trip_count, else the s32 constant N of a condition
  that is exactly `counter < N` (jax's scan and fori_loop count from 0 by 1); None if neither."""
  t = _TRIP.search(while_line)
  if t:
    return int(t.group(1))
  cond = _CONDITION.search(while_line)
  lines = comps.get(cond.group(1), ()) if cond else ()
  constants = dict(m.groups() for m in map(_CONSTANT.match, lines) if m)
  for line in lines:
    m = _COMPARE_LT.match(line)
    if m and m.group(1) in constants:
      return int(constants[m.group(1)])
  return None


def loop_trips(while_line: str, comps: dict, given: list) -> tuple[int, str]:
  """(trip count, source) of a while loop as `cost` weights it: the program's count ("program"),
  else the next of the `given` counts (popped: the data-dependent loops in the order the program
  runs them; "given"), else 1 ("unknown: once")."""
  n = _trip_count(while_line, comps)
  if n is not None:
    return n, "program"
  return (given.pop(0), "given") if given else (1, "unknown: once")


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
        trip = _trip_count(line, comps)
        if trip is None:
          trip, unknown = 1, unknown + 1
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


# ----------------------------------------------------------------------------- FLOPs and bytes

_WHILE = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_STACK_FRAME = re.compile(r",? ?stack_frame_id=\d+")  # ids into tables a one-computation module lacks


def _with_entry(hlo_text: str, name: str) -> str:
  """The module text with computation `name` as its entry (so XLA's cost analysis prices it)."""
  body = hlo_text.split("\n", 1)[1]
  body = re.sub(r"^ENTRY ", "", body, flags=re.M)
  body = re.sub(rf"^(%?{re.escape(name)} )", r"ENTRY \1", body, count=1, flags=re.M)
  return "HloModule cost\n" + _STACK_FRAME.sub("", body)


def _xla_cost(hlo_text: str, name: str) -> tuple[float, float]:
  """(flops, bytes accessed) of XLA's HloCostAnalysis of computation `name`, loops counted once."""
  module = _hlo.hlo_module_from_text(_with_entry(hlo_text, name))
  c = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
  return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


def cost(compiled, trips: Sequence[int] = ()) -> dict:
  """FLOPs and bytes accessed per device per call of a compiled jax function, every while loop's
  body weighted by its trip count (XLA's cost analysis counts a body once).

  trips: the counts of the loops whose count the program does not fix (data-dependent exits), in
  the order the program runs them; beyond those, such a loop counts once.
  {"flops", "bytes", "xla_flops", "xla_bytes" (XLA's own, bodies once), "loops": [{"trip", "source"
  (program, given, unknown: once), "flops", "bytes" (one iteration, nested loops weighted)}] in the
  order they run (a loop's nested loops after it), "unknown_trip_counts"}"""
  text = compiled.as_text()
  comps, entry = _parse(text)
  given, loops = list(trips), []

  def weighted(name: str) -> tuple[float, float]:
    flops, bytes_ = _xla_cost(text, name)
    for line in comps[name]:
      m = _WHILE.search(line) if " while(" in line else None
      if not m:
        continue
      n, source = loop_trips(line, comps, given)
      loop = {"trip": n, "source": source}
      loops.append(loop)
      once, inner = _xla_cost(text, m.group(1)), weighted(m.group(1))
      loop.update(flops=inner[0], bytes=inner[1])
      flops += n * inner[0] - once[0]
      bytes_ += n * inner[1] - once[1]
    return flops, bytes_

  flops, bytes_ = weighted(entry)
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  return {"flops": flops, "bytes": bytes_, "xla_flops": float(xla.get("flops", 0.0)),
          "xla_bytes": float(xla.get("bytes accessed", 0.0)), "loops": loops,
          "unknown_trip_counts": sum(loop["source"].startswith("unknown") for loop in loops)}


# ----------------------------------------------------------------------------- TPU topologies


def tpu_compiler() -> Optional[str]:
  """libtpu's version if it is installed (the TPU compiler can then compile here), else None."""
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return None


_TOPOLOGY_3D = ("v4", "v5p")   # chips in an x*y*z torus; v5e and v6e in an x*y grid


def tpu_topology(generation: str, chips: int) -> str:
  """The smallest standard slice of at least `chips` chips (and at least one host's 4):
  ('v5p', 32) -> 'v5p:2x4x4', ('v5e', 16) -> 'v5e:4x4'."""
  n = max(4, 1 << max(chips - 1, 0).bit_length())
  dims = [1, 1, 1] if generation in _TOPOLOGY_3D else [1, 1]
  while math.prod(dims) < n:
    dims[dims.index(min(dims))] *= 2
  dims = sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]  # 2x2x1, 2x4x4
  return f"{generation}:{'x'.join(map(str, dims))}"


@functools.lru_cache(maxsize=None)
def topology_devices(name: str) -> tuple:
  # Compiling needs no chip, but libtpu takes a lockfile (/tmp/libtpu_lockfile) when it loads and
  # refuses to load while another local process holds it (any JAX process started without
  # JAX_PLATFORMS=cpu probes for a TPU and keeps the lock).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)


def tpu_devices(generation: str, chips: int) -> tuple[str, list]:
  """(topology name, `chips` of its TPU devices) to compile for with the TPU compiler."""
  name = tpu_topology(generation, chips)
  return name, list(topology_devices(name)[:chips])
