"""The SmolLM2 study's teacher knobs (issue 22): --teacher_knob / --knob_values in the config, the
units' identities (a knob's samples and students are new units; the temperature units keep their
keys), the training runs they make, the teacher's entropy measured on p*'s select split, the
slopes per nat of it, and the smoke flagfile's dry run."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.cli import UserError
from kdjax.llm.model import llama, targets
from kdjax.llm.study import entropy, runs, stats, units
from kdjax.llm.study.config import StudyConfig, validate
from tests.helpers import TINY_MODEL, TINY_STUDY, run_module
from tests.test_llm_truncation import _kept_numpy

TEMPS = StudyConfig(temperatures=(0.8, 1.0), students=("direct", "seqkd", "fkl"), num_seeds=2,
                    seed_scope="teacher")
KNOB = dataclasses.replace(TEMPS, teacher_knob="top_p", knob_values=(0.8, 1.0))
DIGESTS = {"ground_truth": "gt"}


@pytest.mark.parametrize("change, flag", [
    ({"teacher_knob": "top_q"}, "--teacher_knob"),
    ({"knob_values": (0.5,)}, "--knob_values"),  # with the temperature knob
    ({"teacher_knob": "top_p"}, "--teacher_knob"),  # no values
    ({"teacher_knob": "top_p", "knob_values": (0.5, 1.5)}, "--knob_values"),
    ({"teacher_knob": "min_p", "knob_values": (0.0,)}, "--knob_values"),
    ({"teacher_knob": "top_k", "knob_values": (2.5,)}, "--knob_values"),
    ({"teacher_knob": "top_p", "knob_values": (0.5, 0.5)}, "--knob_values"),
    ({"teacher_knob": "top_p", "knob_values": (0.5,), "students": ("seqkd", "rkl")}, "rkl"),
    ({"teacher_knob": "top_k", "knob_values": (5,), "students": ("onpolicy_rkl",)}, "rkl"),
])
def test_bad_knob_flags_are_one_line(change, flag):
  with pytest.raises(UserError, match=flag):
    validate(dataclasses.replace(TEMPS, **change))


def test_runs_and_names_per_knob():
  assert KNOB.student_runs() == [("direct", "temperature"), ("seqkd", "temperature"),
                                 ("seqkd", "top_p"), ("fkl", "temperature"), ("fkl", "top_p")]
  assert TEMPS.student_runs() == [(k, "temperature") for k in TEMPS.students]
  assert KNOB.student_names() == ["direct", "seqkd_T0.8", "seqkd_T1", "seqkd_topp0.8",
                                  "seqkd_topp1", "fkl_T0.8", "fkl_T1", "fkl_topp0.8", "fkl_topp1"]
  topk = dataclasses.replace(TEMPS, teacher_knob="top_k", knob_values=(5, 40))
  assert [n for n, _, _ in topk.student_grid("fkl", "top_k")] == ["fkl_topk5", "fkl_topk40"]


def _keys(cfg):
  return {u.rel: u.key for us in units.StudyUnits(cfg, DIGESTS).by_stage().values() for u in us}


def test_a_knob_adds_units_and_keeps_the_temperature_units_keys():
  """Adding --teacher_knob changes no temperature unit (it is reused from a temperature run's
  workdir); every knob unit has its own directory and key, and the knob's teacher samples their
  own random stream (top_p 1.0 is not T = 1.0's samples again)."""
  plain, knob = _keys(TEMPS), _keys(KNOB)
  assert all(knob[rel] == key for rel, key in plain.items())
  new = sorted(set(knob) - set(plain))
  assert "seed_0/teacher_topp1/train" in new and "seed_1/students/fkl_top_p" in new
  assert "teacher_entropy/topp0.8" in new and "seed_1/teacher_entropy/topp1" in new
  assert "seed_0/scores/seqkd_topp1" in new
  u = units.StudyUnits(KNOB, DIGESTS)
  t1, p1 = u.teacher_samples(0, 1.0, "train"), u.teacher_samples(0, 1.0, "train", "top_p")
  assert t1.stream != p1.stream and t1.key != p1.key
  assert p1.what["knob"] == "top_p" and p1.what["knob_value"] == 1.0
  assert "knob" not in u.students(0, "fkl").what and "knob" not in t1.what
  assert u.students(0, "fkl", "top_p").what["knob_values"] == [0.8, 1.0]
  assert (u.students(0, "seqkd", "top_p").what["data"]
          == [u.teacher_samples(0, v, "train", "top_p").key for v in (0.8, 1.0)])
  # the entropy of a teacher seed: its teacher and its select split
  e = u.teacher_entropy(1, 0.8, "top_p")
  assert e.what["teacher"] == u.teacher(1).key and e.what["select"] == u.pstar("select", 1).key
  # another value of the knob leaves the first value's samples and entropy alone
  more = _keys(dataclasses.replace(KNOB, knob_values=(0.8, 0.9, 1.0)))
  assert more["seed_0/teacher_topp0.8/train"] == knob["seed_0/teacher_topp0.8/train"]
  assert more["teacher_entropy/topp0.8"] == knob["teacher_entropy/topp0.8"]
  assert more["seed_0/students/fkl_top_p"] != knob["seed_0/students/fkl_top_p"]


def test_student_runs_under_a_knob():
  ri = runs.RunInputs(KNOB, "/w", (1,), 2)
  seqkd = runs.student_run(ri, 0, "seqkd", "ckpt:/t", "top_p")
  assert seqkd.train_data == ("/w/seed_0/teacher_topp0.8/train", "/w/seed_0/teacher_topp1/train")
  assert seqkd.teacher_knob == "temperature" and not seqkd.teacher_temperatures  # plain NLL
  fkl = runs.student_run(ri, 0, "fkl", "ckpt:/t", "top_p")
  assert fkl.teacher_knob == "top_p" and fkl.teacher_temperatures == (0.8, 1.0)
  plain = runs.student_run(ri, 0, "fkl", "ckpt:/t")
  assert plain.teacher_knob == "temperature" and plain.teacher_temperatures == (0.8, 1.0)
  assert len(runs.training_runs(ri)["4_train_students"]) == 2 * 5


def _row(kind, knob, value, seed, h, p, r):
  return {"objective": kind, "temperature": value if knob == "temperature" else 1.0,
          "knob": knob, "knob_value": value, "seed": seed, "teacher_entropy": h,
          "precision": p, "recall": r}


def test_entropy_slopes_against_polyfit():
  rng = np.random.default_rng(0)
  rows, want = [], {}
  for knob, values in (("temperature", [0.8, 0.9, 1.0]), ("top_p", [0.5, 0.8, 0.95])):
    for seed in range(3):
      h = np.asarray(values) * 2 + rng.normal(0, 0.05, 3)
      p, r = -3 * h + rng.normal(0, 0.1, 3), 2 * h + rng.normal(0, 0.1, 3)
      rows += [_row("fkl", knob, v, seed, *x) for v, *x in zip(values, h, p, r)]
      want.setdefault(knob, []).append((np.polyfit(h, p, 1)[0], np.polyfit(h, r, 1)[0]))
  rows.append({"objective": "direct", "temperature": None, "knob": None, "knob_value": None,
               "seed": 0, "teacher_entropy": None, "precision": -1.0, "recall": -1.0})
  out = stats.entropy_slopes(rows)
  assert set(out) == {"fkl"} and set(out["fkl"]) == {"temperature", "top_p"}
  for knob, slopes in want.items():
    for i, m in enumerate(("precision", "recall")):
      got = out["fkl"][knob]
      assert got["seed_slopes"][m] == pytest.approx({str(s): v[i] for s, v in enumerate(slopes)})
      assert got[m] == pytest.approx(stats.mean_interval([v[i] for v in slopes]), rel=1e-9)
      assert got[m]["ci95_low"] < got[m]["mean"] < got[m]["ci95_high"]
  for i, m in enumerate(("precision", "recall")):
    diff = [p[i] - t[i] for p, t in zip(want["top_p"], want["temperature"])]
    assert out["fkl"]["top_p"]["minus_temperature"][m] == pytest.approx(
        stats.mean_interval(diff), rel=1e-9)
  assert "minus_temperature" not in out["fkl"]["temperature"]
  # the summary keeps T = 1 and top_p rows (temperature 1.0 both) apart; comparisons read T only
  summary = stats.summarize(rows)
  assert len(summary) == 7 and {e.get("knob") for e in summary} == {"temperature", "top_p", None}
  assert all(c["kind"] == "fkl" and c["temperature"] != 1.0 or c["comparison"] != "temperature"
             for c in stats.comparisons(stats.temperature_rows(rows)))


def test_mean_entropy_on_a_model_against_numpy():
  """study.entropy over two batches of a tiny model: the mean over target positions (after the
  prompt, not padding) of -sum p log p of the (tempered or truncated) next-token distribution."""
  config = TINY_MODEL
  params = llama.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(1)
  ids = rng.integers(0, config.vocab_size, (2, 4, 9)).astype(np.int32)
  mask = np.ones((2, 4, 9), bool)
  mask[0, 1, 6:] = False
  tmask = np.asarray(targets.target_mask(jnp.asarray(mask.reshape(8, 9)), jnp.full((8,), 2)))
  batches = [{"input_ids": ids[i], "attention_mask": mask[i], "target_mask": tmask[4 * i:4 * i + 4]}
             for i in range(2)]
  for knob, value in (("temperature", 0.7), ("top_p", 0.5), ("min_p", 0.2), ("top_k", 3)):
    hs = []
    for b in batches:
      z = np.asarray(llama.forward(config, params, b["input_ids"], b["attention_mask"]),
                     np.float64)[:, :-1]
      counted = np.asarray(targets.counted(jnp.asarray(b["attention_mask"]),
                                           jnp.asarray(b["target_mask"])))[:, 1:]
      for row, pos in zip(*np.nonzero(counted)):
        q = z[row, pos] / (value if knob == "temperature" else 1.0)
        keep = _kept_numpy(q, **({} if knob == "temperature" else
                                 {knob: int(value) if knob == "top_k" else value}))
        p = np.where(keep, np.exp(q - q.max()), 0.0)
        p /= p.sum()
        hs.append(-np.sum(p[p > 0] * np.log(p[p > 0])))
    assert len(hs) == 8 * 7 - 3  # 7 targets a row after the 2-token prompt; row 1 ends at 6
    got = entropy.mean_entropy(config, params, batches, knob, value)
    assert got == pytest.approx(np.mean(hs), rel=1e-5), knob
  assert entropy.mean_entropy(config, params, batches, "top_k", 1) == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_knobs_smoke_flagfile_dry_run(tmp_path):
  proc = run_module("experiments.llm", "--flagfile=experiments/flags/llm_knobs_smoke.flags",
                    f"--workdir={tmp_path / 'w'}", "--dry_run", "--nomemory_analysis",
                    devices=None)
  assert proc.returncode == 0, proc.stderr
  for text in ("'seqkd_topp0.8'", "'fkl_topp0.95'", "top_p in [0.8, 0.95] at T=1",
               "seqkd x4", "fkl x4", "seed_0/students/fkl_top_p", "teacher_entropy/topp0.95"):
    assert text in proc.stdout, (text, proc.stdout)
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_tiny_study_with_a_knob(tmp_path):
  """The tiny study with top_p students: rows carry knob, knob_value and the teacher's entropy
  (the same per setting for every kind of a seed, lower for a smaller p), entropy_slopes and the
  entropy figures are written. One seed (its slopes' n is 1): the mean over seeds is
  test_entropy_slopes_against_polyfit's; checkpoints only at the end of each run."""
  from kdjax.llm.study import pipeline
  cfg = dataclasses.replace(TINY_STUDY, students=("seqkd", "fkl", "onpolicy_jsd"),
                            teacher_knob="top_p", knob_values=(0.3, 0.9), checkpoint_every=0)
  rows = pipeline.run_study(cfg, str(tmp_path))
  assert len(rows) == 3 * 4
  ent = {(r["knob"], r["knob_value"]): r["teacher_entropy"] for r in rows}
  assert len(ent) == 4 and all(h > 0 for h in ent.values())
  assert ent[("top_p", 0.3)] < ent[("top_p", 0.9)] and ent[("temperature", 0.8)] < ent[
      ("temperature", 1.0)]
  saved = json.load(open(tmp_path / "results.json"))
  assert set(saved["entropy_slopes"]) == {"seqkd", "fkl", "onpolicy_jsd"}
  assert saved["entropy_slopes"]["fkl"]["top_p"]["precision"]["n"] == 1
  for name in ("precision_vs_entropy.png", "recall_vs_entropy.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert math.isfinite(saved["entropy_slopes"]["seqkd"]["temperature"]["recall"]["mean"])
