"""Learning rates chosen, not assumed (issue 20): --student_learning_rates trains every student
at each rate in its kind's one vmapped run, and each (kind, T, seed) keeps the rate of best
log-likelihood on p*'s select split, never recall's val set; the others stay in lr_sweep."""

import dataclasses
import json
import os

import pytest

from kdjax.llm.study import pipeline, records, report, runs, stats, units
from kdjax.llm.study.config import StudyConfig
from kdjax.llm.study.work import mark_done
from tests.helpers import TINY_STUDY


def _row(kind, t, seed, lr, select, recall):
  return {"objective": kind, "temperature": t, "seed": seed, "learning_rate": lr,
          "select_loglik": select, "recall": recall}


def test_rates_are_chosen_on_select_never_on_val():
  rows = [_row("fkl", 1.0, 0, 1e-3, -5.0, -4.0), _row("fkl", 1.0, 0, 3e-3, -4.5, -6.0),
          _row("fkl", 1.0, 1, 1e-3, -4.0, -9.0), _row("fkl", 1.0, 1, 3e-3, -4.2, -1.0),
          _row("direct", None, 0, 1e-3, -7.0, -3.0), _row("direct", None, 0, 3e-3, -6.0, -8.0)]
  chosen, sweep = report.choose_rates(rows)
  assert [(r["objective"], r["seed"], r["learning_rate"]) for r in chosen] == [
      ("fkl", 0, 3e-3), ("fkl", 1, 1e-3), ("direct", 0, 3e-3)]  # best select, worse recall
  assert len(sweep) == 6 and sum(r["chosen"] for r in sweep) == 3
  plain = [{k: v for k, v in r.items() if k != "select_loglik"} for r in rows]
  assert report.choose_rates(plain) == (plain, [])


def test_the_sweep_trains_in_one_run_per_kind():
  cfg = StudyConfig(temperatures=(0.8, 1.0), students=("direct", "seqkd", "fkl"),
                    student_learning_rates=(1e-3, 3e-3, 1e-2))
  ri = runs.RunInputs(cfg, "/w", (84,), 2)
  fkl = runs.student_run(ri, 0, "fkl", "t")
  assert fkl.teacher_temperatures == (0.8, 0.8, 0.8, 1.0, 1.0, 1.0)
  assert fkl.learning_rates == (1e-3, 3e-3, 1e-2) * 2 and fkl.num_students == 6
  seqkd = runs.student_run(ri, 0, "seqkd", "t")
  assert seqkd.train_data == ("/w/seed_0/teacher_T0.8/train",) * 3 + ("/w/seed_0/teacher_T1/train",) * 3
  direct = runs.student_run(ri, 0, "direct", "t")
  assert direct.num_students == 3 and direct.learning_rates == (1e-3, 3e-3, 1e-2)
  assert [n for n, _ in cfg.student_groups()[2][1]][:2] == ["fkl_T0.8_lr0.001", "fkl_T0.8_lr0.003"]
  u = units.StudyUnits(cfg, digests={})
  sel = u.selection(0, "fkl")
  assert sel.what["select"] == u.pstar("select").key
  assert sel.what["students"] == u.students(0, "fkl").key


def test_best_per_group_first_on_ties_and_a_diverged_student_last():
  items = [("a", 1, -5.0), ("a", 2, -5.0), ("b", 3, float("nan")), ("b", 4, -9.0),
           ("c", 5, None), ("a", 6, -6.0)]
  assert stats.best_per_group(items) == [1, 4, 5]


def _selected(tmp_path, cfg, seed, kind, chosen):
  """A done selection unit in tmp_path choosing `chosen` (every rate's loglik made up)."""
  u = units.StudyUnits(cfg, digests={})
  sel = u.selection(seed, kind)
  records.claim(sel, str(tmp_path))
  names = [n for n, _, _ in cfg.student_grid(kind)]
  mark_done(sel.dir(str(tmp_path)), {"select_loglik": {n: -1.0 for n in names},
                                      "chosen": chosen})
  return u


def test_only_the_chosen_rates_are_scored_unless_all(tmp_path):
  cfg = StudyConfig(temperatures=(0.8, 1.0), students=("direct", "fkl"),
                    student_learning_rates=(1e-3, 3e-3), ground_truth="preset:test-tiny")
  u = units.StudyUnits(cfg, digests={})
  scores = lambda u: [x.rel for x in u.by_stage(str(tmp_path))["5_score_students"]  # noqa: E731
                      if x.what["unit"] == "scores"]
  assert scores(u) == [] and u.pending_scores(str(tmp_path)) == 3  # direct, fkl at 0.8 and 1
  u = _selected(tmp_path, cfg, 0, "fkl", ["fkl_T0.8_lr0.003", "fkl_T1_lr0.001"])
  assert scores(u) == ["seed_0/scores/fkl_T0.8_lr0.003", "seed_0/scores/fkl_T1_lr0.001"]
  assert u.pending_scores(str(tmp_path)) == 1
  every = units.StudyUnits(dataclasses.replace(cfg, score_rates="all"), digests={})
  assert len(scores(every)) == 6 and every.pending_scores(str(tmp_path)) == 0
  assert cfg.num_scored(4) == 2 and dataclasses.replace(cfg, score_rates="all").num_scored(4) == 4


@pytest.mark.slow
def test_a_sweep_whose_best_rate_is_known(tmp_path):
  """A rate of 1e-7 leaves a student at its initialisation; 3e-3 fits p*: select picks 3e-3."""
  cfg = dataclasses.replace(TINY_STUDY, students=("direct", "fkl"), temperatures=(1.0,),
                            student_learning_rates=(1e-7, 3e-3), embedding_map="none")
  rows = pipeline.run_study(cfg, str(tmp_path))
  assert [(r["objective"], r["learning_rate"]) for r in rows] == [("direct", 3e-3),
                                                                   ("fkl", 3e-3)]
  with open(os.path.join(tmp_path, "results.json")) as f:
    out = json.load(f)
  sweep = out["lr_sweep"]
  assert len(sweep) == 4 and sum(r["chosen"] for r in sweep) == 2
  low = [r for r in sweep if r["learning_rate"] == 1e-7]
  assert all(r["select_loglik"] < h["select_loglik"] for r, h in zip(low, out["rows"]))
  # --score_rates=chosen (the default): the unchosen rates are measured on select only
  assert all(r.get("scored") is False and "precision" not in r for r in low)
  assert sorted(os.listdir(tmp_path / "seed_0" / "scores")) == ["direct_lr0.003",
                                                                "fkl_T1_lr0.003"]
  done = records.read_record(os.path.join(tmp_path, "seed_0", "students", "direct"))
  assert len(done["models"]) == 2  # both rates in one run
