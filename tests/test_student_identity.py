"""Identity by seed, not position (kdjax/llm/study/runs.py, TrainConfig.common_random_numbers):
a study student's initialisation, data order and on-policy samples depend on its seed alone, so
reordering or adding temperatures leaves every other student as it was."""

import dataclasses

import pytest

from kdjax.llm.study import runs
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.train import loop as trainlib

BASE = trainlib.TrainConfig(model="preset:test-tiny", teacher="preset:test-tiny@5",
                            train_data=("synthetic:32",), batch_size=8, seq_len=16, steps=2,
                            objective="fkl", common_random_numbers=True, progress=False)


def _checksums(tmp_path, name, **kw):
  cfg = dataclasses.replace(BASE, **kw)
  summary = trainlib.train(cfg, str(tmp_path / name))
  return dict(zip(cfg.teacher_temperatures, summary["student_checksums"]))


@pytest.mark.slow
def test_reordering_temperatures_leaves_each_student_bit_identical(tmp_path):
  a = _checksums(tmp_path, "a", teacher_temperatures=(0.8, 1.0))
  b = _checksums(tmp_path, "b", teacher_temperatures=(1.0, 0.8))
  assert a == b


@pytest.mark.slow
def test_without_common_random_numbers_a_student_is_its_position(tmp_path):
  """The old behaviour, kept for train_lm: student i draws stream i, so the T = 1 student of
  (0.8, 1.0) is another student than the T = 1 student of (1.0, 0.8)."""
  a = _checksums(tmp_path, "a", teacher_temperatures=(0.8, 1.0), common_random_numbers=False)
  b = _checksums(tmp_path, "b", teacher_temperatures=(1.0, 0.8), common_random_numbers=False)
  assert a[1.0] != b[1.0]


def test_study_students_use_the_seeds_common_random_numbers():
  ri = runs.RunInputs(StudyConfig(temperatures=(0.8, 1.0), students=("direct", "seqkd", "fkl",
                                                                     "onpolicy_rkl")),
                      "/w", (84,), 2)
  for kind in ("seqkd", "fkl", "onpolicy_rkl"):
    tc = runs.student_run(ri, 0, kind, "ckpt:/w/teacher/best/0")
    assert tc.common_random_numbers and tc.stream_ids() == (0, 0), kind
  assert runs.student_run(ri, 0, "direct", "").stream_ids() == (0,)


def test_every_stream_is_the_seeds():
  tc = trainlib.TrainConfig(train_data=("a", "b", "c"), common_random_numbers=True)
  assert tc.stream_ids() == (0, 0, 0)
  assert dataclasses.replace(tc, common_random_numbers=False).stream_ids() == (0, 1, 2)


def _scope(scope):
  from kdjax.llm.study import units
  cfg = StudyConfig(ground_truth="preset:test-tiny@7", tokenizer="bytes", num_seeds=2,
                    students=("direct", "seqkd", "fkl"), temperatures=(1.0,), seed_scope=scope)
  return cfg, units.StudyUnits(cfg)


@pytest.mark.parametrize("scope, teacher_differs, pstar_differs", [
    ("students", False, False), ("teacher", True, False), ("all", True, True)])
def test_seed_scopes_redraw_exactly_what_they_say(scope, teacher_differs, pstar_differs):
  cfg, u = _scope(scope)
  for split in ("train", "val", "select"):
    assert (u.pstar(split, 0).key != u.pstar(split, 1).key) == pstar_differs
  assert (u.teacher(0).key != u.teacher(1).key) == teacher_differs
  # the first seed's units are the students-scope ones (a wider scope reuses them)
  _, narrow = _scope("students")
  assert u.teacher(0).key == narrow.teacher(0).key and u.teacher(0).rel == "teacher"
  assert u.pstar("val", 0).rel == "pstar/val"
  ri = runs.RunInputs(cfg, "/w", (84,), 2)
  teachers = runs.training_runs(ri)["2_train_teacher"]
  assert [t.seed for t in teachers] == ([0, 1] if teacher_differs else [0])
  data = {tc.seed: tc.train_data for tc in teachers}
  if teacher_differs:
    assert (data[0] != data[1]) == pstar_differs
  # students read their own seed's teacher samples, p* and teacher
  fkl1 = runs.student_run(ri, 1, "fkl", "t")
  assert fkl1.train_data == (("/w/seed_1/pstar/train",) if pstar_differs else ("/w/pstar/train",))
  assert u.students(1, "fkl").what["teacher"] == u.teacher(1).key
  # every student's held-out set is a p* val split that stage 1 samples
  sampled = {x.rel for x in u.by_stage()["1_sample_ground_truth"]}
  for seed in cfg.seeds:
    assert u.layout.held_out(seed, "direct", None) in sampled
    assert u.scores(seed, "direct", 0, "direct", None).what["val"] == u.pstar("val", seed).key
