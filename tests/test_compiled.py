"""Compile-only footprints (kdjax.compiled, kdjax.llm.train.footprint) against hand-computed bytes, and
the FSDP mesh checked on the compiled train step: activations sharded over the batch, the LM
head's weight gradient reduced once per step."""

import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.llm.model import partition
from kdjax import compiled, sharding
from kdjax.llm.train import footprint
from kdjax.llm.model.config import get_preset
from tests.helpers import run_module

CFG = get_preset("test-tiny")  # V 256, D 64, F 128, 2 layers, 4 heads / 2 kv heads of 16


def _mesh8():
  return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def test_memory_of_a_known_program():
  c = jax.jit(lambda x: x + 1.0).lower(jnp.zeros((1000,), jnp.float32)).compile()
  mem = compiled.memory(c)
  assert mem["argument"] == 4000 and mem["output"] == 4000
  assert mem["total"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
  donated = jax.jit(lambda x: x + 1.0, donate_argnums=0).lower(
      jnp.zeros((1000,), jnp.float32)).compile()
  assert compiled.memory(donated)["alias"] == 4000  # the donated buffer is counted once


def test_collective_bytes_of_known_programs():
  mesh = _mesh8()
  x = jax.device_put(jnp.ones((8, 1024), jnp.float32), NamedSharding(mesh, P("x")))

  def psum_scan(a):  # an all-reduce of f32[1, 1024] (4096 bytes), five times in a loop
    def body(c, _):
      return c + jax.lax.psum(c + a, "x"), None  # depends on the carry: stays in the loop
    return jax.lax.scan(body, jnp.zeros_like(a), None, length=5)[0]

  f = jax.jit(jax.shard_map(psum_scan, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  r = compiled.collectives(f.lower(x).compile().as_text(), 8)
  assert r["all-reduce"]["count"] == 5
  assert r["all-reduce"]["bytes"] == pytest.approx(5 * 2 * 4096 * 7 / 8)

  gather = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P()))  # f32[8, 1024] gathered
  r = compiled.collectives(gather.lower(x).compile().as_text(), 8)
  assert r["all-gather"]["count"] == 1
  assert r["total_bytes"] == pytest.approx(8 * 1024 * 4 * 7 / 8)


def test_hlo_parsing_of_group_formats_loops_and_async_pairs():
  hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %g = bf16[4,8]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
  %r = (f32[16], f32[]) all-reduce(%y, %z), replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %s = f32[2]{0} reduce-scatter(%w), replica_groups=mesh['a'=2,'b'=4] {'b'}, dimensions={0}, to_apply=%add
  %t = (f32[1], f32[8]) all-gather-start(%v), replica_groups={}, dimensions={0}
  %d = f32[8] all-gather-done(%t)
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %p = (s32[], bf16[4,8]) parameter(0)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %w = (s32[], bf16[4,8]) while(%i), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %q = f32[2]{0} all-to-all(%x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}
"""
  r = compiled.collectives(hlo, 8)
  ag = 3 * (4 * 8 * 2 * 3 / 4 + 8 * 4 * 7 / 8)  # bf16[4,8] over 4; the async pair's f32[8] over 8
  assert r["all-gather"] == {"count": 6, "bytes": pytest.approx(ag)}
  assert r["all-reduce"] == {"count": 3, "bytes": pytest.approx(3 * 2 * (64 + 4) * 1 / 2)}
  assert r["reduce-scatter"] == {"count": 3, "bytes": pytest.approx(3 * 8 * 3)}
  assert r["all-to-all"] == {"count": 1, "bytes": pytest.approx(8 * 7 / 8)}
  assert r["unknown_trip_counts"] == 0


# The program as users' runs compile it: XLA:CPU's default fusion emitters, which the suite's
# XLA_TEST_FLAGS turn off to compile faster (tests/conftest.py). With the older emitters the
# embedding lookup's fusion shows an f32[16,128,8] operand the default pipeline does not have.
USERS_EMITTERS = {"xla_cpu_use_fusion_emitters": True}


def test_fsdp_shards_activations_over_the_batch_and_reduces_the_head_once():
  """fsdp=8, batch 16 x 128 of test-tiny: each device's program carries its own 2 rows with the
  whole hidden dimension through the layers (not all 16 rows with 64 / 8 of it), and the tied
  head's [256, 64] weight gradient is reduced over devices once per step (the fused head's loop
  runs over the device's own rows), not once per chunk of positions."""
  mesh = sharding.make_mesh(1, 8, 1)
  text = footprint.lower_train_step(CFG, mesh, 16, 128).compile(USERS_EMITTERS).as_text()
  assert "f32[2,128,64]" in text          # the residual stream: 2 rows per device, D whole
  assert "f32[16,128,8]" not in text      # not all rows with D over fsdp
  head = [i for i in compiled.collectives(text, 8)["instructions"]
          if i["kind"] == "all-reduce" and ("[256,64]" in i["shape"] or "[64,256]" in i["shape"])]
  assert sum(i["times"] for i in head) == 1, head


def test_footprint_train_step_students_and_remat():
  mesh = sharding.make_mesh(1, 8, 1)
  one = footprint.train_step(CFG, mesh, 16, 64)
  four = footprint.train_step(CFG, mesh, 16, 64, num_students=4)
  remat = footprint.train_step(CFG.replace(remat="layer"), mesh, 16, 64)
  for r in (one, four, remat):
    assert r["memory_per_device_gb"] > 0 and r["collective_gb_per_step"] > 0
  assert four["memory_gb"]["argument"] == pytest.approx(4 * one["memory_gb"]["argument"], rel=0.01)
  assert remat["memory_gb"]["temp"] < one["memory_gb"]["temp"]


@pytest.mark.slow
def test_bench_train_compile_only_prints_one_json_line():
  proc = run_module("experiments.bench_train", "--compile_only", "--preset=test-tiny",
                    "--mesh=fsdp=4", "--batch=8", "--seq=32", "--dtype=bfloat16", "--remat=layer",
                    "--students=2", devices=4, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1
  out = json.loads(lines[0])
  assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and out["students"] == 2
  assert out["memory_per_device_gb"] > 0 and out["collective_gb_per_step"] > 0
  bad = run_module("experiments.bench_train", "--compile_only", "--preset=test-tiny",
                   "--mesh=fsdp=3", "--batch=8", devices=4, timeout=120)
  assert bad.returncode != 0 and "error:" in bad.stderr


def test_forward_pass_activations_follow_the_batch_not_the_table():
  """Without the head's shard_map to pull the batch sharding through (a forward pass for
  scoring or evaluation), the residual stream's constraints alone keep each device on its own
  rows: the embedding lookup would otherwise inherit the table's fsdp sharding of D."""
  from kdjax.llm.model import llama as model
  mesh = sharding.make_mesh(1, 8, 1)
  psh = partition.param_shardings(CFG, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        model.abstract_params(CFG), psh)
  ids = jax.ShapeDtypeStruct((16, 128), jnp.int32, sharding=sharding.batch_sharding(mesh))

  def forward(p, x):
    with sharding.use_mesh(mesh):
      return model.hidden_states(CFG, p, x)

  text = jax.jit(forward).lower(params, ids).compile(USERS_EMITTERS).as_text()
  assert "f32[2,128,64]" in text and "f32[16,128,8]" not in text


def test_remat_reaches_train_lm_and_the_study_and_keeps_the_gradients():
  from kdjax.cli import UserError
  from kdjax.llm.model import llama as model
  from kdjax.llm.study import runs
  from kdjax.llm.study.config import StudyConfig
  from kdjax.llm.train import loop as train
  cfg = train.TrainConfig(model="preset:test-tiny", train_data=("synthetic:8",), steps=1,
                          batch_size=8, remat="layer")
  config, *_ = train._models(cfg, None)
  assert config.remat == "layer"
  tc = runs.train_config(StudyConfig(remat="dots"), "preset:test-tiny", ["d"], "v", 1, 0, 8)
  assert tc.remat == "dots"
  with pytest.raises(UserError, match="--remat='all'"):
    train.validate(train.TrainConfig(**{**cfg.__dict__, "remat": "all"}))
  assert get_preset("test-tiny").replace(remat=True).remat == "layer"  # older config.json files
  ids = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, CFG.vocab_size)
  params = model.init_params(CFG, jax.random.PRNGKey(1))

  def grads(c):
    return jax.grad(lambda p: -jnp.mean(model.token_logprobs(c, p, ids)))(params)

  want = grads(CFG)
  for policy in ("layer", "dots"):
    got = grads(CFG.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      assert jnp.allclose(a, b, atol=1e-6)


def test_bfloat16_study_samples_and_scores_with_bfloat16_weights_and_cache():
  from kdjax.llm.model import llama as model
  from kdjax.llm.study import pipeline
  from kdjax.llm.model import sampling
  params = model.init_params(CFG, jax.random.PRNGKey(0))
  c16, p16 = pipeline.for_inference(CFG, params, "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
  ids, mask = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), bool)
  caches = jax.eval_shape(  # the sampler's KV cache
      lambda p: sampling.decode.prefill(c16, sampling.decode_params(c16, p), ids, mask, 8)[1], p16)
  assert {x.dtype for x in jax.tree.leaves(caches)} == {jnp.dtype(jnp.bfloat16)}
  c32, p32 = pipeline.for_inference(CFG, params, "float32")
  assert {x.dtype for x in jax.tree.leaves(p32)} == {jnp.dtype(jnp.float32)}
  prompt = jnp.ones((2, 3), jnp.int32)
  out = sampling.sample(c16, p16, prompt, jnp.ones((2, 3), bool), jax.random.PRNGKey(1),
                        max_new_tokens=4, temperature=jnp.float32(1.0), eos_id=None)
  assert out.tokens_BxN.shape == (2, 4)


def test_auto_sample_batch_fits_the_cache_in_the_device_memory():
  from kdjax.cli import UserError
  from kdjax.llm.study import cost as plan
  # test-tiny, float32, 32 slots: a row's K and V = 2 x 2 layers x 2 kv heads x 16 x 32 x 4 B =
  # 16384 B, plus two float32 logit rows 2 x 256 x 4 = 2048 B: 18432 B per row
  weights = CFG.num_params() * 4
  device = (10 * 18432 + weights) / 0.7 + 1  # room for exactly 10 rows per device
  assert plan.auto_sample_batch(CFG, 32, device) == 10  # rows per device, whatever their count
  assert plan.auto_sample_batch(CFG, 32, 1e15) == plan.AUTO_SAMPLE_BATCH_MAX
  assert plan.auto_sample_batch(CFG, 32, None) == plan.AUTO_SAMPLE_BATCH_CPU
  assert plan.auto_sample_batch(CFG.replace(dtype="bfloat16"), 32, device) > 10
  with pytest.raises(UserError, match="do not fit"):
    plan.auto_sample_batch(CFG, 32, weights / 0.7)


@pytest.mark.slow
def test_study_dry_run_sizes_the_sampling_batch_for_the_hardware():
  h100 = run_module("experiments.llm", "--flagfile=experiments/flags/llm_smoke.flags", "--dry_run",
                    "--sample_batch_size=0", "--hardware=h100", "--nomemory_analysis",
                    devices=None, timeout=300)
  assert h100.returncode == 0, h100.stderr[-3000:]
  assert "sampling 1024 sequences per device at once (80 GB per device)" in h100.stderr
