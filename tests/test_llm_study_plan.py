"""The SmolLM2 study (kdjax/llm/study/) before and around its stages, in-process and without a
whole study: flag validation, the plan and the dry run, results tables and figures, a sampled
dataset resuming after a kill, and the input run_study refuses before any stage runs.
The tiny study end to end is tests/test_llm_pipeline.py; the entry point, tests/test_experiments_llm.py.
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
from kdjax.llm.model.config import get_preset
from kdjax.llm.study import cost, inputs, pipeline, plots, records, units, work
from kdjax.llm.study.config import validate
from kdjax.llm.study.cost import format_plan, make_plan
from tests.helpers import TINY_STUDY as TINY
from tests.helpers import dataset_rows as _dataset_rows


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
  assert records.read_record(full)["shards"] == 3
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


def test_datasets_without_prompt_lengths_are_refused(tmp_path):
  """A workdir sampled before rows recorded their prompt length would score two of the three
  prompt tokens: the study stops at once instead."""
  import datasets
  datasets.Dataset.from_dict({"input_ids": [[84, 104, 101, 5, 6]]}).save_to_disk(
      str(tmp_path / "pstar" / "train" / "shard-00000"))
  with pytest.raises(UserError, match="pstar/train was sampled before.*3-token prompt"):
    pipeline.run_study(TINY, str(tmp_path))


def test_clear_outputs_removes_only_pipeline_outputs(tmp_path):
  """--overwrite of another configuration starts clean, touching nothing else in the folder."""
  for d in ("pstar/train", "teacher/best", "seed_0/scores", "seed_3", "notes"):
    os.makedirs(tmp_path / d)
  for f in ("results.json", "results.csv", "timings.json", "config.json", "mine.txt",
            plots.FIGURES[0]):
    (tmp_path / f).write_text("x")
  pipeline.clear_outputs(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json", "mine.txt", "notes"]


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
