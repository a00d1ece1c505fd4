"""`python -m experiments.llm` as a user runs it (subprocesses): dry runs of both flagfiles, bad input
(one line, no traceback, nothing overwritten), and SIGKILL during sampling and during training
followed by a rerun giving the same results.json as an uninterrupted run (issue 6).

Runs use one CPU device and conftest's persistent compilation cache (later runs skip compiling).
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.helpers import TINY_STUDY_FLAGS as TINY_FLAGS
from tests.helpers import entry_point_runs, error_line, module_argv, run_module, start

def _cmd(*args):
  return module_argv("experiments.llm", *args)


def _run(*args, timeout=600):
  return run_module("experiments.llm", *args, devices=None, timeout=timeout)


def _start(*args):
  return start(_cmd(*args), devices=None, stderr=subprocess.PIPE)


DRY_RUNS = [
    ("llm_smoke.flags", ["gguf:default", "134.5M params", "preset:micro-49k", "preset:nano-49k"]),
    ("llm_paper.flags", ["1711.4M params", "smollm2-360m", "[0, 1, 2, 3, 4]",
                         "8 device(s)", "up to 512 tokens", "Gtokens", "EFLOP"]),
    ("llm_gpu1.flags", ["gguf:default", "75.5M params", "preset:mini-49k", "1 device(s)",
                        "up to 256 tokens", "seeds [0, 1, 2]"]),
    ("llm_family_smoke.flags", ["gguf:default", "seeds [0, 1]", "matched budgets of 4096",
                                "seqkd x2 (128 steps, 2 passes over its data)",
                                "onpolicy_rkl x2 (128 steps)", "'onpolicy_rkl_T0.8'"]),
    ("llm_family_medium.flags", ["seeds [0, 1, 2]", "x3 seeds (--seed_scope=teacher)",
                                 "seqkd x6 (64 steps", "rkl x6 (64 steps", "'fkl_T0.8_lr0.001'",
                                 "'rkl_T1_lr0.01'"]),
    ("llm_knobs_medium.flags", ["seeds [0, 1, 2]", "x3 seeds (--seed_scope=teacher)",
                                "'seqkd_topp0.8_lr0.001'", "'fkl_topp0.95_lr0.01'"]),
]


@pytest.mark.slow
def test_dry_run_of_every_flagfile(tmp_path):
  """Every flagfile's dry run, in one process (helpers.entry_point_runs: as cli.run runs main)."""
  cases = [[f"--flagfile=experiments/flags/{flagfile}", f"--workdir={tmp_path / flagfile}",
            "--dry_run"] for flagfile, _ in DRY_RUNS]
  for (flagfile, expect), proc in zip(DRY_RUNS, entry_point_runs("experiments.llm", cases)):
    assert proc.returncode == 0, (flagfile, proc.stderr)
    for stage in ("1_sample_ground_truth", "2_train_teacher", "3_sample_teacher",
                  "4_train_students", "5_score_students", "6_results"):
      assert stage in proc.stdout, (flagfile, stage)
    for text in expect:
      assert text in proc.stdout, (flagfile, text, proc.stdout)
    assert "GiB per device" in proc.stdout, flagfile
    assert not (tmp_path / flagfile).exists(), flagfile  # a dry run writes nothing


def _truncated_gguf(tmp_path):
  from kdjax.llm.weights.loading import default_gguf_path
  path = tmp_path / "broken.gguf"
  with open(default_gguf_path(), "rb") as f:
    path.write_bytes(f.read(4096))
  return path


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path):
  """Refused before any stage runs (issue 11: nothing fails after hours on input it could have
  refused at the start), one line, nothing sampled. Every case in one process
  (helpers.entry_point_runs: as cli.run runs main)."""
  _truncated_gguf(tmp_path)
  cases = {
      "temperature_zero": (["--temperatures=0.8,0"], "--temperatures"),
      "temperature_negative": (["--temperatures=-0.5"], "--temperatures"),
      "missing_model": (["--ground_truth=gguf:/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
      "truncated_model": ([f"--ground_truth=gguf:{tmp_path / 'broken.gguf'}"], "broken.gguf"),
      "empty_dataset": (["--num_train=0"], "--num_train"),
      "bad_number": (["--num_seeds=two"], "--num_seeds"),
      "preset_seed": (["--student=preset:test-tiny@x"], "preset:test-tiny@x"),
      "not_a_checkpoint": ([f"--ground_truth=ckpt:{tmp_path}"], "not a kdjax model checkpoint"),
      "mesh": (["--mesh=data=3"], "--mesh"),
  }
  argvs = [[*TINY_FLAGS, f"--workdir={tmp_path / case}", *flags]
           for case, (flags, _) in cases.items()]
  for (case, (_, expect)), proc in zip(cases.items(),
                                       entry_point_runs("experiments.llm", argvs)):
    assert expect in error_line(proc), case
    assert not (tmp_path / case / "pstar").exists(), case
    assert not (tmp_path / case / "config.json").exists(), case


def _wait_then_kill(proc, condition, what, timeout=300):
  t0 = time.time()
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
    assert time.time() - t0 < timeout, f"timed out waiting for {what}"
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def _shards(path):
  return [n for n in os.listdir(path) if n.startswith("shard-")] if os.path.isdir(path) else []


def _steps(path):
  return [n for n in os.listdir(path) if n.isdigit()] if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: its results.json is what every resumed run must reproduce."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(*TINY_FLAGS, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_uninterrupted_run_writes_results(reference):
  rows = json.loads((reference / "results.json").read_text())["rows"]
  assert [(r["objective"], r["temperature"], r["seed"]) for r in rows] == [
      ("direct", None, 0), ("seqkd", 0.8, 0), ("seqkd", 1.0, 0)]
  assert (reference / "results.csv").exists()
  assert (reference / "precision_recall_vs_temperature.png").exists()
  assert (reference / "precision_vs_recall.png").exists()


@pytest.mark.slow
def test_kill_during_sampling_and_training_then_resume(reference, tmp_path):
  workdir = tmp_path / "w"
  args = [*TINY_FLAGS, f"--workdir={workdir}"]
  pstar_train = workdir / "pstar" / "train"
  # 1. SIGKILL while p* is being sampled: some shards written, the dataset not done
  proc = _start(*args)
  _wait_then_kill(proc, lambda: len(_shards(pstar_train)) >= 2, "p* sampling")
  assert not (pstar_train / "DONE.json").exists()
  # 2. SIGKILL while the teacher trains: a checkpoint saved, training not done
  proc = _start(*args)
  _wait_then_kill(proc, lambda: len(_steps(workdir / "teacher" / "checkpoints")) >= 1,
                  "a teacher checkpoint")
  assert not (workdir / "teacher" / "DONE.json").exists()
  # 3. the same command finishes the study: the same results as the uninterrupted run
  done = _run(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert (workdir / "results.json").read_text() == (reference / "results.json").read_text()
  # the resumed teacher is bit-identical too
  ref = json.loads((reference / "teacher" / "DONE.json").read_text())
  got = json.loads((workdir / "teacher" / "DONE.json").read_text())
  assert got["params_checksum"] == ref["params_checksum"]


@pytest.mark.slow
def test_rerun_of_a_finished_workdir_skips_and_keeps_results(reference):
  before = (reference / "results.json").read_bytes()
  proc = _run(*TINY_FLAGS, f"--workdir={reference}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "done already" in proc.stderr
  assert "stage 1_sample_ground_truth: start" not in proc.stderr
  assert (reference / "results.json").read_bytes() == before


@pytest.mark.slow
def test_other_flags_reuse_the_cached_stages(reference, tmp_path):
  """Another --students list and --num_eval_samples in a finished workdir: the dry run says what
  is cached, the run samples no p* sequence and trains no teacher, and results.json then holds
  the new flags; the first flags again give back the first results.json."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  first = (workdir / "results.json").read_bytes()
  other = ["--students=seqkd", "--num_eval_samples=8"]
  proc = _run(*TINY_FLAGS, f"--workdir={workdir}", *other, "--dry_run")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "1_sample_ground_truth: 3 cached" in proc.stdout
  assert "4_train_students: 1 cached\n" in proc.stdout
  # the teacher's entropy per temperature is cached (2); p*'s embeddings (as many as
  # --num_eval_samples) and the scores are redone
  assert "5_score_students: 2 cached; 3 to run" in proc.stdout
  proc = _run(*TINY_FLAGS, f"--workdir={workdir}", *other)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("1_sample_ground_truth", "2_train_teacher", "3_sample_teacher", "4_train_students"):
    assert f"stage {name}: done already" in proc.stderr
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["config"]["students"] == ["seqkd"] and saved["config"]["num_eval_samples"] == 8
  assert [r["objective"] for r in saved["rows"]] == ["seqkd", "seqkd"]
  assert _run(*TINY_FLAGS, f"--workdir={workdir}").returncode == 0
  assert (workdir / "results.json").read_bytes() == first


@pytest.mark.slow
def test_damaged_dataset_is_redone_with_one_line(reference, tmp_path):
  """A finished p* dataset whose shards were deleted is sampled again (one warning line naming it),
  and the study ends with the uninterrupted run's results.json."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  for name in _shards(workdir / "pstar" / "train"):
    shutil.rmtree(workdir / "pstar" / "train" / name)
  proc = _run(*TINY_FLAGS, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  redone = [l for l in proc.stderr.splitlines() if "redoing it" in l]
  assert len(redone) == 1 and "pstar/train" in redone[0], proc.stderr[-3000:]
  assert (workdir / "results.json").read_text() == (reference / "results.json").read_text()


def _flagfile_config(name):
  """The StudyConfig of a flagfile's --name=value lines (the rest at their defaults)."""
  import dataclasses
  from kdjax.llm.study.config import StudyConfig
  defaults = StudyConfig()
  values = {}
  for line in open(os.path.join(REPO, "experiments", "flags", name)):
    if line.startswith("--"):
      key, value = line[2:].strip().split("=", 1)
      old = getattr(defaults, key)
      if key == "temperatures":
        values[key] = tuple(float(v) for v in value.split(","))
      elif key == "students":
        values[key] = tuple(value.split(","))
      else:
        values[key] = type(old)(value)
  return dataclasses.replace(defaults, **values)


def test_family_flagfile_reuses_the_smoke_studys_stages():
  """llm_family_smoke.flags run after llm_smoke.flags in one workdir samples no p* sequence and
  trains no teacher: every p* and teacher key is the smoke study's, and so are seed 0's direct
  student and the teacher's samples at the family's temperatures (a subset of the smoke study's)."""
  from kdjax.llm.study.units import StudyUnits
  smoke, family = (StudyUnits(_flagfile_config(f"llm_{n}.flags")) for n in ("smoke", "family_smoke"))
  for split in ("train", "val", "select"):
    assert family.pstar(split) == smoke.pstar(split)
  assert family.teacher() == smoke.teacher()
  assert family.students(0, "direct") == smoke.students(0, "direct")
  assert set(family.cfg.temperatures) < set(smoke.cfg.temperatures)
  for t in family.cfg.temperatures:
    for split in ("train", "val"):
      assert family.teacher_samples(0, t, split) == smoke.teacher_samples(0, t, split)
  assert set(smoke.cfg.students) < set(family.cfg.students) and family.cfg.num_seeds == 2
