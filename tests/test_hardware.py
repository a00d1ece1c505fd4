"""kdjax/llm/study/hardware.py: the pricing arithmetic on a hand-checked small case, the names and
meshes it accepts and refuses, the compiled memory following the mesh, and the dry runs
(`--dry_run --hardware=...`) as a user runs them."""

import math

import pytest

from kdjax.cli import UserError
from kdjax import compiled
from kdjax.llm.study import hardware, programs
from kdjax.llm.model.config import LlamaConfig, get_preset
from kdjax.llm.study.config import StudyConfig
from tests.helpers import run_module

# vocab 100, hidden 8, MLP 16, 2 layers, 2 heads of 4, 1 kv head, tied, bf16.
# params: attention 8*4*(2*2 + 2*1) = 192, MLP 3*8*16 = 384, norms 2*8 = 16 -> 592 per layer;
#         embedding 100*8 = 800, final norm 8 -> 800 + 2*592 + 8 = 1992.
SMALL = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=4, dtype="bfloat16")
# 1 MFLOP/s peak, 10 kB/s HBM, 10 ms per layer and decode step, 2 chips per host.
CHIP = hardware.Chip("test", peak_flops=1e6, hbm_bandwidth=1e4, hbm_bytes=1e9, chips_per_host=2,
                     mfu=0.5, layer_step_s=0.01)


# decode.decode_cost on SMALL, counted here by hand (bf16 weights w = 2 B, float32 norms):
#   weights per layer 8*(2 + 2*1)*4 + 2*4*8 + 3*8*16 = 576; a pass reads (2*576 + 100*8) * 2 +
#   (2*2 + 1) norms * 8 * 4 = 4064 B and applies 2 * (2*576 + 800) = 3904 FLOPs per row;
#   K+V of one slot for 4 rows: 2 * 2 layers * 4 rows * 1 kv head * 4 * 2 B = 128 B.
# 4 rows, prompt 1, 9 new tokens, blocks of 4 slots: the cache holds 1 + 9 - 1 = 9 -> 3 blocks.
#   prefill: 4 * (2*2*576 + 2*8*100) + 4*2*4*2*4*1*1 = 15872 FLOPs; 4064 + 4*8*2 (embeddings)
#            + 12 slots * 128 (the cache written) + 4*100*4 (f32 logits) = 7264 B.
#   step i (token i+1) writes slot i, reads its blocks: 4 slots for i = 1..3, 8 for 4..7, 12 for 8:
#            4 * (3904 + 4*2*2*4 * read) FLOPs = 16640, 17664, 18688;
#            4064 + 64 + (read + 1) * 128 + 1600 B = 6368, 6880, 7392.
PREFILL, STEP4, STEP8, STEP12 = 7264, 6368, 6880, 7392


def test_decode_call_priced_on_the_blocks_read_by_hand():
  # HBM-bound (5000 B/s at MBU 0.5 against 5e5 FLOP/s): 7264 + 3 * 6368 + 4 * 6880 + 7392 B
  # = 61280 B -> 12.256 s, plus 9 tokens * 2 layers * 10 ms.
  seconds, bound = hardware.decode_call_seconds(SMALL, 4, 1, 9, CHIP, 0.5, 0.5, kv_block=4)
  assert bound == "HBM" and seconds == pytest.approx(12.256 + 0.18)
  assert (PREFILL + 3 * STEP4 + 4 * STEP8 + STEP12) / 5000 == pytest.approx(12.256)
  # Reading all 12 slots at every step (the pricing before the blocked cache) would be 7264 +
  # 8 * 7392 B = 66400 B -> 13.28 s: the figure above is not that.
  assert seconds < (PREFILL + 8 * STEP12) / 5000 + 0.18 - 0.5
  # every row ended after 5 tokens: the prefill and steps 1..4 -> 6.6496 s + 5 * 20 ms
  seconds, _ = hardware.decode_call_seconds(SMALL, 4, 1, 9, CHIP, 0.5, 0.5, steps=5, kv_block=4)
  assert seconds == pytest.approx((PREFILL + 3 * STEP4 + STEP8) / 5000 + 0.1)
  # 100x the bandwidth: FLOPs-bound, (15872 + 3*16640 + 4*17664 + 18688) / 5e5 = 0.310272 s
  fast = hardware.Chip("fast", 1e6, 1e6, 1e9, 2, 0.5, 0.01)
  seconds, bound = hardware.decode_call_seconds(SMALL, 4, 1, 9, fast, 0.5, 0.5, kv_block=4)
  assert bound == "FLOPs" and seconds == pytest.approx(0.310272 + 0.18)


def test_decode_call_takes_each_run_of_steps_at_its_own_bound():
  """A prompt of 4 tokens, 2 new, blocks of 4 (the cache holds 5 slots: 2 blocks):
  prefill 4 * (4*2*2*576 + 2*8*100) + 4*2*4*2*4*4*4 = 47360 FLOPs, 4064 + 4*4*8*2 + 8*128 + 1600
  = 6944 B; step 1 writes slot 4 and reads both blocks: 4 * (3904 + 64*8) = 17664 FLOPs, 6880 B.
  At 2e4 FLOP/s and 5000 B/s (MFU, MBU 0.5) the prefill is FLOPs-bound (2.368 s > 1.3888 s) and
  the step HBM-bound (1.376 s > 0.8832 s): the call is the sum of each part's own max (3.744 s),
  not the max of the sums (3.2512 s)."""
  chip = hardware.Chip("mixed", peak_flops=4e4, hbm_bandwidth=1e4, hbm_bytes=1e9,
                       chips_per_host=1, mfu=0.5, layer_step_s=0.0)
  seconds, bound = hardware.decode_call_seconds(SMALL, 4, 4, 2, chip, 0.5, 0.5, kv_block=4)
  assert seconds == pytest.approx(2.368 + 1.376) and bound == "FLOPs"


def test_sampling_and_scoring_by_hand():
  cfg = StudyConfig(sample_batch_size=4, shard_size=16, max_new_tokens=9, eval_batch_size=8)
  # 40 sequences: shards of 16, 16, 8 rows -> 4, 4, 2 chunks of 4 rows; shards 0 and 2 to process
  # 0 (6 chunks), shard 1 to process 1 (4): on 2 chips each, process 0 makes 3 calls of the
  # 4-row call above (each chip its own chunk) -> 3 * 12.436 s.
  assert programs.sampling_calls(cfg, 40, processes=2, local=2) == 3
  s = hardware.sampling_seconds(SMALL, 40, 1, cfg, CHIP, processes=2, local=2, mfu=0.5, mbu=0.5,
                                kv_block=4)
  assert s == pytest.approx(3 * 12.436)
  s = hardware.sampling_seconds(SMALL, 40, 1, cfg, CHIP, processes=2, local=2, mfu=0.5, mbu=0.5,
                                steps=5, kv_block=4)
  assert s == pytest.approx(3 * (6.6496 + 0.1))
  # 1 process, 3 chips: 10 chunks -> 4 calls (the last draws 1 chunk: its spare chips redraw it);
  # 8 rows a chip: a slot 256 B; prefill 4064 + 128 + 12 * 256 + 3200 = 10464 B; steps 4064 + 128
  # + (read + 1) * 256 + 3200 = 8672, 9696, 10720 B -> (10464 + 3*8672 + 4*9696 + 10720) / 5000
  # = 17.1968 s + 0.18 per call; 40 rows in chunks of 8: 2 + 2 + 1 = 5 chunks -> 2 calls.
  assert programs.sampling_calls(cfg, 40, processes=1, local=3) == 4
  cfg = StudyConfig(sample_batch_size=8, shard_size=16, max_new_tokens=9, eval_batch_size=8)
  s = hardware.sampling_seconds(SMALL, 40, 1, cfg, CHIP, processes=1, local=3, mfu=0.5, mbu=0.5,
                                kv_block=4)
  assert s == pytest.approx(2 * 17.3768)
  # scoring 40 rows of 10 tokens, batches of 8: 5 batches, 2 processes -> 3 rounds; per token
  # 3984 + 2*2*2*2*4*5 keys = 4304 FLOPs; a batch 8 * 10 * 4304 = 344320; 3 rounds on 2 chips:
  # 1032960 / (2 * 1e6 * 0.5) = 1.03296 s.
  s = hardware.scoring_seconds(SMALL, 40, 10, 8, CHIP, processes=2, local=2, mfu=0.5)
  assert s == pytest.approx(1.03296)
  assert hardware.compute_seconds(3.6e7, 2, CHIP, 0.5) == pytest.approx(36.0)


def test_teacher_validation_flops_by_hand():
  # 64 train rows / batch 8 = 8 steps an epoch, 3 epochs, validated every 4 steps -> 6 passes
  # over 16 selection rows of 10 tokens at 4304 FLOPs per token.
  cfg = StudyConfig(num_train=64, batch_size=8, teacher_epochs=3, eval_every=4, num_select=16)
  assert hardware.teacher_validation_flops(cfg, SMALL, 10) == 6 * 16 * 10 * 4304
  cfg = StudyConfig(num_train=64, batch_size=8, teacher_epochs=3, num_select=16, eval_sequences=4)
  assert hardware.teacher_validation_flops(cfg, SMALL, 10) == 3 * 4 * 10 * 4304  # once an epoch


def test_names_slices_and_meshes():
  h100 = hardware.CHIPS["h100"]
  assert hardware.parse("h100") == (h100, None)
  assert hardware.parse("H100-SXM") == (h100, None)
  assert hardware.parse("h100-8") == (h100, 8)
  assert hardware.parse("a100-80gb") == (hardware.CHIPS["a100"], None)
  assert hardware.parse("v5p-64") == (hardware.CHIPS["v5p"], 32)  # v5p names count TensorCores
  assert hardware.parse("v6e-16") == (hardware.CHIPS["v6e"], 16)
  v5p = hardware.CHIPS["v5p"]
  assert hardware.resolve_mesh("fsdp=8", v5p, 32) == (4, 8, 1)
  assert hardware.resolve_mesh("data=4,fsdp=8,tensor=1", v5p, 32) == (4, 8, 1)
  assert hardware.resolve_mesh("", h100, None) == (8, 1, 1)  # data=-1: one host
  assert hardware.resolve_mesh("data=1,fsdp=8,tensor=1", h100, None) == (1, 8, 1)
  assert hardware.hosts(v5p, 32) == (8, 4) and hardware.hosts(h100, 1) == (1, 1)
  with pytest.raises(UserError, match="spans 8 chips, the --hardware slice 32"):
    hardware.resolve_mesh("data=1,fsdp=8,tensor=1", v5p, 32)
  with pytest.raises(UserError, match="does not divide 8 chips"):
    hardware.resolve_mesh("fsdp=3", h100, None)
  with pytest.raises(UserError, match="2 cores per chip"):
    hardware.parse("v5p-63")


def test_unknown_hardware_is_one_line_naming_the_known():
  with pytest.raises(UserError) as e:
    hardware.parse("tpu9")
  assert "--hardware='tpu9': unknown; known: h100, h200, a100, v5e, v5p, v6e" in str(e.value)
  assert "\n" not in str(e.value)


def test_compiled_memory_follows_the_mesh():
  """`data` replicates the state, `fsdp` shards it: the train step's arguments per device halve
  from data=2 to fsdp=2; the sampler's arguments are the whole float32 parameters on each chip."""
  c = get_preset("test-tiny").replace(dtype="bfloat16")
  rep = hardware.train_memory(c, (2, 1, 1), 8, 16)["memory_gb"]["argument"]
  sharded = hardware.train_memory(c, (1, 2, 1), 8, 16)["memory_gb"]["argument"]
  assert sharded == pytest.approx(rep / 2, rel=0.05)
  state = c.num_params() * 4 * 3 / 1e9  # params + two Adam moments, float32
  assert rep == pytest.approx(state, rel=0.05)
  s = hardware.sampler_memory(c, 8, 1, 7, chips=2)
  assert s["memory_gb"]["argument"] == pytest.approx(c.num_params() * 4 / 1e9, rel=0.01)
  assert s["memory_per_device_gb"] > s["memory_gb"]["argument"]  # the bf16 decode copy, the cache
  assert hardware.scorer_memory(c, 8, 8, chips=2)["memory_per_device_gb"] > 0


def _run(*args, timeout=600):
  """experiments.llm on one CPU device, no cloud tools on the PATH."""
  return run_module("experiments.llm", *args, devices=None, timeout=timeout,
                    env={"PATH": "/usr/bin:/bin"})


STAGES = ("1_sample_ground_truth", "2_train_teacher", "3_sample_teacher", "4_train_students",
          "5_score_students")


def _hours(stdout: str) -> dict:
  table = stdout.split("training mesh", 1)[1]
  return {s: float(next(l for l in table.splitlines() if l.strip().startswith(s)).split()[1])
          for s in STAGES}


@pytest.mark.slow
def test_paper_flagfile_priced_on_h100():
  """The issue's check: llm_paper.flags on H100s, the hours of every stage (the compile-only
  memory analysis of the paper's models takes minutes: skipped here, run on test-tiny below)."""
  proc = _run("--flagfile=experiments/flags/llm_paper.flags", "--dry_run", "--hardware=h100",
              "--nomemory_analysis")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "hardware h100: 8 x H100-SXM (1 host(s) of 8), training mesh data=1,fsdp=8,tensor=1" in out
  hours = _hours(out)
  assert all(h > 0 for h in hours.values())
  # training the teacher: the plan's 5.8e19 FLOPs + its validation on 8 x 989 TFLOP/s x 0.4
  assert 4 < hours["2_train_teacher"] < 8
  for text in ("MFU 0.4 (--mfu)", "MBU 0.6 (--mbu)", "989 TFLOP/s", "3.35 TB/s", "not compiled"):
    assert text in out


@pytest.mark.slow
def test_tiny_study_priced_with_compiled_memory():
  """Every stage's programs compiled (2 fake devices) and judged against the chip's HBM."""
  proc = _run("--ground_truth=preset:test-tiny", "--tokenizer=bytes", "--teacher=preset:test-tiny",
              "--student=preset:test-tiny", "--temperatures=0.8,1.0", "--students=fkl",
              "--num_train=64", "--num_val=16", "--num_select=8", "--teacher_num_train=32",
              "--teacher_num_val=8", "--num_eval_samples=16", "--max_new_tokens=8",
              "--sample_batch_size=8", "--batch_size=8", "--eval_batch_size=8",
              "--dtype=bfloat16", "--mesh=data=1,fsdp=2", "--dry_run", "--hardware=v5e-2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "hardware v5e-2: 2 x TPU v5e (1 host(s) of 2), training mesh data=1,fsdp=2,tensor=1" in out
  memory = out.split("memory per device, compiled", 1)[1].split("assumptions:")[0]
  rows = [l.split() for l in memory.splitlines()[2:] if l.strip()]
  # samplers x3, scorers x2, the teacher's and the token-level students' train steps x2 (remat)
  assert len(rows) == 9 and all(r[2] == "yes" for r in rows), memory
  assert sum("remat layer" in l for l in memory.splitlines()) == 2
  assert "token-level x2 + teacher" in memory and "data=1,fsdp=2,tensor=1" in memory
  assert all(h >= 0 for h in _hours(out).values()) and math.isfinite(sum(_hours(out).values()))
  if compiled.tpu_compiler():  # the TPU compiler compiled every program, and timed the stages
    assert all("TPU compiler (libtpu" in l for l in memory.splitlines()[2:] if l.strip()), memory
    assert "hours from the TPU compiler's programs" in out and "TFLOP" in out
  else:
    assert "XLA:CPU on fake devices" in memory and "hours from datasheet formulas" in out


def test_roofline_of_a_compiled_program():
  """Hand-checked: 1e12 FLOPs at 459e12 x 0.5 = 4.357 ms; 1e10 bytes at 2.765e12 x 0.6 = 6.028 ms:
  HBM-bound; at 10x the FLOPs, 43.57 ms: FLOPs-bound."""
  v5p = hardware.CHIPS["v5p"]
  s, bound = programs.roofline({"flops": 1e12, "bytes_accessed": 1e10}, v5p, 0.5, 0.6)
  assert s == pytest.approx(6.028e-3, rel=1e-3) and bound == "HBM"
  s, bound = programs.roofline({"flops": 1e13, "bytes_accessed": 1e10}, v5p, 0.5, 0.6)
  assert s == pytest.approx(43.57e-3, rel=1e-3) and bound == "FLOPs"


@pytest.mark.slow
@pytest.mark.parametrize("args, expect", [
    (["--hardware=tpu9", "--dry_run"], "--hardware='tpu9': unknown; known: h100"),
    (["--hardware=h100"], "--hardware: only with --dry_run"),
    (["--hardware=v5p-64", "--dry_run"], "the --hardware slice 32"),
    (["--hardware=h100", "--dry_run", "--mfu=1.5"], "--mfu=1.5"),
])
def test_bad_hardware_flags_are_one_line(args, expect):
  proc = _run("--flagfile=experiments/flags/llm_paper.flags", "--nomemory_analysis", *args)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]


def test_a_program_the_compiler_refuses_for_memory_is_one_line(monkeypatch):
  """The TPU compiler refuses a program HBM cannot hold (RESOURCE_EXHAUSTED, as libtpu did for
  p*'s sampler at 624 rows per v5p chip): one `error:` line naming the stage and program."""
  import jax
  from kdjax.llm.study import cost
  from tests.helpers import TINY_STUDY

  def refuse(*args, **kw):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
                                     "memory required for HLO temporaries (101.69G)\nexceeds 95.74G")
  monkeypatch.setattr(programs, "sampler_memory", refuse)
  models = hardware._configs(TINY_STUDY, "")
  with pytest.raises(UserError) as e:
    programs.compile_stages(TINY_STUDY, cost.dry_run_plan(TINY_STUDY), models, (1, 1, 1), 1, [],
                            hardware.CHIPS["v5p"], print)
  assert ("1_sample_ground_truth: sampler ground_truth, 8 rows/chip (one chunk per chip, 1 chips) "
          "does not fit TPU v5p: RESOURCE_EXHAUSTED: Ran out of memory on HBM") in str(e.value)
  assert "\n" not in str(e.value)


def test_compiled_hours_count_matched_budgets_and_the_seed_scope():
  """The TPU path's call counts (programs.compiled_hours): every student kind trains
  cfg.student_steps per seed (matched budgets, not its own data set's size), and with
  --seed_scope=teacher each seed trains its own teacher and pays its validation."""
  report = {"flops": 1.0, "bytes_accessed": 1.0, "unknown_trip_counts": 0}
  labels = {"1_sample_ground_truth": ["sampler"], "2_train_teacher": ["train step teacher, batch"],
            "3_sample_teacher": ["sampler"],
            "4_train_students": ["train step direct, remat none", "train step seqkd x2, remat none"],
            "5_score_students": ["sampler", "scorer ground_truth", "scorer student"]}
  stages = {k: [(label, None, report) for label in v] for k, v in labels.items()}
  base = dict(temperatures=(0.8, 1.0), students=("direct", "seqkd"), num_train=640,
              teacher_num_train=64, student_num_train=128, batch_size=8, num_seeds=3,
              teacher_epochs=2)
  label = {"direct": "direct", "seqkd": "seqkd x2"}.get
  for scope, teachers in (("students", 1), ("teacher", 3)):
    cfg = StudyConfig(**base, seed_scope=scope)
    hours = programs.compiled_hours(cfg, stages, label, CHIP, 1, 2, 0.5, 0.6, 10.0)
    how = hours["4_train_students"][1]
    assert how.count(f"x {cfg.student_steps * 3} steps") == 2, how  # 16 steps x 3 seeds, each
    assert f"x {640 * 2 // 8 * teachers} steps" in hours["2_train_teacher"][1]
    assert f"validation {10.0 * teachers / 3600:.3g} h" in hours["2_train_teacher"][1]
