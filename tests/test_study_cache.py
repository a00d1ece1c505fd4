"""The study's workdir reuses only what it has checked (kdjax/llm/study/units.py): damaged outputs
are redone with one warning line, records name files relative to the workdir (a copy reads only
its own files), model files are keyed by their contents, and the dry run gives the run's verdict.
"""

import dataclasses
import glob
import os
import shutil

import numpy as np
import pytest

from kdjax import checkpoint
from kdjax.llm import data
from kdjax.llm.study import pipeline, records, units
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.weights import digest, loading

TINY = StudyConfig(
    ground_truth="preset:test-tiny@7", tokenizer="bytes", teacher="preset:test-tiny@5",
    student="preset:test-tiny", temperatures=(1.0,), students=("direct", "seqkd"), num_train=32,
    num_val=16, num_select=8, teacher_num_train=32, teacher_num_val=8, num_eval_samples=16,
    max_new_tokens=8, sample_batch_size=8, shard_size=8, teacher_epochs=1, student_epochs=1,
    batch_size=8, learning_rate=3e-3, checkpoint_every=0, eval_batch_size=8,
    embedding_map="none")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cache") / "w")
  rows = pipeline.run_study(TINY, workdir)
  return workdir, rows


@pytest.fixture
def copy(study, tmp_path):
  """A fresh copy of the study's workdir (tests damage it)."""
  w = str(tmp_path / "copy")
  shutil.copytree(study[0], w)
  return w


def _verdicts(cfg, workdir):
  return {u.rel: records.status(u, workdir)
          for us in units.StudyUnits(cfg).by_stage().values() for u in us}


def _rows_of(path):
  rows = data.TokenRows(data.load_dataset_dir(path))
  return [rows.row(i).tolist() for i in range(len(rows))]


@pytest.mark.slow  # the module's tiny study, end to end
def test_a_fresh_study_is_all_cached(study):
  assert {v for v, _ in _verdicts(TINY, study[0]).values()} == {"cached"}


@pytest.mark.slow  # the module's tiny study, end to end
def test_deleted_shard_is_resampled_before_anyone_reads_it(study, copy):
  """A p* training shard deleted by hand: the dry run says so, the run resamples exactly it
  (the same rows: a shard's draws depend on its key alone) and every student trains on 32."""
  before = _rows_of(os.path.join(copy, "pstar", "train"))
  shutil.rmtree(os.path.join(copy, "pstar", "train", "shard-00002"))
  assert _verdicts(TINY, copy)["pstar/train"] == ("redo", "shard 2 missing")
  assert "pstar/train: shard 2 missing" in pipeline.cache_report(TINY, copy)
  more = dataclasses.replace(TINY, students=("direct", "seqkd", "rkl"))
  rows = pipeline.run_study(more, copy)
  assert _rows_of(os.path.join(copy, "pstar", "train")) == before
  steps = {r: records.read_record(os.path.join(copy, units.Layout(more).students(0, r)))["steps"]
           for r in ("direct", "rkl")}
  assert steps == {"direct": 4, "rkl": 4}
  assert [r for r in rows if r["objective"] != "rkl"] == study[1]


@pytest.mark.slow  # the module's tiny study, end to end
def test_copied_workdir_reads_its_own_teacher(study, copy, tmp_path):
  """Records are relative: after the original's teacher is replaced, the copy still reads (and
  checks) its own, and the original's damaged teacher is redone, not trusted."""
  original = str(tmp_path / "original")
  shutil.copytree(study[0], original)
  best = os.path.join(original, "teacher", "best")
  checkpoint.export_model(best, *loading.load_model("preset:test-tiny@99"))
  assert _verdicts(TINY, copy)["teacher"] == ("cached", "")
  verdict, reason = _verdicts(TINY, original)["teacher"]
  assert verdict == "redo" and "params checksum" in reason
  spec = pipeline.checkpoint_spec(_study(copy), units.Layout(TINY).teacher(0), 0)
  assert spec == "ckpt:" + os.path.join(copy, "teacher", "best")


def _study(workdir):
  st = pipeline.Study.__new__(pipeline.Study)
  st.workdir = os.path.abspath(workdir)
  return st


@pytest.mark.slow  # the module's tiny study, end to end
def test_moved_workdir_reruns_nothing(study, tmp_path, monkeypatch):
  moved = str(tmp_path / "moved")
  shutil.copytree(study[0], moved)
  ran = []
  monkeypatch.setattr(pipeline, "sample_dataset", lambda out, *a, **k: ran.append(out))
  monkeypatch.setattr(pipeline, "train_models", lambda out, *a, **k: ran.append(out))
  assert pipeline.run_study(TINY, moved) == study[1] and ran == []


@pytest.mark.slow  # the module's tiny study, end to end
@pytest.mark.parametrize("damage, rel, reason", [
    ("truncate", "seed_0/scores/direct/embeddings.npy", "unreadable"),
    ("truncate", "pstar/val/shard-00000/data-00000-of-00001.arrow", "truncated"),
    ("empty", "teacher/DONE.json", "DONE.json unreadable"),
    ("empty", "seed_0/teacher_T1/train/DONE.json", "DONE.json unreadable"),
])
def test_damaged_outputs_are_redone_with_one_line(copy, damage, rel, reason):
  path = os.path.join(copy, rel)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2 if damage == "truncate" else 0)
  unit = os.path.dirname(rel) if not rel.startswith("pstar") else "pstar/val"
  verdict, why = _verdicts(TINY, copy)[unit]
  assert verdict == "redo" and reason in why


@pytest.mark.slow  # the module's tiny study, end to end
def test_redone_scores_give_the_same_results(study, copy):
  path = os.path.join(copy, "seed_0", "scores", "direct", "embeddings.npy")
  with open(path, "r+b") as f:
    f.truncate(100)
  assert pipeline.run_study(TINY, copy) == study[1]
  assert np.load(path).shape[0] == TINY.num_eval_samples


def test_replaced_model_file_changes_every_key_built_from_it(tmp_path, monkeypatch):
  """A ckpt: ground truth is keyed by its files' contents, not its path: replaced, p*'s samples
  and everything after them get new keys; the same bytes elsewhere keep them."""
  monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path / "cache"))
  gt = str(tmp_path / "gt")
  checkpoint.export_model(gt, *loading.load_model("preset:test-tiny@7"))
  cfg = dataclasses.replace(TINY, ground_truth=f"ckpt:{gt}")
  first = units.StudyUnits(cfg)
  assert units.StudyUnits(cfg).pstar("train").key == first.pstar("train").key
  moved = str(tmp_path / "moved")
  shutil.copytree(gt, moved)
  same = units.StudyUnits(dataclasses.replace(cfg, ground_truth=f"ckpt:{moved}"))
  assert same.pstar("train").key == first.pstar("train").key
  checkpoint.export_model(gt, *loading.load_model("preset:test-tiny@8"))
  second = units.StudyUnits(cfg)
  for name in ("pstar", "teacher", "students"):
    a = {"pstar": lambda u: u.pstar("train"), "teacher": lambda u: u.teacher(),
         "students": lambda u: u.students(0, "direct")}[name]
    assert a(second).key != a(first).key, name


def test_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_CACHE_DIR", str(tmp_path / "cache"))
  f = tmp_path / "m.gguf"
  f.write_bytes(b"x" * 1000)
  d1 = digest.spec_digest(f"gguf:{f}")
  calls = []
  real = digest.hashlib.sha256
  monkeypatch.setattr(digest.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
  assert digest.spec_digest(f"gguf:{f}") == d1
  assert len(calls) == 1  # the spec's combined hash only: the file itself was not read again
  f.write_bytes(b"y" * 1000)
  os.utime(f, ns=(1, 1))
  assert digest.spec_digest(f"gguf:{f}") != d1


def test_stage_versions_are_in_every_key():
  assert all("version" in u.what for us in units.StudyUnits(TINY).by_stage().values() for u in us)
  a = units.StudyUnits(TINY).teacher()
  old = dict(units.VERSIONS)
  try:
    units.VERSIONS["pstar"] += 1
    b = units.StudyUnits(TINY)
    assert b.teacher().key != a.key  # a p* version bump reaches the teacher through its inputs
  finally:
    units.VERSIONS.clear()
    units.VERSIONS.update(old)


@pytest.mark.slow  # the module's tiny study, end to end
def test_no_record_holds_an_absolute_path(study):
  for path in glob.glob(os.path.join(study[0], "**", "DONE.json"), recursive=True):
    text = open(path).read()
    assert study[0] not in text, path
