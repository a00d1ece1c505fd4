"""Learning rates chosen, not assumed (issue 20): --student_learning_rates trains every student
at each rate in its kind's one vmapped run, and each (kind, T, seed) keeps the rate of best
log-likelihood on p*'s select split, never recall's val set; the others stay in lr_sweep."""

import dataclasses
import json
import os

import pytest

from kdjax.llm.study import pipeline, report, runs, units
from kdjax.llm.study.config import StudyConfig
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
  assert u.scores(0, "fkl", 0, "fkl_T0.8_lr0.001", 0.8).what["select"] == u.pstar("select").key


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
  done = units.read_record(os.path.join(tmp_path, "seed_0", "students", "direct"))
  assert len(done["models"]) == 2  # both rates in one run
