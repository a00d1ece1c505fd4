"""The SmolLM2 study pipeline (kdjax/llm/study/) end to end at tiny size, in-process: one tiny
study (tests/helpers.py TINY_STUDY) shared by every test here, then reruns, rescoring, damaged and
changed inputs against copies of its workdir.

The ground truth is a random test-tiny model (vocabulary 256) with a byte-level tokenizer; teacher
and students are test-tiny presets trained from scratch on a few dozen 8-token samples. The
numbers mean nothing; what is tested is the plumbing: stages, skip-when-done, resume, results.
Validation, the plan and refusals before any stage: tests/test_llm_study_plan.py. Kill-and-resume
of the real entry point: tests/test_experiments_llm.py.
"""

import csv
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from kdjax.llm.study import pipeline, plots, records, stats, units, work
from tests.helpers import TINY_STUDY as TINY
from tests.helpers import dataset_rows as _dataset_rows

pytestmark = pytest.mark.slow  # a whole tiny study (the module's fixture), then reruns of it


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  rows = pipeline.run_study(TINY, workdir)
  return workdir, rows


def test_end_to_end_outputs(study):
  workdir, rows = study
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved == {"config": TINY.to_dict(), "rows": rows, "summary": plots.summarize(rows),
                   "comparisons": stats.comparisons(rows),
                   "lr_sweep": [],  # no --student_learning_rates: no sweep
                   "entropy_slopes": stats.entropy_slopes(rows)}
  with open(os.path.join(workdir, "comparisons.csv")) as f:
    assert len(list(csv.DictReader(f))) == len(saved["comparisons"]) > 0
  assert [(r["objective"], r["temperature"]) for r in rows] == [
      ("direct", None), ("seqkd", 0.8), ("seqkd", 1.0)]
  for r in rows:
    assert r["seed"] == 0
    assert np.isfinite([r["precision"], r["recall"], r["val_perplexity"]]).all()
    assert r["precision"] < 0 and r["recall"] < 0 and r["val_perplexity"] > 1
  direct = rows[0]  # the direct student's validation set is p*'s: perplexity = exp(-recall)
  assert direct["val_perplexity"] == pytest.approx(np.exp(-direct["recall"]))
  with open(os.path.join(workdir, "results.csv")) as f:
    assert len(list(csv.DictReader(f))) == len(rows)
  for name in plots.FIGURES:
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  timings = json.load(open(os.path.join(workdir, "timings.json")))
  assert set(timings) == {"1_sample_ground_truth", "2_train_teacher", "3_sample_teacher",
                          "4_train_students", "5_score_students", "6_results"}
  # the teacher's samples: one dataset per temperature and split, 8 new tokens after "The"
  for t in ("0.8", "1"):
    ids, _, _ = _dataset_rows(os.path.join(workdir, "seed_0", f"teacher_T{t}", "train"))
    assert len(ids) == TINY.teacher_num_train and all(r[:3] == [84, 104, 101] for r in ids)


def _generated_loglik(model, rows, prompt_len):
  """Mean log-prob of the tokens after each row's prompt, every row run alone and unpadded: the
  definition of precision and recall, computed without the pipeline's batching and masks."""
  import jax
  from kdjax.llm import forward
  config, params = model
  total, count = 0.0, 0
  for r in rows:
    logits = jax.jit(forward, static_argnums=0)(config, params, np.asarray([r], np.int32))[0]
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    total += sum(logp[t - 1, r[t]] for t in range(prompt_len, len(r)))
    count += len(r) - prompt_len
  return total / count


def test_scores_are_generated_tokens_under_the_right_model(study):
  """Precision = the student's saved samples under p* (not under the student), recall = p*'s
  validation samples under the student, both over generated tokens only: with the bytes tokenizer
  the prompt "The" is three tokens, and they are never scored."""
  from kdjax.llm.weights import loading
  workdir, rows = study
  prompt = [84, 104, 101]
  pstar = loading.load_model(TINY.ground_truth)
  val = _dataset_rows(os.path.join(workdir, "pstar", "val"))[0]
  for k, (row, name) in enumerate(zip(rows, TINY.student_names())):
    run = os.path.join(workdir, "seed_0", "students", row["objective"])
    done = records.read_record(run)
    student = loading.load_model("ckpt:" + os.path.join(run, done["models"][max(k - 1, 0)]["checkpoint"]))
    samples = _dataset_rows(os.path.join(workdir, "seed_0", "student_samples", name))[0]
    assert all(r[:3] == prompt and len(r) > 3 for r in samples)
    assert row["precision"] == pytest.approx(_generated_loglik(pstar, samples, 3), abs=1e-5)
    assert abs(row["precision"] - _generated_loglik(student, samples, 3)) > 1e-2
    assert row["recall"] == pytest.approx(_generated_loglik(student, val, 3), abs=1e-5)


def test_embeddings_sample_measures_and_map(study, tmp_path, monkeypatch):
  """Every scored sequence is embedded by p* (the mean of its hidden states over its own tokens,
  computed alone and unpadded here); each row's k-NN numbers are the metric on those embeddings
  against p*'s first num_eval_samples validation sequences, its distinct-n the counts of its
  generated tokens; embedding_map.png is written. Changing --knn_k or --embedding_map reruns no
  stage but the results."""
  import jax
  from kdjax import sample_metrics
  from kdjax.llm.model import embeddings
  from kdjax.llm.weights import loading
  from kdjax.llm.model import llama as model
  from tests.test_sample_metrics import _reference
  workdir, rows = study
  config, params = loading.load_model(TINY.ground_truth)
  hidden = jax.jit(model.hidden_states, static_argnums=0)

  def embed(seqs):
    return np.stack([np.asarray(hidden(config, params, np.asarray([r], np.int32))[0]).mean(0)
                     for r in seqs])
  val = _dataset_rows(os.path.join(workdir, "pstar", "val"))[0][:TINY.num_eval_samples]
  ref = embeddings.load(os.path.join(workdir, "embeddings", "pstar_val"))
  assert ref == pytest.approx(embed(val), abs=1e-5)
  for row, name in zip(rows, TINY.student_names()):
    samples = _dataset_rows(os.path.join(workdir, "seed_0", "student_samples", name))[0]
    emb = embeddings.load(os.path.join(workdir, "seed_0", "scores", name))
    assert emb == pytest.approx(embed(samples), abs=1e-5)
    assert (row["knn_precision"], row["knn_recall"]) == pytest.approx(
        _reference(ref, emb, TINY.knn_k), abs=1e-6)
    generated = [r[3:] for r in samples]
    for n in (1, 2, 3):
      assert row[f"distinct_{n}"] == sample_metrics.distinct_n(generated, n)
    assert row["mean_length"] == pytest.approx(np.mean([len(g) for g in generated]))
    assert row["mauve"] is None or 0 <= row["mauve"] <= 1
  assert os.path.getsize(os.path.join(workdir, "embedding_map.png")) > 10_000
  other = str(tmp_path / "w")
  shutil.copytree(workdir, other)
  ran = _record_work(monkeypatch)

  def refuse(spec):
    raise AssertionError(f"loaded {spec}: only the results should run")
  monkeypatch.setattr(loading, "load_model", refuse)
  rows2 = pipeline.run_study(dataclasses.replace(TINY, knn_k=1, embedding_map="none"), other)
  assert ran == [] and not os.path.exists(os.path.join(other, "embedding_map.png"))
  assert [r["precision"] for r in rows2] == [r["precision"] for r in rows]
  assert [r["knn_precision"] for r in rows2] == [
      pytest.approx(_reference(ref, embeddings.load(os.path.join(workdir, "seed_0", "scores", n)),
                               1)[0], abs=1e-6) for n in TINY.student_names()]


def test_rerun_skips_finished_stages(study, monkeypatch):
  workdir, rows = study
  from kdjax.llm.weights import loading
  from kdjax.llm.model import sampling
  from kdjax.llm.train import loop as train

  def refuse(*a, **k):
    raise AssertionError("a finished stage ran again")
  for module, name in ((train, "train"), (sampling, "sample"), (loading, "load_model")):
    monkeypatch.setattr(module, name, refuse)
  before = open(os.path.join(workdir, "results.json"), "rb").read()
  assert pipeline.run_study(TINY, workdir) == rows
  assert open(os.path.join(workdir, "results.json"), "rb").read() == before


def test_rescoring_reproduces_the_scores(study):
  """Deleting one student's score and the results: a rerun recomputes the same numbers."""
  workdir, rows = study
  shutil.rmtree(os.path.join(workdir, "seed_0", "scores", "seqkd_T0.8"))
  shutil.rmtree(os.path.join(workdir, "seed_0", "student_samples", "seqkd_T0.8"))
  os.remove(os.path.join(workdir, "results.json"))
  assert pipeline.run_study(TINY, workdir) == rows


def test_teacher_selects_on_its_own_split(study):
  """p*'s splits are disjoint draws with one use each: the teacher trains on train and keeps its
  checkpoint of best perplexity on select (its recorded perplexity is the kept checkpoint's on
  select, not on val); val is recall's test set only; students have no validation data at all."""
  from kdjax.llm.weights import loading
  workdir, _ = study
  rows = {s: {tuple(r) for r in _dataset_rows(os.path.join(workdir, "pstar", s))[0]}
          for s in ("train", "val", "select")}
  assert len(rows["select"]) == TINY.num_select
  assert not rows["val"] & rows["select"] and not rows["val"] & rows["train"]
  with open(os.path.join(workdir, "teacher", "config.json")) as f:
    assert json.load(f)["val_data"] == os.path.join(workdir, "pstar", "select")
  for name in ("direct", "seqkd"):
    with open(os.path.join(workdir, "seed_0", "students", name, "config.json")) as f:
      assert json.load(f)["val_data"] == ""
  kept = records.read_record(os.path.join(workdir, "teacher"))["models"][0]
  assert not os.path.isabs(kept["checkpoint"])  # relative: a copied workdir reads its own
  teacher = loading.load_model("ckpt:" + os.path.join(workdir, "teacher", kept["checkpoint"]))
  ll = {s: work.mean_loglik(*teacher, work.load_dataset(os.path.join(workdir, "pstar", s)),
                                TINY.eval_batch_size, 3 + TINY.max_new_tokens, s)
        for s in ("select", "val")}
  assert kept["val_perplexity"] == pytest.approx(np.exp(-ll["select"]), rel=1e-4)
  assert kept["val_perplexity"] != pytest.approx(np.exp(-ll["val"]), rel=1e-3)


def _record_work(monkeypatch):
  """Wrap the sampler and the trainer: the list of output dirs they actually produce."""
  from kdjax.llm.train import loop as trainlib
  ran = []
  sample, train = work.sample_dataset, trainlib.train

  def sample_dataset(out_dir, *a, **k):
    ran.append(out_dir)
    return sample(out_dir, *a, **k)

  def train_run(tc, out_dir, *a, **k):
    ran.append(out_dir)
    return train(tc, out_dir, *a, **k)
  monkeypatch.setattr(pipeline, "sample_dataset", sample_dataset)
  monkeypatch.setattr(trainlib, "train", train_run)
  return ran


def test_stage_cache_reruns_exactly_what_changed(study, tmp_path, monkeypatch):
  """The workdir is a cache keyed by each stage's inputs: another seed and another number of
  student samples reuse p*'s samples, the teacher and seed 0's teacher samples and students, and
  run only seed 1's units and the student samples; going back to the first flags resamples only
  what the second run replaced, and gives back the first results.json byte for byte."""
  workdir, rows = str(tmp_path / "w"), study[1]
  shutil.copytree(study[0], workdir)
  first = open(os.path.join(workdir, "results.json"), "rb").read()
  ran = _record_work(monkeypatch)
  rel = lambda: sorted(os.path.relpath(p, workdir) for p in ran)
  more = dataclasses.replace(TINY, num_seeds=2, num_eval_samples=8)
  rows2 = pipeline.run_study(more, workdir)
  assert rel() == sorted(
      [f"seed_1/teacher_T{t}/{s}" for t in ("0.8", "1") for s in ("train", "val")]
      + ["seed_1/students/direct", "seed_1/students/seqkd"]
      + [f"seed_{i}/student_samples/{n}" for i in (0, 1) for n in more.student_names()])
  assert [r for r in rows2 if r["seed"] == 0] != rows  # 8 samples per student, not 16
  saved = json.load(open(os.path.join(workdir, "results.json")))
  assert saved["config"] == more.to_dict() and len(saved["rows"]) == 6
  ran.clear()
  assert pipeline.run_study(TINY, workdir) == rows
  assert rel() == [f"seed_0/student_samples/{n}" for n in sorted(TINY.student_names())]
  assert open(os.path.join(workdir, "results.json"), "rb").read() == first
  # a changed teacher setting: the teacher and everything after it, but not p*'s samples
  ran.clear()
  pipeline.run_study(dataclasses.replace(TINY, teacher_epochs=1), workdir)
  assert "teacher" in rel() and not any(p.startswith("pstar") for p in rel())
  assert "seed_0/students/seqkd" in rel()


def test_dry_run_reports_the_cache(study, tmp_path):
  workdir = study[0]
  report = pipeline.cache_report(dataclasses.replace(TINY, num_seeds=2), workdir)
  assert "1_sample_ground_truth: 3 cached\n" in report
  assert "2_train_teacher: 1 cached\n" in report
  assert "4_train_students: 2 cached; 2 to run (seed_1/students/direct, seed_1/students/seqkd)" \
      in report


def test_token_level_and_on_policy_students_train_and_score(study, tmp_path, monkeypatch):
  """Two kinds of the family through the study, reusing p*'s samples and the teacher: fkl (p*'s
  sequences, the teacher's distribution at each T as target) and onpolicy_rkl (the student's own
  samples); one student per temperature each, rows finite, trained against the study's teacher."""
  workdir = str(tmp_path / "w")
  shutil.copytree(study[0], workdir, ignore=shutil.ignore_patterns("seed_*"))
  ran = _record_work(monkeypatch)
  cfg = dataclasses.replace(TINY, students=("fkl", "onpolicy_rkl"))
  rows = pipeline.run_study(cfg, workdir)
  assert sorted(os.path.relpath(p, workdir) for p in ran if "students/" in p) == [
      "seed_0/students/fkl", "seed_0/students/onpolicy_rkl"]
  assert not os.path.exists(os.path.join(workdir, "seed_0", "teacher_T0.8"))  # seqkd's data only
  assert [(r["objective"], r["temperature"]) for r in rows] == [
      ("fkl", 0.8), ("fkl", 1.0), ("onpolicy_rkl", 0.8), ("onpolicy_rkl", 1.0)]
  for r in rows:
    assert np.isfinite([r["precision"], r["recall"]]).all()
    assert r["val_perplexity"] == pytest.approx(np.exp(-r["recall"]))  # p*'s val set
  teacher = "ckpt:" + os.path.join(workdir, "teacher",
                                   records.read_record(os.path.join(workdir, "teacher"))["models"][0]["checkpoint"])
  for kind, onpolicy in (("fkl", False), ("onpolicy_rkl", True)):
    with open(os.path.join(workdir, "seed_0", "students", kind, "config.json")) as f:
      tc = json.load(f)
    assert tc["teacher"] == teacher and tc["teacher_temperatures"] == [0.8, 1.0]
    assert tc["objective"] == kind.split("_")[-1] and tc.get("onpolicy", False) == onpolicy
    if onpolicy:
      assert tc["prompt"] == [84, 104, 101] and tc["train_data"] == []
      assert tc["steps"] == TINY.num_train // TINY.batch_size
    else:
      assert tc["train_data"] == [os.path.join(workdir, "pstar", "train")]
