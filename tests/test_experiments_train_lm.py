"""experiments.train_lm end to end (students + online KD on a 2x2x2 mesh) and its one-line errors."""

import glob
import json
import os

import pytest

from kdjax.llm.weights import loading
from kdjax import checkpoint as ckpt_lib
from kdjax.llm import data as data_lib
from kdjax.llm.model.config import get_preset
from kdjax.llm.train.state import params_checksum
from tests.helpers import entry_point_runs, module_argv, run, scalars

pytestmark = pytest.mark.slow  # train_lm in subprocesses


def _cmd(*args):
  return module_argv("experiments.train_lm", "--progress=false", *args)


def _dataset(path, n, seed):
  data_lib.ShardWriter(str(path)).write(data_lib.synthetic_sequences(n, 256, seed))
  return str(path)


def test_students_with_online_kd_on_a_mesh(tmp_path):
  d0, d1 = _dataset(tmp_path / "d0", 32, 0), _dataset(tmp_path / "d1", 32, 1)
  w = str(tmp_path / "run")
  args = [f"--workdir={w}", f"--train_data={d0},{d1}", "--val_data=synthetic:16",
          "--teacher=preset:test-tiny", "--objective=jsd", "--kd_temperature=2",
          "--batch_size=8", "--seq_len=24", "--steps=4", "--grad_accum=2", "--eval_every=2",
          "--mesh=data=2,fsdp=2,tensor=2"]
  r = run(_cmd(*args))
  assert r.returncode == 0, r.stderr[-3000:]
  printed = json.loads(r.stdout.strip().splitlines()[-1])
  with open(os.path.join(w, "train_summary.json")) as f:
    summary = json.load(f)
  assert printed == summary
  assert summary["num_students"] == 2 and summary["steps"] == 4
  assert len(summary["student_checksums"]) == 2
  assert summary["student_checksums"][0] != summary["student_checksums"][1]
  assert summary["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert len(summary["best_val_perplexity"]) == 2 and summary["best_step"][0] in (2, 4)
  for i in range(2):
    config, _ = loading.load_model_checkpoint(os.path.join(w, "best", str(i)))
    assert config.replace(dtype="float32") == get_preset("test-tiny")
  logged = scalars(os.path.join(w, "tb"))  # every 10th step (log_every) and the last, each student
  assert [s for s, _ in logged["train/loss/1"]] == [4]
  assert [s for s, _ in logged["val/perplexity/0"]] == [2, 4]
  assert logged["train/lr"] and logged["train/grad_norm/0"]
  # the same workdir with another learning rate is refused, naming the flag
  r = run(_cmd(*args, "--lr=1e-3"))
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: workdir")
  assert "--lr (was 0.0005, now 0.001)" in r.stderr


def test_preset_seed_names_one_init(tmp_path):
  """`preset:NAME@SEED` is the model kdjax.llm.load_model gives for that spec, wherever it is used:
  training from it (born sharded on a mesh) ends exactly where training from an export of
  load_model('preset:test-tiny@3') does; a teacher takes @SEED too. (A seed ignored by train_lm
  would start @3 from --seed's init, not the export's: @4 needs no third run, only another init.)"""
  from kdjax.llm import load_model
  init3, init4 = load_model("preset:test-tiny@3")[1], load_model("preset:test-tiny@4")[1]
  assert params_checksum(init3) != params_checksum(init4)
  ckpt_lib.export_model(str(tmp_path / "init3"), *load_model("preset:test-tiny@3"))
  d = _dataset(tmp_path / "d", 32, 0)
  runs = {"at3": "preset:test-tiny@3", "ckpt3": f"ckpt:{tmp_path / 'init3'}"}
  sums = {}
  for name, spec in runs.items():  # one after the other: the second reads the first's compiles
    r = run(_cmd(f"--workdir={tmp_path / name}", f"--model={spec}", f"--train_data={d}",
                 "--teacher=preset:test-tiny@5", "--batch_size=8", "--seq_len=16", "--steps=2",
                 "--mesh=data=2,fsdp=2,tensor=2"))
    assert r.returncode == 0, (name, r.stderr[-3000:])
    sums[name] = json.loads(r.stdout.strip().splitlines()[-1])["params_checksum"]
  assert sums["at3"] == sums["ckpt3"]


BAD = [
    (["--batch_size=0"], "--batch_size=0"),
    (["--lr=-1"], "--lr=-1.0"),
    (["--steps=abc"], "--steps"),
    (["--dtype=int8"], "--dtype"),
    (["--teacher=preset:test-tiny", "--objective=bogus"], "unknown distillation objective"),
    (["--teacher=preset:test-tiny", "--kd_temperature=0"], "--kd_temperature=0.0"),
    (["--train_data=/no/such/dir"], "dataset directory /no/such/dir does not exist"),
    (["--model=preset:nope"], "unknown preset 'nope'"),
    (["--model=preset:test-tiny@x"], "seed 'x'"),
    (["--teacher=preset:test-tiny@-1"], "preset:test-tiny@-1"),
    (["--teacher=ckpt:/no/such/ckpt"], "/no/such/ckpt"),
    (["--mesh=data=3"], "--mesh: data=3"),
    (["--flagfile=/no/such.flags"], "/no/such.flags"),
    (["--grad_accum=3"], "--grad_accum=3"),
    (["--steps=0"], "exactly one of --steps or --epochs"),
    (["--train_data=synthetic:x"], "synthetic:N"),
]


def test_bad_flags_give_one_line_errors(tmp_path):
  """Every bad flag set in one process (helpers.entry_point_runs: as cli.run runs main)."""
  cases = [[f"--workdir={tmp_path / f'w{i}'}", "--train_data=synthetic:16", "--steps=2",
            "--batch_size=8", "--progress=false", *extra] for i, (extra, _) in enumerate(BAD)]
  for (extra, expected), p in zip(BAD, entry_point_runs("experiments.train_lm", cases,
                                                          devices=8)):
    lines = p.stderr.strip().splitlines()
    assert p.returncode in (1, 2), (extra, p.stderr[-2000:])
    assert lines and lines[-1].startswith("error: "), (extra, p.stderr[-2000:])
    assert expected in lines[-1], (extra, lines[-1])
    assert "Traceback" not in p.stderr, extra


def _bad_datasets(base):
  """(dataset dir, what stderr's last line must hold; None: trains) for each bad dataset."""
  seqs = data_lib.synthetic_sequences(16, 256, 0)
  zero = data_lib.ShardWriter(str(base / "zero"))
  zero.write(seqs[:8])
  zero.write([])
  zero.write(seqs[8:])
  data_lib.ShardWriter(str(base / "one")).write([[5]] * 16)
  neg, big = [s.copy() for s in seqs], [s.copy() for s in seqs]
  neg[7][3], big[9][2] = -4, 300
  data_lib.ShardWriter(str(base / "neg")).write(neg)
  data_lib.ShardWriter(str(base / "big")).write(big)
  return [(base / "zero", None), (base / "one", "row 0 has nothing to predict"),
          (base / "neg", "row 7 holds token id -4,"), (base / "big", "row 9 holds token id 300,")]


def test_bad_datasets_one_line_before_training(tmp_path):
  """A zero-row shard is skipped (one warning line); rows with nothing to predict and token ids
  outside the vocabulary are refused in one line naming the dataset, the row and the value, before
  the workdir is touched (the refused ones in one process: helpers.entry_point_runs)."""
  (zero, _), *bad = _bad_datasets(tmp_path)
  args = lambda i, d: [f"--workdir={tmp_path / f'w{i}'}", f"--train_data={d}", "--batch_size=8",
                       "--seq_len=24", "--steps=1", "--progress=false"]
  r = run(_cmd(*args(0, zero)))
  assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert f"dataset directory {zero}: shard-00001 holds no rows, skipped" in r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 1
  procs = entry_point_runs("experiments.train_lm",
                             [args(i, d) for i, (d, _) in enumerate(bad, 1)], devices=8)
  for i, ((d, expected), p) in enumerate(zip(bad, procs), 1):
    assert "Traceback" not in p.stderr, (d, p.stderr[-3000:])
    last = (p.stderr.strip().splitlines() or [""])[-1]
    assert p.returncode == 1 and last.startswith(f"error: dataset {d}: "), (d, p.stderr[-2000:])
    assert expected in last, (d, last)
    assert not os.path.exists(tmp_path / f"w{i}" / "config.json")
