"""What many test files share, defined once: the tiny model, the tiny SmolLM2 study (in-process
and as entry-point flags), and one way to run a command as a user would (a subprocess).

Subprocesses get the test process's environment made explicit: JAX on the CPU, Hugging Face
offline, the repository on PYTHONPATH, cwd = the repository, and `devices` fake CPU devices
(8 like the tests themselves; None = no device count: the one CPU device a user has), and
conftest's XLA_TEST_FLAGS (a fast compile).

Tiers (README, "Tests"): `pytest -m "not slow"` skips what conftest's markers call slow: end-to-end
runs (a flagfile, an entry point in a subprocess, a whole tiny study) and multi-process runs.
"""

import dataclasses
import glob
import json
import os
import struct
import subprocess
import sys

import jax

from kdjax.gmm import study as gmm_study
from kdjax.llm.model.config import get_preset
from kdjax.llm.study import work
from kdjax.llm.study.config import StudyConfig
from tests.conftest import XLA_TEST_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = get_preset("test-tiny")  # V 256, D 64, F 128, 2 layers, 4 heads / 2 kv heads of 16

# The SmolLM2 study at tiny size: a random test-tiny ground truth (vocabulary 256) with the byte
# tokenizer; teacher and students are test-tiny presets trained on a few dozen 8-token samples.
# The spec seeds (preset:NAME@SEED) go through the whole study.
TINY_STUDY = StudyConfig(
    ground_truth="preset:test-tiny@7", tokenizer="bytes", teacher="preset:test-tiny@5",
    student="preset:test-tiny", temperatures=(0.8, 1.0), num_train=32, num_val=16, num_select=8,
    teacher_num_train=32, teacher_num_val=8, num_eval_samples=16, max_new_tokens=8,
    sample_batch_size=8, shard_size=8, teacher_epochs=2, student_epochs=1, batch_size=8,
    learning_rate=3e-3, checkpoint_every=2, eval_batch_size=8, embedding_map="pca")


def study_flags(cfg: StudyConfig) -> list[str]:
  """`python -m experiments.llm` flags that give `cfg` (every field that is not at its default)."""
  flags = []
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if value == field.default:
      continue
    if isinstance(value, tuple):
      value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    flags.append(f"--{field.name}={value}")
  return flags


# The tiny study through the entry point: more p* samples (a kill while p* is sampled finds two
# shards) and more teacher steps (a kill while the teacher trains finds a checkpoint).
TINY_STUDY_FLAGS = study_flags(dataclasses.replace(TINY_STUDY, num_train=64, teacher_epochs=3))


def gmm_compiled(fn, *args, static_argnums=()):
  """fn jitted, lowered for `args` and compiled with the GMM study's XLA options (its entry
  point's: kdjax.gmm.study.compiler_options, less compile time); call it with the non-static
  args."""
  lowered = jax.jit(fn, static_argnums=static_argnums).lower(*args)
  return lowered.compile(gmm_study.compiler_options())


def subprocess_env(devices=8, **extra) -> dict:
  """This process's environment for a child: see the module docstring; `extra` set last."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
  env["XLA_FLAGS"] = count + XLA_TEST_FLAGS
  env.update(extra)
  return env


def module_argv(module: str, *args) -> list[str]:
  """`python -m module args...` with this interpreter."""
  return [sys.executable, "-m", module, *args]


def run(argv, *, devices=8, timeout=600, env=None) -> subprocess.CompletedProcess:
  """Run argv to completion in the repository, output captured as text; env: extra variables."""
  return subprocess.run(argv, cwd=REPO, env=subprocess_env(devices, **(env or {})),
                        capture_output=True, text=True, timeout=timeout)


def run_module(module: str, *args, devices=8, timeout=600, env=None) -> subprocess.CompletedProcess:
  """`python -m module args...` run to completion (see run)."""
  return run(module_argv(module, *args), devices=devices, timeout=timeout, env=env)


def start(argv, *, devices=8, env=None, stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL) -> subprocess.Popen:
  """Start argv in the repository without waiting (tests that kill it, or run several at once)."""
  return subprocess.Popen(argv, cwd=REPO, env=subprocess_env(devices, **(env or {})),
                          stdout=stdout, stderr=stderr, text=True)


# Many command lines of one entry point in one process (a process costs ~2-3 CPU seconds of
# imports, more with a tokenizer; issue 18's suite budget), meant for refused flags and dry runs:
# each case runs as kdjax.cli.run runs main (cli's flag parser, a UserError from main made cli's
# one line, its exit status), with the case's own stdout / stderr (absl log lines still go to the
# process's stderr), and the flags back at their defaults before the next case. A traceback is
# printed as Python would (error_line then fails on it). Every `python -m entry` run of the suite
# goes through cli.run itself.
_ENTRY_RUNS = """
import contextlib, importlib, io, json, sys, traceback
from absl import flags
from kdjax import cli
module = importlib.import_module(sys.argv[1])
out = []
for args in json.loads(sys.argv[2]):
  flags.FLAGS.unparse_flags()
  stdout, stderr, code = io.StringIO(), io.StringIO(), 0
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    try:
      argv = cli._parse_flags([sys.argv[1], *args])
      try:
        module.main(argv)
      except cli.UserError as e:
        cli._fail(e, 1)
    except SystemExit as e:
      code = e.code
    except Exception:
      traceback.print_exc()
      code = 1
  out.append([code, stdout.getvalue(), stderr.getvalue()])
print("CASES " + json.dumps(out))
"""


def entry_point_runs(module: str, cases, *, devices=None,
                     timeout=600) -> list[subprocess.CompletedProcess]:
  """`python -m module *args` for each args in cases, in one process (see _ENTRY_RUNS): one
  CompletedProcess (returncode, stdout, stderr) per case."""
  proc = run([sys.executable, "-c", _ENTRY_RUNS, module, json.dumps([list(a) for a in cases])],
             devices=devices, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("CASES ")]
  assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
  return [subprocess.CompletedProcess([module, *args], code, out, err)
          for args, (code, out, err) in zip(cases, json.loads(lines[0][len("CASES "):]))]


def error_line(proc) -> str:
  """The one `error:` line of a failed run: a non-zero exit, no traceback, exactly one such line
  (stderr may also hold absl / JAX log lines)."""
  assert proc.returncode != 0, proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def dataset_rows(path) -> tuple[list, list, list]:
  """A sampled dataset directory's (token rows, texts, lengths) as Python lists."""
  ds = work.load_dataset(path)
  return [list(r) for r in ds["input_ids"]], list(ds["text"]), list(ds["length"])


# TensorBoard files (kdjax.events) read with tensorboardX's protocol buffers and checksums.
def read_events(path) -> list:
  """Every Event of a file (tensorboardX's event_pb2.Event), each record's two checksums checked
  as TensorBoard's reader does."""
  from tensorboardX.proto import event_pb2  # a test extra, imported where used
  from tensorboardX.record_writer import masked_crc32c
  with open(path, "rb") as f:
    data = f.read()
  out, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert crc == masked_crc32c(header), "length checksum"
    body = data[pos + 12:pos + 12 + length]
    (crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert crc == masked_crc32c(body), "data checksum"
    out.append(event_pb2.Event.FromString(body))
    pos += 16 + length
  return out


def scalars(logdir) -> dict:
  """{tag: [(step, value), ...]} of every event file under logdir."""
  out = {}
  for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
    for e in read_events(path)[1:]:
      for v in e.summary.value:
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out
