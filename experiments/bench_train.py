"""Benchmark: one full training step (forward, backward, AdamW) in kdjax vs PyTorch eager.

  python -m experiments.bench_train --preset=tiny-49k --batch=16 --seq=128 --steps=8

Prints ONE JSON line: tokens_per_s of kdjax's jitted train step (compile excluded), the same for
transformers' LlamaForCausalLM + torch.optim.AdamW on the same configuration and batch (measured
in the same run, interleaved rounds, best round of each), the speedup, and achieved FLOP/s as a
fraction of a matmul peak measured on the same device in the same run (a jitted f32 jnp.dot).

  python -m experiments.bench_train --preset=nano-49k --kd_temperatures=4 --teacher=micro-49k

  python -m experiments.bench_train --compile_only --preset=smollm2-135m --mesh=fsdp=8 \
      --batch=64 --seq=512 --dtype=bfloat16 [--remat=layer] [--students=4]

With --compile_only: nothing runs. The train step is compiled for the mesh from abstract arrays
(kdjax.llm.train.footprint; fake CPU devices stand in for accelerators:
XLA_FLAGS=--xla_force_host_platform_device_count=8; or, with --topology=v5p:2x2x2 and libtpu installed,
the TPU compiler for that topology's devices) and ONE JSON line gives its cost per device:
memory_per_device_gb (XLA's memory analysis: arguments + outputs + temporaries, a donated state
counted once) and collective_gb_per_step (bytes each device sends in all-gathers,
reduce-scatters, all-reduces and all-to-alls per step, read from the compiled HLO; kdjax.compiled
says how). --students=N: N students vmapped, each on its own batch (the study's students stage).

With --kd_temperatures=N: teacher-only tempered KD instead (kdjax.llm.train.loop's
teacher_temperatures): N students vmapped over N temperatures on one shared batch (the teacher run
once per step) against N one-by-one single-student runs of the same steps; prints ONE JSON line
with both times per step and the speedup (N x one-by-one time / vmapped time).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from kdjax import cli, compiled, sharding
from kdjax.llm.model import llama as model
from kdjax.llm.model import partition
from kdjax.llm.model.config import get_preset
from kdjax.llm.train import footprint
from kdjax.llm.train import loop as train

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny-49k", "Model preset (kdjax.llm.model.config.PRESETS).")
flags.DEFINE_integer("batch", 16, "Sequences per step.")
flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
flags.DEFINE_integer("steps", 8, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps before each side's first round.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds (kdjax, torch, kdjax, torch, ...).")
flags.DEFINE_bool("torch", True, "Measure the PyTorch baseline.")
flags.DEFINE_integer("peak_size", 2048, "n of the n^3 f32 matmul that measures the peak.")
flags.DEFINE_integer("kd_temperatures", 0, "N > 0: time N students vmapped over N teacher "
                     "temperatures against N one-by-one runs (teacher-only tempered KD).")
flags.DEFINE_string("teacher", "micro-49k", "Teacher preset of --kd_temperatures.")
flags.DEFINE_bool("compile_only", False, "Compile the step for --mesh and report its memory and "
                  "collective bytes per device (one JSON line); nothing runs.")
flags.DEFINE_string("mesh", "", "--compile_only: the mesh, e.g. fsdp=8 or data=2,fsdp=4 "
                    "(kdjax.sharding.parse_mesh; default: data over every device).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (parameters and "
                  "optimizer state stay float32).")
flags.DEFINE_enum("remat", "none", ["none", "layer", "dots"], "Rematerialisation policy "
                  "(kdjax.llm.model.config.LlamaConfig.remat).")
flags.DEFINE_string("topology", "", "--compile_only: compile with the TPU compiler for this TPU "
                    "topology, e.g. v5p:2x2x2 (needs libtpu: setup.py's tpu extra; nothing runs "
                    "on a TPU) instead of XLA:CPU on fake CPU devices.")
flags.DEFINE_integer("students", 0, "--compile_only: N > 0 students vmapped, each on its own "
                     "batch [N, B, T] (the study's students stage).")


def _validate():
  for name in ("batch", "seq", "steps", "rounds", "peak_size"):
    cli.require(FLAGS[name].value >= 1, f"--{name}={FLAGS[name].value} must be >= 1")
  cli.require(FLAGS.warmup >= 0, f"--warmup={FLAGS.warmup} must be >= 0")
  cli.require(FLAGS.seq >= 2, f"--seq={FLAGS.seq} must be >= 2")
  cli.require(FLAGS.kd_temperatures >= 0, f"--kd_temperatures={FLAGS.kd_temperatures} must be >= 0")
  cli.require(FLAGS.students >= 0, f"--students={FLAGS.students} must be >= 0")
  cli.require(FLAGS.compile_only or not (FLAGS.mesh or FLAGS.students or FLAGS.topology),
              "--mesh, --students and --topology are flags of --compile_only")
  cli.require(not FLAGS.topology or compiled.tpu_compiler() is not None,
              f"--topology={FLAGS.topology}: the TPU compiler (libtpu) is not installed: "
              "pip install -e '.[tpu]'")


def compile_only_report(config) -> dict:
  """The train step compiled for --mesh from abstract arrays: its footprint per device."""
  devices = None
  if FLAGS.topology:
    try:
      devices = compiled.topology_devices(FLAGS.topology)
    except Exception as e:  # libtpu's own message names the bad topology
      raise cli.UserError(f"--topology={FLAGS.topology}: {str(e).splitlines()[0]}") from None
  mesh = sharding.mesh_from_text(FLAGS.mesh, devices=devices)
  out = {"mode": "compile_only", "preset": FLAGS.preset, "mesh": dict(mesh.shape),
         "batch": FLAGS.batch, "seq": FLAGS.seq, "dtype": FLAGS.dtype, "remat": FLAGS.remat,
         "students": FLAGS.students or None}
  cli.require(FLAGS.batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0,
              f"--batch={FLAGS.batch} must divide by data x fsdp = "
              f"{mesh.shape['data'] * mesh.shape['fsdp']}")
  out.update(footprint.train_step(config, mesh, FLAGS.batch, FLAGS.seq,
                                  num_students=FLAGS.students or None))
  device = mesh.devices.flat[0]
  out.update(device=str(device.device_kind), num_devices=mesh.size, jax_version=jax.__version__,
             compiled_by=(f"TPU compiler (libtpu {compiled.tpu_compiler()}) for {FLAGS.topology}"
                          if FLAGS.topology else "XLA:CPU on fake devices"))
  return out


def matmul_peak(n: int) -> float:
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


class JaxSide:
  def __init__(self, config, ids):
    self.jax = jax
    spec = train.StepSpec(model=config, total_steps=10_000, lr=5e-4, warmup_frac=0.0, clip=1.0)
    mesh = sharding.make_mesh()
    self.state, sh = train.init_state(spec, mesh, seed=0)
    bsh = sharding.batch_sharding(mesh)
    self.batch = jax.device_put({"input_ids": ids, "attention_mask": ids >= 0}, bsh)
    t = time.perf_counter()
    self.step = train.compile_train_step(spec, sh, bsh).lower(self.state, self.batch, None).compile()
    self.compile_seconds = time.perf_counter() - t

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.batch, None)
    self.jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t


class TemperedKDSide:
  """Teacher-only tempered KD steps: n students vmapped on one shared batch (n_students=n), or
  one student (n_students=None) at one temperature."""

  def __init__(self, config, teacher_config, ids, n_students):
    self.jax = jax
    spec = train.StepSpec(model=config, total_steps=10_000, lr=5e-4, warmup_frac=0.0, clip=1.0,
                          teacher=teacher_config, objective="fkl", tempered_teacher=True,
                          num_students=n_students, shared_batch=n_students is not None)
    mesh = sharding.make_mesh()
    self.state, sh = train.init_state(spec, mesh, seed=0)
    tsh = partition.param_shardings(teacher_config, mesh)
    self.teacher = jax.device_put(model.init_params(teacher_config, jax.random.PRNGKey(1)), tsh)
    bsh = sharding.batch_sharding(mesh)
    self.batch = jax.device_put({"input_ids": ids, "attention_mask": ids >= 0}, bsh)
    temps = [0.5 + 0.25 * i for i in range(n_students or 1)]
    self.temps = jnp.asarray(temps if n_students else temps[0], jnp.float32)
    t = time.perf_counter()
    self.step = train.compile_train_step(spec, sh, bsh, tsh).lower(
        self.state, self.batch, self.teacher, self.temps).compile()
    self.compile_seconds = time.perf_counter() - t

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.batch, self.teacher, self.temps)
    self.jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t


def _best_of_rounds(sides: dict) -> dict:
  """Warm each side up, then the best --steps time of each over --rounds interleaved rounds."""
  for side in sides.values():
    side.run(FLAGS.warmup)
  best = {k: float("inf") for k in sides}
  for _ in range(FLAGS.rounds):
    for k, side in sides.items():
      best[k] = min(best[k], side.run(FLAGS.steps))
  return best


def tempered_kd_benchmark(config, ids) -> dict:
  """N vmapped temperatures vs N one-by-one runs of the same steps (best of --rounds each)."""
  n = FLAGS.kd_temperatures
  teacher = get_preset(FLAGS.teacher)
  sides = {"vmapped": TemperedKDSide(config, teacher, ids, n),
           "one": TemperedKDSide(config, teacher, ids, None)}
  best = _best_of_rounds(sides)
  one_by_one = n * best["one"]  # n separate runs of the same steps, one after the other
  return {"mode": "kd_temperatures", "num_temperatures": n, "preset": FLAGS.preset,
          "teacher": FLAGS.teacher, "batch": FLAGS.batch, "seq": FLAGS.seq, "steps": FLAGS.steps,
          "rounds": FLAGS.rounds,
          "vmapped_step_ms": round(1000 * best["vmapped"] / FLAGS.steps, 2),
          "one_student_step_ms": round(1000 * best["one"] / FLAGS.steps, 2),
          "one_by_one_step_ms": round(1000 * one_by_one / FLAGS.steps, 2),
          "speedup": round(one_by_one / best["vmapped"], 3),
          "compile_seconds": {k: round(v.compile_seconds, 2) for k, v in sides.items()}}


class TorchSide:
  def __init__(self, config, ids):
    import torch
    import transformers
    self.torch = torch
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings)
    self.model = transformers.LlamaForCausalLM(hf).train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=5e-4, betas=(0.9, 0.95),
                                 weight_decay=0.0)
    self.ids = torch.from_numpy(ids).long()
    self.mask = torch.ones_like(self.ids)

  def run(self, n: int) -> float:
    torch = self.torch
    t = time.perf_counter()
    for _ in range(n):
      self.opt.zero_grad(set_to_none=True)
      loss = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
      self.opt.step()
    return time.perf_counter() - t


def main(argv):
  cli.require(len(argv) == 1, f"unexpected arguments: {' '.join(argv[1:])}")
  _validate()

  config = get_preset(FLAGS.preset).replace(dtype=FLAGS.dtype, remat=FLAGS.remat)
  if FLAGS.compile_only:
    print(json.dumps(compile_only_report(config)), flush=True)
    return
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (FLAGS.batch, FLAGS.seq)).astype(np.int32)
  if FLAGS.kd_temperatures:
    out = tempered_kd_benchmark(config, ids)
    out.update(device=str(jax.devices()[0].device_kind), num_devices=jax.device_count(),
               jax_version=jax.__version__)
    print(json.dumps(out), flush=True)
    return
  tokens = FLAGS.batch * FLAGS.seq * FLAGS.steps
  sides = {"jax": JaxSide(config, ids)}
  if FLAGS.torch:
    sides["torch"] = TorchSide(config, ids)
  best = _best_of_rounds(sides)
  peak = matmul_peak(FLAGS.peak_size)
  jax_tps = tokens / best["jax"]
  achieved = jax_tps * config.flops_per_token(FLAGS.seq)
  out = {
      "preset": FLAGS.preset, "batch": FLAGS.batch, "seq": FLAGS.seq, "steps": FLAGS.steps,
      "rounds": FLAGS.rounds,
      "tokens_per_s": round(jax_tps, 1),
      "step_ms": round(1000 * best["jax"] / FLAGS.steps, 2),
      "compile_seconds": round(sides["jax"].compile_seconds, 2),
      "achieved_flops": round(achieved / 1e9, 2) * 1e9,
      "matmul_peak_flops": round(peak / 1e9, 2) * 1e9,
      "fraction_of_matmul_peak": round(achieved / peak, 4),
      "flops_per_token": config.flops_per_token(FLAGS.seq),
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
  }
  if FLAGS.torch:
    import torch
    torch_tps = tokens / best["torch"]
    out.update({"torch_tokens_per_s": round(torch_tps, 1),
                "torch_step_ms": round(1000 * best["torch"] / FLAGS.steps, 2),
                "speedup": round(jax_tps / torch_tps, 3), "torch_threads": torch.get_num_threads(),
                "torch_version": torch.__version__})
  out["jax_version"] = jax.__version__
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  cli.run(main)
