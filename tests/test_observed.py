"""kdjax/llm/study/observed.py: the tokens each sampling call draws, read from a workdir's finished
samples (each chunk's longest row, chunks cut inside each shard), and the plan priced with them."""

import dataclasses

import pytest

from kdjax.llm import data
from kdjax.llm.study import cost, hardware, observed
from kdjax.llm.study.layout import Layout
from kdjax.llm.study.records import DONE
from tests.helpers import TINY_STUDY


def test_known_steps_are_the_mean_longest_row_of_each_chunk(tmp_path):
  cfg = dataclasses.replace(TINY_STUDY, sample_batch_size=2, shard_size=3, max_new_tokens=8)
  d = tmp_path / Layout(cfg).pstar("train", cfg.seed)
  writer = data.ShardWriter(str(d))
  # a 1-token prompt; tokens drawn: shard 0 rows 3, 5, 2 -> chunks (3, 5), (2); shard 1 rows 2, 8,
  # 1 -> chunks (2, 8), (1): longest 5, 2, 8, 1 -> mean 4 (chunks cut across the shard boundary,
  # (3, 5), (2, 2), (8, 1), would give 5)
  for i, drawn in enumerate([(3, 5, 2), (2, 8, 1)]):
    writer.write([[7] * (1 + n) for n in drawn], index=i)
  assert observed.known_steps(cfg, str(tmp_path)) == {}  # not finished: not read
  (d / DONE).write_text("{}")
  assert observed.known_steps(cfg, str(tmp_path)) == {"ground_truth": 4}


def test_the_plan_prices_and_states_the_known_steps():
  cfg = dataclasses.replace(TINY_STUDY, max_new_tokens=8)
  plan = cost.dry_run_plan(cfg)
  full = hardware.estimate(cfg, plan, "h100", memory=False)
  short = hardware.estimate(cfg, plan, "h100", memory=False, steps={"ground_truth": 4})
  assert "all --max_new_tokens=8 (no row assumed to end early at EOS)" in hardware.format_estimate(full)
  text = hardware.format_estimate(short)
  assert "ground_truth 4 (its longest rows known)" in text
  assert "teacher 8 (--max_new_tokens: none known)" in text
  stage = "1_sample_ground_truth"
  assert short["hours"][stage][0] < full["hours"][stage][0]
  assert short["hours"]["3_sample_teacher"] == full["hours"]["3_sample_teacher"]
  # 4 of 8 tokens: the prefill, then 3 steps instead of 7; the fixed per-layer cost halves too
  rows, chip, prompt = cfg.sample_batch_size, hardware.CHIPS["h100"], plan["seq_len"] - 8
  c = hardware._configs(cfg, "")["ground_truth"]
  one = lambda n: hardware.decode_call_seconds(c, rows, prompt, 8, chip, chip.mfu, 0.6, n)[0]
  assert short["hours"][stage][0] / full["hours"][stage][0] == pytest.approx(one(4) / one(8))
