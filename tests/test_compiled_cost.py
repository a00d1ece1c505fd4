"""kdjax.compiled.cost (FLOPs and bytes per call, loops weighted by their trip counts), the trip
counts the TPU compiler leaves unprinted, the TPU topologies, and programs compiled by the TPU
compiler on this CPU (skipped without libtpu: `pip install -e ".[tpu]"`)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import compiled, sharding
from kdjax.llm.model.config import get_preset
from kdjax.llm.train import footprint
from tests.helpers import run_module

N = 64  # a 64 x 64 matmul on 8 rows: 2 * 8 * 64 * 64 = 65536 FLOPs
MATMUL = 2 * 8 * N * N
ELEMENTWISE = 10 * 8 * N  # at most 10 FLOPs per element and iteration besides (tanh, the sum)
needs_tpu = pytest.mark.skipif(compiled.tpu_compiler() is None,
                               reason="libtpu not installed (setup.py's tpu extra)")


def _loops(w_LxNxN, x_8xN):
  """3 x (a scan over L layers), then a data-dependent while loop of one matmul per step."""
  layer = lambda x, w: (jnp.tanh(x @ w), None)
  x = jax.lax.fori_loop(0, 3, lambda i, x: jax.lax.scan(layer, x, w_LxNxN)[0], x_8xN)
  return jax.lax.while_loop(lambda c: c[1] < jnp.sum(c[0]), lambda c: (c[0] @ w_LxNxN[0], c[1] + 1),
                            (x, 0))[0]


def _compile(layers, sh=None):
  w = jax.ShapeDtypeStruct((layers, N, N), jnp.float32, sharding=sh)
  x = jax.ShapeDtypeStruct((8, N), jnp.float32, sharding=sh)
  return jax.jit(_loops).lower(w, x).compile()


def test_cost_weights_every_loop_body_by_its_trip_count():
  c = compiled.cost(_compile(5), trips=[7])
  # 3 x 5 scanned matmuls + 7 while-loop matmuls, and a few elementwise FLOPs per iteration
  assert MATMUL * 22 <= c["flops"] < (MATMUL + ELEMENTWISE) * 22
  assert [(l["trip"], l["source"]) for l in c["loops"]] == [(3, "program"), (5, "program"),
                                                            (7, "given")]
  assert c["unknown_trip_counts"] == 0
  # XLA's own analysis prices each body once: one scanned matmul and one while-loop matmul
  assert c["xla_flops"] < (MATMUL + ELEMENTWISE) * 2
  # bytes follow the loops too: each iteration reads its 64 x 64 float32 weight at least
  assert c["bytes"] >= (3 * 5 + 7) * N * N * 4
  assert compiled.cost(_compile(5))["unknown_trip_counts"] == 1


def test_trip_count_from_the_condition_when_none_is_printed():
  comps = {"cond": ["%constant.1 = s32[]{:T(128)} constant(30)",
                    "%gte = s32[]{:T(128)} get-tuple-element(%p), index=0",
                    "ROOT %lt.7 = pred[]{:T(512)} compare(%gte, %constant.1), direction=LT"]}
  line = "%while.1 = (s32[]) while(%tuple), condition=%cond, body=%body"
  assert compiled._trip_count(line, comps) == 30
  assert compiled._trip_count(line + ', backend_config={"known_trip_count":{"n":"12"}}', comps) == 12
  comps["cond"][-1] = comps["cond"][-1].replace("direction=LT", "direction=LE")
  assert compiled._trip_count(line, comps) is None


def test_tpu_topology_is_the_smallest_standard_slice():
  assert compiled.tpu_topology("v5p", 1) == "v5p:2x2x1"
  assert compiled.tpu_topology("v5p", 8) == "v5p:2x2x2"
  assert compiled.tpu_topology("v5p", 32) == "v5p:2x4x4"
  assert compiled.tpu_topology("v5p", 64) == "v5p:4x4x4"
  assert compiled.tpu_topology("v5e", 8) == "v5e:2x4"
  assert compiled.tpu_topology("v6e", 16) == "v6e:4x4"
  assert compiled.tpu_topology("v6e", 12) == "v6e:4x4"


@needs_tpu
def test_the_tpu_compiler_compiles_here_and_its_loops_are_counted():
  name, devices = compiled.tpu_devices("v5p", 1)
  assert name == "v5p:2x2x1" and devices[0].platform == "tpu"
  assert jax.devices()[0].platform == "cpu"  # the TPU is a compile target only
  exe = _compile(5, NamedSharding(Mesh(np.array(devices), ("x",)), P()))
  assert "TPU" in exe.as_text() or exe.memory_analysis() is not None
  c = compiled.cost(exe, trips=[7])
  assert MATMUL * 22 <= c["flops"] < (MATMUL + ELEMENTWISE) * 22
  assert all(l["source"] in ("program", "given") for l in c["loops"])  # no known_trip_count printed


@needs_tpu
def test_train_step_compiled_by_the_tpu_compiler_for_a_v5p_slice():
  _, devices = compiled.tpu_devices("v5p", 4)
  mesh = sharding.make_mesh(1, 4, 1, devices=devices)
  out = footprint.train_step(get_preset("test-tiny").replace(dtype="bfloat16"), mesh, 8, 32)
  assert out["memory_per_device_gb"] > 0 and out["collective_gb_per_step"] > 0
  assert out["unknown_trip_counts"] == 0  # the layer scans' counts read from their conditions


def _head_chunk_logits(devices) -> set:
  """The [B, positions, V] float32 logits shapes in the lowered train step of a one-layer model
  of hidden size D = 512 (V = 256) on 2 x 256 rows on one device: the fused head's chunks
  (head_nll.chunk_rows, by the platform the mesh is on)."""
  cfg = get_preset("test-tiny").replace(hidden_size=512, intermediate_size=512, num_layers=1,
                                        vocab_size=256)
  mesh = sharding.make_mesh(1, 1, 1, devices=devices[:1])
  text = footprint.lower_train_step(cfg, mesh, 2, 256).as_text()
  return set(re.findall(r"tensor<2x(\d+)x256xf32>", text))


@needs_tpu
def test_the_fused_head_chunks_by_the_platform_compiled_for():
  """512 rows per device at D = 512: chunks of 2 x 128 positions on CPU (the cache-sized 256
  rows), one chunk of 2 x 256 on a TPU (head_nll.chunk_rows: at least D rows)."""
  _, devices = compiled.tpu_devices("v5p", 1)
  assert "128" in _head_chunk_logits(jax.devices())
  assert "128" not in _head_chunk_logits(devices)


@pytest.mark.slow
@needs_tpu
def test_bench_train_compile_only_for_a_tpu_topology():
  proc = run_module("experiments.bench_train", "--compile_only", "--preset=test-tiny",
                    "--mesh=fsdp=8", "--batch=8", "--seq=32", "--dtype=bfloat16",
                    "--topology=v5p:2x2x2", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
  assert out["compiled_by"] == f"TPU compiler (libtpu {compiled.tpu_compiler()}) for v5p:2x2x2"
  assert out["device"].startswith("TPU v5") and out["num_devices"] == 8
  assert out["memory_per_device_gb"] > 0 and out["flops"] > out["xla_flops"]  # 2 layers, 1 counted
  bad = run_module("experiments.bench_train", "--compile_only", "--preset=test-tiny",
                   "--topology=v5p:3x3x3", timeout=120)
  assert bad.returncode != 0 and "error: --topology=v5p:3x3x3" in bad.stderr, bad.stderr[-2000:]


@needs_tpu
def test_the_sampler_blocks_its_cache_by_the_platform_compiled_for():
  """decode.kv_block: 64-slot KV blocks on CPU, 128 on a TPU: 200 new tokens are 4 block loops
  on one and 2 on the other, each weighted by its own trip count (none unknown), and the cache
  blocks in the programs have those sizes."""
  from kdjax.llm.model import decode
  cfg = get_preset("test-tiny")
  _, tpu = compiled.tpu_devices("v5p", 1)
  for devices, block in ((jax.devices()[:1], 64), (tpu[:1], 128)):
    assert decode.kv_block(devices[0].platform) == block
    mesh = sharding.make_mesh(1, 1, 1, devices=devices)
    out = footprint.sampler(cfg, mesh, 2, 1, 200)
    assert out["compiler"] == devices[0].platform and out["unknown_trip_counts"] == 0
    assert out["loops"] == -(-200 // block)  # the prompt's slot 0, then 199 slots drawn into
