"""kdjax.hbm.traffic (the HBM bytes of a scheduled program): in-place updates counted by their
update, partial reads by what they select (nested fusions followed), on-chip memory spaces free,
loops weighted by their trip counts; and on the TPU compiler's own program (skipped without
libtpu), a loop that writes one row of a buffer per iteration priced by the row, where XLA's
"bytes accessed" prices the whole buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import compiled, hbm

ROW = 128 * 4          # one f32[1,128] row
BUF = 1024 * ROW       # the f32[1024,128] buffer it is written into

MODULE = """HloModule m

%fused_dus (param_0: f32[1024,128], param_1: f32[1,128], param_2: s32[]) -> f32[1024,128] {
  %param_0 = f32[1024,128]{1,0} parameter(0)
  %param_1 = f32[1,128]{1,0} parameter(1)
  %param_2 = s32[]{:T(128)} parameter(2)
  %constant.0 = s32[] constant(0)
  %exp.1 = f32[1,128]{1,0} exponential(%param_1)
  ROOT %dus.1 = f32[1024,128]{1,0} dynamic-update-slice(%param_0, %exp.1, %param_2, %constant.0)
}

%fused_dus_tuple (param_0: f32[1024,128], param_1: f32[1,128], param_2: s32[]) -> (f32[1024,128], f32[1,128]) {
  %param_0 = f32[1024,128]{1,0} parameter(0)
  %bitcast.1 = f32[1024,128]{1,0} bitcast(%param_0)
  %param_1 = f32[1,128]{1,0} parameter(1)
  %param_2 = s32[]{:T(128)} parameter(2)
  %constant.0 = s32[] constant(0)
  %dus.2 = f32[1024,128]{1,0} dynamic-update-slice(%bitcast.1, %param_1, %param_2, %constant.0)
  %neg.1 = f32[1,128]{1,0} negate(%param_1)
  ROOT %tuple.1 = (f32[1024,128]{1,0}, f32[1,128]{1,0}) tuple(%dus.2, %neg.1)
}

%inner_slice (param_0: f32[1024,128], param_1: s32[]) -> f32[1,128] {
  %param_0 = f32[1024,128]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %constant.0 = s32[] constant(0)
  ROOT %ds.1 = f32[1,128]{1,0} dynamic-slice(%param_0, %param_1, %constant.0), dynamic_slice_sizes={1,128}
}

%fused_read (param_0: f32[1024,128], param_1: s32[], param_2: f32[1,128]) -> f32[1,128] {
  %param_0 = f32[1024,128]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %param_2 = f32[1,128]{1,0} parameter(2)
  %fusion.in = f32[1,128]{1,0} fusion(%param_0, %param_1), kind=kLoop, calls=%inner_slice
  ROOT %add.1 = f32[1,128]{1,0} add(%fusion.in, %param_2)
}

%fused_whole (param_0: f32[1024,128]) -> f32[1024,128] {
  %param_0 = f32[1024,128]{1,0} parameter(0)
  ROOT %neg.2 = f32[1024,128]{1,0} negate(%param_0)
}

%body (p: (s32[], f32[1024,128], f32[1,128])) -> (s32[], f32[1024,128], f32[1,128]) {
  %p = (s32[], f32[1024,128]{1,0}, f32[1,128]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %buf = f32[1024,128]{1,0} get-tuple-element(%p), index=1
  %row = f32[1,128]{1,0} get-tuple-element(%p), index=2
  %read = f32[1,128]{1,0} fusion(%buf, %i, %row), kind=kLoop, calls=%fused_read
  %upd = f32[1024,128]{1,0} fusion(%buf, %read, %i), kind=kLoop, calls=%fused_dus
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[1024,128]{1,0}, f32[1,128]{1,0}) tuple(%next, %upd, %read)
}

%cond (p: (s32[], f32[1024,128], f32[1,128])) -> pred[] {
  %p = (s32[], f32[1024,128]{1,0}, f32[1,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(30)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[1024,128], r: f32[1,128]) -> (s32[], f32[1024,128], f32[1,128]) {
  %a = f32[1024,128]{1,0} parameter(0)
  %r = f32[1,128]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %w = f32[1024,128]{1,0} fusion(%a), kind=kLoop, calls=%fused_whole
  %init = (s32[], f32[1024,128]{1,0}, f32[1,128]{1,0}) tuple(%zero, %w, %r)
  ROOT %loop = (s32[], f32[1024,128]{1,0}, f32[1,128]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_in_place_updates_and_partial_reads_cost_what_they_touch():
  comps, _ = compiled._parse(MODULE)
  memo = {}
  # the updated parameter is not read; the result writes its row
  assert hbm._fusion_reads_and_write(comps, "fused_dus", memo) == ({0: 0.0}, ROW)
  # a root tuple: the updated element is its row, the other element whole; bitcast views followed
  assert hbm._fusion_reads_and_write(comps, "fused_dus_tuple", memo) == ({0: 0.0}, 2 * ROW)
  # read through a nested fusion's dynamic-slice: the row, not the buffer
  assert hbm._fusion_reads_and_write(comps, "fused_read", memo) == ({0: ROW}, None)
  assert hbm._fusion_reads_and_write(comps, "fused_whole", memo) == ({}, None)
  # one iteration: the read fusion reads a row (+ the row operand) and writes a row; the update
  # reads the update row and writes it in place (+ 5 scalar indices and the counter's add)
  assert hbm._own(comps, "body", {}) == (ROW + ROW + ROW) + (ROW + ROW) + 5 * 4


def test_loops_are_weighted_and_the_entry_counts_whole_operands():
  step = 5 * ROW + 5 * 4  # test_in_place_updates_...: one iteration of the body
  t = hbm.traffic(MODULE)
  assert t == {"bytes": 2 * BUF + 30 * step, "unknown_trip_counts": 0}
  unknown = MODULE.replace("direction=LT", "direction=LE")  # a count the program does not fix
  assert hbm.traffic(unknown, trips=[7])["bytes"] == 2 * BUF + 7 * step
  assert hbm.traffic(unknown) == {"bytes": 2 * BUF + step, "unknown_trip_counts": 1}


def test_on_chip_memory_spaces_cost_no_hbm_bytes():
  vmem = "f32[1024,128]{1,0:T(8,128)S(1)}"
  assert hbm._array_hbm_bytes(vmem) == 0
  assert hbm._array_hbm_bytes(vmem.replace("S(1)", "S(0)")) == BUF
  assert hbm._array_hbm_bytes(f"(f32[1024,128]{{1,0:T(8,128)}}, {vmem})") == BUF
  comps = {"c": ["%a = f32[1024,128]{1,0} parameter(0)",
                 f"%cs = ({vmem}, f32[1024,128]{{1,0}}, u32[]{{:S(2)}}) copy-start(%a)",
                 f"%cd = {vmem} copy-done(%cs)",
                 f"ROOT %n = {vmem} negate(%cd)"]}
  assert hbm._own(comps, "c", {}) == BUF  # the prefetch reads HBM once; the rest is on chip


needs_tpu = pytest.mark.skipif(compiled.tpu_compiler() is None,
                               reason="libtpu not installed (setup.py's tpu extra)")


@needs_tpu
def test_the_tpu_compilers_stacked_outputs_cost_a_row_per_step_not_the_stack():
  """A scan stacking its outputs (a layer scan's saved activations): the TPU compiler fuses each
  step's write into the stack with the matmul that makes it; the stack is written once in all."""
  _, devices = compiled.tpu_devices("v5p", 1)
  sh = NamedSharding(Mesh(np.array(devices), ("x",)), P())
  steps, width = 64, 256

  def stack(x_8xW, w_WxW):
    def body(x, _):
      y = jnp.tanh(x @ w_WxW)
      return y, 2 * y
    return jax.lax.scan(body, x_8xW, None, length=steps)

  x = jax.ShapeDtypeStruct((8, width), jnp.float32, sharding=sh)
  exe = jax.jit(stack).lower(x, jax.ShapeDtypeStruct((width, width), jnp.float32,
                                                     sharding=sh)).compile()
  row, w, out = 8 * width * 4, width * width * 4, steps * 8 * width * 4
  moved = hbm.traffic(exe.as_text())["bytes"]
  # at least the stack written once; at most the weights and the stack twice and a few rows a step
  # (XLA's own count, 11.4 MB here, is the whole stack read and written at every step)
  assert out <= moved <= 2 * (w + out) + steps * 4 * row, (moved, compiled.cost(exe)["bytes"])
