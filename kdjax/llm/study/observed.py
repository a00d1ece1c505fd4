"""What a workdir's finished samples tell the plan: how many tokens each model's sampler draws.

The sampler's loop stops when every row of its chunk has ended (kdjax.llm.model.sampling), so a
sampling call draws as many tokens as its chunk's longest row, not --max_new_tokens, once rows end
at EOS. `--dry_run --hardware=NAME --workdir=W` prices decoding (kdjax/llm/study/hardware.py) with
these counts where a sampling stage has finished in W, and with --max_new_tokens elsewhere; the
printed assumptions say which.

Per model, one finished dataset stands for all of its sampling: p*'s train split, the first seed's
teacher samples at the first temperature (train split), the first student's samples that exist
(with --score_rates=chosen not every rate's student is sampled). Its rows lie
in shards of --shard_size, each cut in chunks of --sample_batch_size rows (the unit one chip draws
at once: kdjax.llm.model.sample_rows); a chunk's steps are its longest row's drawn tokens (the EOS
included), and the model's figure is their mean over the chunks, rounded up. A call on several
chips lasts as long as its longest chunk, so the mean prices such calls slightly short.
"""

from __future__ import annotations

import math
import os

import numpy as np

from kdjax.llm import data
from kdjax.llm.study.layout import Layout
from kdjax.llm.study.records import DONE


def chunk_steps(drawn: np.ndarray, shard_size: int, rows: int) -> np.ndarray:
  """Each chunk's longest row: `drawn` (tokens drawn per row, in dataset order) cut in shards of
  shard_size rows, each shard in chunks of `rows`."""
  out = []
  for start in range(0, len(drawn), shard_size):
    shard = drawn[start:start + shard_size]
    out += [shard[c:c + rows].max() for c in range(0, len(shard), rows)]
  return np.asarray(out)


def dataset_steps(directory: str, shard_size: int, rows: int) -> int:
  """The mean over a finished dataset's chunks of their longest row's drawn tokens, rounded up."""
  table = data.load_dataset_dir(directory).data
  drawn = (table.column("length").to_numpy() - table.column("prompt_len").to_numpy())
  return int(math.ceil(chunk_steps(drawn, shard_size, rows).mean()))


def known_steps(cfg, workdir: str) -> dict:
  """{model name: tokens a sampling call draws} for the models whose dataset above is finished in
  `workdir` (the others left out: priced at --max_new_tokens)."""
  layout = Layout(cfg)
  students = [Layout.student_samples(cfg.seed, n) for n in cfg.student_names()]
  sampled = [rel for rel in students if os.path.exists(os.path.join(workdir, rel, DONE))]
  where = {"ground_truth": layout.pstar("train", layout.pstar_seed(cfg.seed)),
           "teacher": Layout.teacher_samples(cfg.seed, cfg.temperatures[0], "train"),
           "student": (sampled or students)[0]}  # --score_rates=chosen: the first one sampled
  out = {}
  for name, rel in where.items():
    path = os.path.join(workdir, rel)
    if os.path.exists(os.path.join(path, DONE)):
      out[name] = dataset_steps(path, cfg.shard_size, cfg.sample_batch_size)
  return out
