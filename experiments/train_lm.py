"""Train a causal LM from token datasets: one model, N students together, or online distillation.

  python -m experiments.train_lm --model=preset:test-tiny --train_data=synthetic:256 \
      --val_data=synthetic:64 --steps=100 --workdir=DIR
  python -m experiments.train_lm --flagfile=experiments/flags/resume_smoke.flags --workdir=DIR

Writes DIR/checkpoints/<step>/ (resume points), DIR/best/ (or best/<i>: the best-validation model,
loadable as ckpt:DIR/best), DIR/tb/ (TensorBoard) and DIR/train_summary.json. Rerunning the same
command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json

from absl import flags, logging

from kdjax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder (resumed when it holds this configuration).")
flags.DEFINE_bool("overwrite", False, "Reuse a workdir that holds another configuration.")
flags.DEFINE_string("model", "preset:test-tiny", "Model to start from: preset:NAME[@SEED] (random "
                    "init from SEED, else from --seed), ckpt:DIR, hf:DIR or gguf:PATH.")
flags.DEFINE_string("train_data", None, "Dataset dir(s); a comma list trains one student per dir "
                    "together (vmapped). synthetic:N = N random sequences made from --seed.")
flags.DEFINE_string("val_data", "", "Validation dataset dir (or synthetic:N); best checkpoint by "
                    "its perplexity. A comma list, one per --train_data dir: each student is "
                    "validated and selected on its own.")
flags.DEFINE_string("teacher", "", "Distil online from this frozen model spec, any form --model "
                    "takes (a preset without @SEED: from --seed + 1; empty: plain next-token "
                    "training).")
flags.DEFINE_string("objective", "fkl", "Token-level KD objective: fkl, rkl, jsd, skl, tvd.")
flags.DEFINE_float("kd_temperature", 1.0, "Temperature of both models' softmax in the KD loss.")
flags.DEFINE_integer("batch_size", 16, "Global batch (sequences per optimizer step).")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence (truncate / pad).")
flags.DEFINE_integer("steps", 0, "Optimizer steps (or give --epochs).")
flags.DEFINE_integer("epochs", 0, "Epochs over the (smallest) training set.")
flags.DEFINE_float("lr", 5e-4, "AdamW peak learning rate.")
flags.DEFINE_float("warmup_frac", 0.01, "WSD: linear warm-up fraction of the steps.")
flags.DEFINE_float("decay_frac", 0.2, "WSD: final linear decay fraction of the steps.")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay (not on norm scales).")
flags.DEFINE_float("clip", 1.0, "Global-norm gradient clipping (0: off).")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (the loss equals the full batch's).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Compute dtype (parameters stay float32).")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. data=2,fsdp=2,tensor=1 (default: all devices "
                    "on data).")
flags.DEFINE_integer("eval_every", 0, "Validate every N steps (0: only at the end).")
flags.DEFINE_integer("eval_batch_size", 0, "Validation batch (0: --batch_size).")
flags.DEFINE_integer("eval_sequences", 0, "Validate on the first N sequences of the validation "
                     "set(s) only (0: all of them).")
flags.DEFINE_enum("remat", "none", ["none", "layer", "dots"],
                  "Rematerialisation in the backward pass: none; layer (keep each layer's input, "
                  "recompute the rest); dots (keep the matmul outputs).")
flags.DEFINE_enum("attention", "einsum", ["einsum", "dot_product", "cudnn"],
                  "Attention: einsum; dot_product (jax.nn.dot_product_attention, XLA); cudnn "
                  "(its cuDNN flash attention: NVIDIA GPU, --dtype=bfloat16 or float16).")
flags.DEFINE_integer("checkpoint_every", 0, "Checkpoint every N steps (0: only at the end).")
flags.DEFINE_integer("keep_checkpoints", 2, "Training checkpoints kept.")
flags.DEFINE_integer("seed", 0, "Initialisation, shuffling and synthetic-data seed.")
flags.DEFINE_integer("log_every", 10, "TensorBoard scalars every N steps.")
flags.DEFINE_bool("progress", True, "Show a progress bar (process 0).")
# A testing hook, defined under another module name so that --help does not list it.
flags.DEFINE_integer("debug_nan_at_step", 0, "Testing: poison the parameters before step N.",
                     module_name="kdjax.testing")
flags.mark_flag_as_required("workdir")
flags.mark_flag_as_required("train_data")


def main(argv):
  cli.require(len(argv) == 1, f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  from kdjax import distributed
  distributed.initialize()
  import jax
  from kdjax.llm.train import loop as train

  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  cfg = train.TrainConfig(
      model=FLAGS.model, train_data=tuple(s.strip() for s in FLAGS.train_data.split(",") if s.strip()),
      val_data=FLAGS.val_data, teacher=FLAGS.teacher, objective=FLAGS.objective,
      kd_temperature=FLAGS.kd_temperature, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
      steps=FLAGS.steps, epochs=FLAGS.epochs, lr=FLAGS.lr, warmup_frac=FLAGS.warmup_frac,
      decay_frac=FLAGS.decay_frac, weight_decay=FLAGS.weight_decay, clip=FLAGS.clip,
      grad_accum=FLAGS.grad_accum, dtype=FLAGS.dtype, mesh=FLAGS.mesh,
      eval_every=FLAGS.eval_every, eval_batch_size=FLAGS.eval_batch_size,
      eval_sequences=FLAGS.eval_sequences, attention=FLAGS.attention, remat=FLAGS.remat,
      checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
      seed=FLAGS.seed, log_every=FLAGS.log_every, progress=FLAGS.progress,
      debug_nan_at_step=FLAGS.debug_nan_at_step)
  summary = train.train(cfg, FLAGS.workdir, overwrite=FLAGS.overwrite)
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  cli.run(main)
