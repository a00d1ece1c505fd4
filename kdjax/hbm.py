"""HBM traffic of a compiled program, read from the program the compiler scheduled (its HLO text).

XLA's HloCostAnalysis ("bytes accessed", kdjax.compiled.cost) prices every instruction as reading
all of its operands and writing all of its result. On the programs this project compiles that is
several times what the chip moves through HBM (checked on the TPU compiler's sampler: 2.2-2.9x
per KV block), for three reasons it cannot see:

  - in-place updates: a fusion whose root is a dynamic-update-slice of one of its parameters (the
    KV cache's new slot, a scanned layer's gradient written into the stacked gradients) writes the
    update where the operand lies; it reads and writes the update, not the whole buffer;
  - partial reads: a fusion parameter used only through dynamic-slice, slice or gather (a layer's
    weights out of the stacked weights, the embedding rows of the tokens drawn) reads what those
    select, not the whole operand;
  - memory spaces: the TPU compiler prefetches arrays into on-chip memory (a layout's `S(1)`,
    VMEM; `S(2)`+ semaphores and scalar memory) with copy-start / copy-done; an operand or result
    there costs no HBM bytes, and the copy reads HBM once.

`traffic(hlo_text, trips)` counts, per device and call, every instruction of the scheduled
computations (the entry, loop bodies, a conditional's dearest branch; not the insides of fusions,
which run out of registers and on-chip memory) as its operands read and its result written, in
memory space 0 only, with the two corrections above; tuples, get-tuple-element, bitcasts,
parameters, constants and buffer allocations move nothing, and a while loop's body counts once per
iteration (trip counts by kdjax.compiled.loop_trips, as kdjax.compiled.cost weights them, the
data-dependent ones from `trips`). It is a model of the traffic, not a measurement: what a fusion
re-reads or spills is not in the HLO.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from kdjax import compiled

_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
         "call", "copy-done", "after-all", "partition-id", "replica-id", "opt-barrier",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
         "recv-done", "async-done", "add-dependency"}
_SELECTING = {"dynamic-slice", "slice", "gather"}
_PASS_THROUGH = {"bitcast", "reshape", "copy"}   # a parameter's view, followed to its users
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_ARRAY_AND_LAYOUT = re.compile(compiled._ARRAY.pattern + r"(\{[^}]*\})?")  # dtype, dims, layout
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


def _array_hbm_bytes(shape: str) -> float:
  """Bytes of the arrays in a shape string that live in HBM (layout memory space 0)."""
  total = 0.0
  for m in _ARRAY_AND_LAYOUT.finditer(shape):
    space = _MEMORY_SPACE.search(m.group(3) or "")
    if space is None or space.group(1) == "0":
      total += compiled._array_bytes(m.group(0))
  return total


def _instruction(line: str):
  """(name, result shape, opcode, operand names, rest) of one HLO instruction line."""
  lhs, rhs = line.split(" = ", 1)
  name = lhs.replace("ROOT", "").strip().lstrip("%")
  shape, rest = compiled._split_result(rhs)
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return name, shape, None, [], rest
  depth, end = 0, len(rest)
  for i in range(op.end() - 1, len(rest)):
    depth += rest[i] == "("
    depth -= rest[i] == ")"
    if depth == 0:
      end = i
      break
  operands = re.findall(r"%([\w.\-]+)", rest[op.end():end])
  return name, shape, op.group(1), operands, rest[end:]


def _fusion_reads_and_write(comps: dict, fused: str, memo: dict):
  """For fused computation `fused`: ({parameter index: bytes it reads} for the parameters read only
  in part, the bytes its result writes when its root (or an element of a root tuple) updates a
  parameter in place, else None); nested fusions followed. Memoised in `memo`."""
  if fused in memo:
    return memo[fused]
  body = comps[fused]
  instrs = [_instruction(line) for line in body]
  shapes = {name: shape for name, shape, *_ in instrs}
  users: dict = {}
  params, root = {}, None
  for line, (name, shape, op, operands, rest) in zip(body, instrs):
    if op == "parameter":
      params[name] = int(re.search(r"parameter\((\d+)\)", line).group(1))
    for j, o in enumerate(operands):
      users.setdefault(o, []).append((name, op, operands, j, rest))
    if line.startswith("ROOT"):
      root = (name, op, operands)

  def views(name):  # the parameter and its bitcasts / reshapes
    out, todo = [name], [name]
    while todo:
      for user, op, *_ in users.get(todo.pop(), ()):
        if op in _PASS_THROUGH:
          out.append(user)
          todo.append(user)
    return out

  partial = {}
  for name, index in params.items():
    read, whole = 0.0, False
    for v in views(name):
      for user, op, ops, j, rest in users.get(v, ()):
        if op in _PASS_THROUGH or (op == "dynamic-update-slice" and j == 0):
          continue
        if op in _SELECTING and j == 0:
          read += _array_hbm_bytes(shapes[user])
          continue
        callee = _CALLS.search(rest) if op == "fusion" else None
        inner = (_fusion_reads_and_write(comps, callee.group(1), memo)[0]
                 if callee and callee.group(1) in comps else {})
        if j in inner:
          read += inner[j]
        else:
          whole = True
    if not whole:
      partial[index] = read
  write = _in_place_write(instrs, shapes, params, users, views, root)
  memo[fused] = (partial, write)
  return memo[fused]


def _in_place_write(instrs, shapes, params, users, views, root) -> Optional[float]:
  """Bytes a fused computation's result writes when its root (or an element of a root tuple) is
  a dynamic-update-slice of one of its parameters: the update, not the buffer (None otherwise)."""
  if root is None:
    return None
  targets = {u[0] for n in params for v in views(n) for u in users.get(v, ())
             if u[1] == "dynamic-update-slice" and u[3] == 0}
  elements = root[2] if root[1] == "tuple" else [root[0]]
  if not targets.intersection(elements):
    return None
  operands = {name: ops for name, _, _, ops, _ in instrs}
  return sum(compiled._array_bytes(shapes[operands[e][1]]) if e in targets
             else _array_hbm_bytes(shapes[e]) for e in elements)


def _own(comps: dict, name: str, fusions: dict) -> float:
  """HBM bytes of computation `name`'s own instructions (its loops' bodies not included)."""
  shapes, total = {}, 0.0
  for line in comps[name]:
    iname, shape, op, operands, rest = _instruction(line)
    shapes[iname] = shape
    if op is None or op in _FREE or 'custom_call_target="AllocateBuffer"' in rest:
      continue
    reads = [_array_hbm_bytes(shapes.get(o, "")) for o in operands]
    write = _array_hbm_bytes(shape)
    if op == "copy-start":  # (destination, source, context): the source read, the copy written
      write = _array_hbm_bytes(shape.strip("()").split(", ")[0])
    elif op == "dynamic-update-slice":
      reads[0], write = 0.0, reads[1] if len(reads) > 1 else 0.0
    elif op in _SELECTING:
      reads[0] = write
    elif op == "fusion":
      callee = _CALLS.search(rest)
      if callee and callee.group(1) in comps:
        partial, in_place_write = _fusion_reads_and_write(comps, callee.group(1), fusions)
        for i, b in partial.items():
          if i < len(reads):
            reads[i] = min(reads[i], b)
        if in_place_write is not None:
          write = min(write, in_place_write)
    total += sum(reads) + write
  return total


def traffic(hlo_text: str, trips: Sequence[int] = ()) -> dict:
  """{"bytes": HBM bytes per device per call, "unknown_trip_counts": loops counted once}; `trips`
  as in kdjax.compiled.cost (the data-dependent loops' counts, in the order the program runs
  them)."""
  comps, entry = compiled._parse(hlo_text)
  given, fusions, unknown = list(trips), {}, [0]

  def weighted(name: str) -> float:
    total = _own(comps, name, fusions)
    for line in comps[name]:
      body = compiled._WHILE.search(line) if " while(" in line else None
      if not body:
        continue
      n, source = compiled.loop_trips(line, comps, given)
      unknown[0] += source.startswith("unknown")
      total += n * weighted(body.group(1))
    for line in comps[name]:  # a conditional runs one branch: the dearest is counted
      branches = compiled._BRANCHES.search(line)
      names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else
               re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
      if names:
        total += max(weighted(b) for b in names if b in comps)
    return total

  return {"bytes": weighted(entry), "unknown_trip_counts": unknown[0]}
