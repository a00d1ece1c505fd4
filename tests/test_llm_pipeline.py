"""The SmolLM2 study pipeline (kdjax/llm/study/pipeline.py, plan.py, plots.py) at tiny size, in-process.

The ground truth is a random test-tiny model (vocabulary 256) with a byte-level tokenizer; teacher
and students are test-tiny presets trained from scratch on a few dozen 8-token samples. The
numbers mean nothing; what is tested is the plumbing: stages, skip-when-done, resume, results.
Kill-and-resume of the real entry point is in tests/test_experiments_llm.py.
"""

import csv
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

from kdjax.cli import UserError
from kdjax.llm.study import pipeline
from kdjax.llm.study import plots
from kdjax.llm.study import cost, inputs, units, work
from kdjax.llm.model.config import get_preset
from kdjax.llm.study.config import StudyConfig, validate
from kdjax.llm.study.cost import format_plan, make_plan

TINY = StudyConfig(  # the teacher spec carries a seed: preset:NAME@SEED works through the study
    ground_truth="preset:test-tiny@7", tokenizer="bytes", teacher="preset:test-tiny@5",
    student="preset:test-tiny", temperatures=(0.8, 1.0), num_train=32, num_val=16, num_select=8,
    teacher_num_train=32, teacher_num_val=8, num_eval_samples=16, max_new_tokens=8,
    sample_batch_size=8, shard_size=8, teacher_epochs=2, student_epochs=1, batch_size=8,
    learning_rate=3e-3, checkpoint_every=2, eval_batch_size=8)


def _describe(spec):
  return get_preset(spec.split(":", 1)[1].split("@")[0])


@pytest.mark.parametrize("change, flag", [
    ({"temperatures": (0.8, 0.0)}, "--temperatures"),
    ({"temperatures": (-1.0,)}, "--temperatures"),
    ({"temperatures": (float("nan"),)}, "--temperatures"),
    ({"temperatures": ()}, "--temperatures"),
    ({"temperatures": (0.8, 0.8)}, "--temperatures"),
    ({"num_train": 0}, "--num_train"),
    ({"num_select": 0}, "--num_select"),
    ({"num_eval_samples": 0}, "--num_eval_samples"),
    ({"batch_size": 64}, "--batch_size"),
    ({"teacher_epochs": 0}, "--teacher_epochs"),
    ({"learning_rate": -1.0}, "--learning_rate"),
    ({"warmup_fraction": 0.9, "decay_fraction": 0.5}, "--warmup_fraction"),
    ({"teacher": "ckpt:/somewhere"}, "--teacher"),
    ({"ground_truth": "model.gguf"}, "--ground_truth"),
])
def test_validate_names_the_flag(change, flag):
  with pytest.raises(UserError, match=flag):
    validate(dataclasses.replace(TINY, **change))


def test_plan_counts_every_stage():
  plan = make_plan(TINY, _describe, prompt_len=3)
  stages = {s["stage"]: s for s in plan["stages"]}
  assert list(stages) == ["1_sample_ground_truth", "2_train_teacher", "3_sample_teacher",
                          "4_train_students", "5_score_students", "6_results"]
  assert plan["seq_len"] == 3 + TINY.max_new_tokens
  s1 = stages["1_sample_ground_truth"]
  assert s1["sequences"] == TINY.num_train + TINY.num_val + TINY.num_select
  assert s1["tokens"] == s1["sequences"] * plan["seq_len"]
  assert stages["3_sample_teacher"]["sequences"] == 2 * (TINY.teacher_num_train + TINY.teacher_num_val)
  assert stages["2_train_teacher"]["tokens"] == TINY.teacher_epochs * TINY.num_train * plan["seq_len"]
  assert plan["students"] == ["direct", "seqkd_T0.8", "seqkd_T1"]
  for s in plan["stages"][:-1]:
    assert s["flops"] > 0 and s["memory_per_device_bytes"] > 0
  # more seeds: more teacher samples and students, the same p* samples
  plan3 = make_plan(dataclasses.replace(TINY, num_seeds=3), _describe, prompt_len=3)
  st3 = {s["stage"]: s for s in plan3["stages"]}
  assert st3["3_sample_teacher"]["sequences"] == 3 * stages["3_sample_teacher"]["sequences"]
  assert st3["1_sample_ground_truth"]["sequences"] == s1["sequences"]
  text = format_plan(plan)
  for name in stages:
    assert name in text


def test_plan_refuses_mismatched_vocabulary():
  cfg = dataclasses.replace(TINY, teacher="preset:micro-49k")
  with pytest.raises(UserError, match="--teacher.*vocabulary"):
    make_plan(cfg, _describe)


def test_dry_run_loads_no_weights(monkeypatch):
  from kdjax.llm.weights import loading

  def refuse(spec):
    raise AssertionError(f"dry run loaded {spec}")
  monkeypatch.setattr(loading, "load_model", refuse)
  plan = cost.dry_run_plan(TINY)
  assert plan["models"]["ground_truth"]["vocab"] == 256
  # a ground truth absent from this machine is planned from the named preset, with a note
  cfg = dataclasses.replace(TINY, ground_truth="hf:/nonexistent/SmolLM2-1.7B", tokenizer="bytes",
                            teacher="preset:smollm2-360m", student="preset:smollm2-135m")
  plan = cost.dry_run_plan(cfg, ground_truth_preset="smollm2-1.7b")
  assert plan["models"]["ground_truth"]["params"] == get_preset("smollm2-1.7b").num_params()
  assert any("nonexistent" in n for n in plan["notes"])
  with pytest.raises(UserError, match="nonexistent"):
    cost.dry_run_plan(cfg)


ROWS = [
    {"objective": "direct", "temperature": None, "seed": 0, "precision": -3.0, "recall": -2.0,
     "val_perplexity": 7.0},
    {"objective": "seqkd", "temperature": 0.8, "seed": 0, "precision": -2.0, "recall": -3.0,
     "val_perplexity": 5.0},
    {"objective": "seqkd", "temperature": 0.8, "seed": 1, "precision": -1.0, "recall": -4.0,
     "val_perplexity": 4.0},
    {"objective": "seqkd", "temperature": 1.0, "seed": 0, "precision": -2.5, "recall": -2.5,
     "val_perplexity": 6.0},
    {"objective": "rkl", "temperature": 0.8, "seed": 0, "precision": -1.5, "recall": -3.5,
     "val_perplexity": 5.5},
]


def test_csv_figures_and_summary(tmp_path):
  plots.write_csv(ROWS, str(tmp_path / "results.csv"))
  with open(tmp_path / "results.csv") as f:
    got = list(csv.DictReader(f))
  assert [r["objective"] for r in got] == ["direct", "seqkd", "seqkd", "seqkd", "rkl"]
  assert got[0]["temperature"] == "" and float(got[2]["precision"]) == -1.0
  paths = plots.write_figures(ROWS, str(tmp_path))
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  s = {(e["objective"], e["temperature"]): e for e in plots.summarize(ROWS)}
  assert list(s) == [("direct", None), ("seqkd", 0.8), ("seqkd", 1.0), ("rkl", 0.8)]
  kd = s[("seqkd", 0.8)]  # mean and standard error (sample sd / sqrt(n)) over the two seeds
  assert kd["n"] == 2 and kd["precision_mean"] == -1.5
  assert kd["precision_se"] == pytest.approx(np.std([-2.0, -1.0], ddof=1) / np.sqrt(2))
  assert kd["recall_se"] == pytest.approx(0.5)
  assert s[("direct", None)]["recall_mean"] == -2.0 and s[("direct", None)]["recall_se"] is None
  table = plots.format_table(ROWS)
  assert "| seqkd | 0.8 | 2 | -1.50 ± 0.50 | -3.50 ± 0.50 |" in table
  assert "| rkl | 0.8 | 1 | -1.50 | -3.50 |" in table


def _dataset_rows(path):
  ds = work.load_dataset(path)
  return [list(r) for r in ds["input_ids"]], list(ds["text"]), list(ds["length"])


def test_sample_dataset_resumes_exactly(tmp_path):
  from kdjax.llm.weights import loading
  config, params = loading.load_model(TINY.ground_truth)
  tok, prompt = inputs.ByteTokenizer(), [84, 104, 101]
  kw = dict(num=20, temperature=1.0, cfg=TINY, eos_id=-1)  # no EOS: every row full length
  key = work.seed_key(0, 0, 0)
  full = str(tmp_path / "full")
  work.sample_dataset(full, config, params, prompt, tok, key, desc="", **kw)
  ids, texts, lengths = _dataset_rows(full)
  assert len(ids) == 20 and all(r[:3] == prompt and len(r) == 3 + 8 for r in ids)
  assert lengths == [len(r) for r in ids] and texts[0] == tok.decode(ids[0])
  assert units.read_record(full)["shards"] == 3
  # a run killed after two shards (the third never renamed into place) resumes to the same rows
  part = str(tmp_path / "part")
  shutil.copytree(full, part)
  shutil.rmtree(os.path.join(part, "shard-00002"))
  os.remove(os.path.join(part, work.DONE))
  work.sample_dataset(part, config, params, prompt, tok, key, desc="", **kw)
  assert _dataset_rows(part) == (ids, texts, lengths)
  # and another key gives other samples
  other = str(tmp_path / "other")
  work.sample_dataset(other, config, params, prompt, tok, work.seed_key(1, 0, 0), desc="",
                          **kw)
  assert _dataset_rows(other)[0] != ids


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  rows = pipeline.run_study(TINY, workdir)
  return workdir, rows


def test_end_to_end_outputs(study):
  workdir, rows = study
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved == {"config": TINY.to_dict(), "rows": rows, "summary": plots.summarize(rows)}
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
    done = units.read_record(run)
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


def test_datasets_without_prompt_lengths_are_refused(tmp_path):
  """A workdir sampled before rows recorded their prompt length would score two of the three
  prompt tokens: the study stops at once instead."""
  import datasets
  datasets.Dataset.from_dict({"input_ids": [[84, 104, 101, 5, 6]]}).save_to_disk(
      str(tmp_path / "pstar" / "train" / "shard-00000"))
  with pytest.raises(UserError, match="pstar/train was sampled before.*3-token prompt"):
    pipeline.run_study(TINY, str(tmp_path))


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


def test_empty_dataset_is_a_clear_error(study, tmp_path):
  workdir, _ = study
  broken = str(tmp_path / "broken")
  shutil.copytree(workdir, broken)
  shutil.rmtree(os.path.join(broken, "seed_0", "students", "seqkd"))
  for name in os.listdir(os.path.join(broken, "seed_0", "teacher_T0.8", "train")):
    if name.startswith("shard-"):
      shutil.rmtree(os.path.join(broken, "seed_0", "teacher_T0.8", "train", name))
  with pytest.raises(UserError, match="teacher_T0.8/train.*no dataset shards"):
    pipeline.run_study(TINY, broken)


def test_clear_outputs_removes_only_pipeline_outputs(tmp_path):
  """--overwrite of another configuration starts clean, touching nothing else in the folder."""
  for d in ("pstar/train", "teacher/best", "seed_0/scores", "seed_3", "notes"):
    os.makedirs(tmp_path / d)
  for f in ("results.json", "results.csv", "timings.json", "config.json", "mine.txt",
            plots.FIGURES[0]):
    (tmp_path / f).write_text("x")
  pipeline.clear_outputs(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "mine.txt", "notes"]


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
  kept = units.read_record(os.path.join(workdir, "teacher"))["models"][0]
  assert not os.path.isabs(kept["checkpoint"])  # relative: a copied workdir reads its own
  teacher = loading.load_model("ckpt:" + os.path.join(workdir, "teacher", kept["checkpoint"]))
  ll = {s: work.mean_loglik(*teacher, work.load_dataset(os.path.join(workdir, "pstar", s)),
                                TINY.eval_batch_size, 3 + TINY.max_new_tokens, s)
        for s in ("select", "val")}
  assert kept["val_perplexity"] == pytest.approx(np.exp(-ll["select"]), rel=1e-4)
  assert kept["val_perplexity"] != pytest.approx(np.exp(-ll["val"]), rel=1e-3)


def _hf_dir_without(path, tensor):
  """An hf:DIR of preset test-tiny whose safetensors lack one tensor (config.json intact)."""
  from safetensors.numpy import load_file, save_file
  from kdjax.llm import save_hf
  from kdjax.llm.weights import loading
  save_hf(*loading.load_model("preset:test-tiny"), str(path))
  tensors = load_file(str(path / "model.safetensors"))
  del tensors[tensor]
  save_file(tensors, str(path / "model.safetensors"))
  return f"hf:{path}"


def _ckpt_of_another_shape(path):
  """A ckpt:DIR whose model_config.json says a wider MLP than its saved parameters have."""
  from kdjax import checkpoint
  from kdjax.llm.weights import loading
  config, params = loading.load_model("preset:test-tiny")
  checkpoint.export_model(str(path), config, params)
  with open(path / checkpoint.MODEL_CONFIG, "w") as f:
    json.dump(config.replace(intermediate_size=256).to_dict(), f)
  return f"ckpt:{path}"


@pytest.mark.parametrize("case, needle", [
    ("teacher_seed", "preset:test-tiny@x"), ("student_preset", "no-such"),
    ("gt_missing_tensor", "model.norm.weight is missing"),
    ("gt_ckpt_shape", "['mlp']['down']['kernel'] is of shape (2, 128, 64)"),
    ("gt_not_ckpt", "not a kdjax model checkpoint"), ("mesh", "--mesh"),
    ("eval_batch", "--eval_batch_size=4"), ("length", "--max_new_tokens=600")])
def test_preflight_refuses_bad_input_before_any_stage(tmp_path, monkeypatch, case, needle):
  """Input that a later stage would fail on (after hours of earlier ones) is refused up front:
  nothing is sampled, trained or loaded, and no stage output appears."""
  from kdjax.llm.weights import loading
  from kdjax.llm.model import sampling
  from kdjax.llm.train import loop as train
  (tmp_path / "empty").mkdir()
  cfg = dataclasses.replace(TINY, **{
      "teacher_seed": lambda: {"teacher": "preset:test-tiny@x"},
      "student_preset": lambda: {"student": "preset:no-such@3"},
      "gt_missing_tensor": lambda: {"ground_truth": _hf_dir_without(tmp_path / "hf",
                                                                    "model.norm.weight")},
      "gt_ckpt_shape": lambda: {"ground_truth": _ckpt_of_another_shape(tmp_path / "ck")},
      "gt_not_ckpt": lambda: {"ground_truth": f"ckpt:{tmp_path / 'empty'}"},
      "mesh": lambda: {"mesh": "data=3"},
      "eval_batch": lambda: {"mesh": "data=8", "eval_batch_size": 4},
      "length": lambda: {"max_new_tokens": 600},
  }[case]())

  def refuse(*a, **k):
    raise AssertionError("a stage ran before the bad input was refused")
  for module, name in ((train, "train"), (sampling, "sample"), (loading, "load_model")):
    monkeypatch.setattr(module, name, refuse)
  with pytest.raises(UserError, match=re.escape(needle)):
    pipeline.run_study(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "pstar")


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
                                   units.read_record(os.path.join(workdir, "teacher"))["models"][0]["checkpoint"])
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
