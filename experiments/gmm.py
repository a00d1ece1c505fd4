"""The GMM distillation study over a (seed x beta) grid, in one jitted, vmapped call.

  python -m experiments.gmm --flagfile=experiments/flags/gmm_paper.flags --workdir=DIR

Writes DIR/config.json, DIR/results.json {"rows", "timing", "summary", "entropy_slopes", ...},
DIR/results.csv and DIR/*.png (precision / recall vs beta and vs the teacher's entropy per knob,
precision vs recall, density panels). See kdjax/gmm/study.py.
"""

import time

from absl import flags, logging

from kdjax import cli
from kdjax.gmm import ground_truth, knobs, plots, report, study

_GT = flags.DEFINE_string("ground_truth", "grid8", "p*: grid8 (the paper's), random:K:D, or "
                          "json:PATH (weights, means, variances or covariances; see README)")
_GT_SEED = flags.DEFINE_integer("ground_truth_seed", 0, "seed of a random:K:D ground truth")
_N_TRAIN = flags.DEFINE_integer("n_train", 100, "p* samples the teacher and direct student see")
_TEACHER_K = flags.DEFINE_integer("teacher_components", 4, "teacher mixture components K'")
_STUDENT_K = flags.DEFINE_integer("student_components", 1, "student mixture components K''")
_COV = flags.DEFINE_string("covariance", "diag", "teacher and student covariance: diag or full")
_N_TEACHER = flags.DEFINE_integer("n_teacher_samples", 1000, "sharpened-teacher samples for seqkd")
_N_EVAL = flags.DEFINE_integer("n_eval", 10000, "Monte Carlo samples per precision / recall")
_BETA_MIN = flags.DEFINE_float("beta_min", 1.0, "smallest teacher sharpening beta (> 0)")
_BETA_MAX = flags.DEFINE_float("beta_max", 100.0, "largest beta (>= beta_min)")
_NUM_BETAS = flags.DEFINE_integer("num_betas", 32, "betas, geometric from beta_min to beta_max")
_KNOBS = flags.DEFINE_string("knobs", "beta", "how the teacher is made selective, swept in one "
                             "call: beta (sharpening), then any of top_p (smallest set of its "
                             "components holding mass p) and top_k (its k heaviest)")
_TOP_P = flags.DEFINE_string("top_p_values", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                             "comma list of p in (0, 1] for --knobs=...,top_p")
_TOP_K = flags.DEFINE_string("top_k_values", "1,2,3,4",
                             "comma list of k >= 1 for --knobs=...,top_k")
_NUM_SEEDS = flags.DEFINE_integer("num_seeds", 16, "seeds seed..seed+num_seeds-1")
_SEED = flags.DEFINE_integer("seed", 0, "first seed")
_OBJECTIVES = flags.DEFINE_string("objectives", "direct,seqkd,fkl,rkl,jsd",
                                  "comma list of direct, seqkd, fkl, rkl, jsd")
_EM_INIT = flags.DEFINE_string("em_init", "kmeans", "EM initialisation: kmeans, kmeans++ or data")
_EM_MAX_ITER = flags.DEFINE_integer("em_max_iter", 100, "EM iterations at most")
_EM_TOL = flags.DEFINE_float("em_tol", 1e-3, "EM stops when the mean log-likelihood moves less")
_REG_COVAR = flags.DEFINE_float("reg_covar", 1e-6, "added to covariance diagonals (like sklearn)")
_STEPS = flags.DEFINE_integer("steps", 300, "optimizer steps of the fkl / rkl / jsd students")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Monte Carlo samples per optimizer step")
_LR = flags.DEFINE_float("learning_rate", 0.1, "peak Adam learning rate of the gradient students "
                         "(whitened coordinates; warm-up then cosine decay)")
_TOL = flags.DEFINE_float("convergence_tol", 0.01, "a gradient student has converged when the "
                          "decrease its gradient at the end still promises (0.5 |E grad|^2 in "
                          "whitened coordinates) is at most this many nats")
_JSD_MIX = flags.DEFINE_float("jsd_mix", 0.5, "generalized JSD mixing pi in (0, 1); 0.5 = JSD")
_SEED_CHUNK = flags.DEFINE_integer("seed_chunk", 16, "seeds whose beta parts run at once "
                                  "(bounds memory: seed_chunk x num_betas configurations)")
_EXACT = flags.DEFINE_bool("exact", True, "add the exact forward-KL limit (one-Gaussian student)")
_KNN_SAMPLES = flags.DEFINE_integer("knn_samples", 0, "k-NN precision / recall (Kynkaanniemi et al. "
                                    "2019) of every student on this many of its evaluation samples "
                                    "and p*'s; 0 = off")
_KNN_K = flags.DEFINE_integer("knn_k", 3, "the k of the k-NN precision / recall")
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a workdir of another configuration")


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def _summary_text(label: str, e: dict) -> str:
  text = f"{label}: precision {_fmt(e['precision']['mean'])} recall {_fmt(e['recall']['mean'])}"
  if "knn_precision" in e:
    text += (f" knn precision {_fmt(e['knn_precision']['mean'])} knn recall "
             f"{_fmt(e['knn_recall']['mean'])}")
  return text + (f" ({e['left_out']} rows left out)" if e["left_out"] else "")


def _ci(e: dict) -> str:
  if e["lo"] is None:
    return _fmt(e["mean"])
  return f"{e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"


def _slope_text(e: dict) -> str:
  return f"{_ci(e['precision'])} / {_ci(e['recall'])}"


def _config() -> study.StudyConfig:
  objectives = tuple(o.strip() for o in _OBJECTIVES.value.split(",") if o.strip())
  return study.StudyConfig(
      n_train=_N_TRAIN.value, teacher_components=_TEACHER_K.value,
      student_components=_STUDENT_K.value, covariance=_COV.value,
      n_teacher_samples=_N_TEACHER.value, n_eval=_N_EVAL.value, objectives=objectives,
      em_init=_EM_INIT.value, em_max_iter=_EM_MAX_ITER.value, em_tol=_EM_TOL.value,
      reg_covar=_REG_COVAR.value, steps=_STEPS.value, batch_size=_BATCH.value,
      learning_rate=_LR.value, jsd_mix=_JSD_MIX.value, seed_chunk=_SEED_CHUNK.value,
      convergence_tol=_TOL.value,
      exact=_EXACT.value, knn_samples=_KNN_SAMPLES.value, knn_k=_KNN_K.value)


def main(argv):
  cli.require(len(argv) == 1, f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = _config()
  cli.require(_NUM_BETAS.value >= 1, f"--num_betas={_NUM_BETAS.value}: must be >= 1")
  cli.require(_NUM_SEEDS.value >= 1, f"--num_seeds={_NUM_SEEDS.value}: must be >= 1")
  cli.require(_BETA_MIN.value > 0, f"--beta_min={_BETA_MIN.value}: must be > 0")
  cli.require(_BETA_MAX.value >= _BETA_MIN.value,
              f"--beta_max={_BETA_MAX.value}: must be >= --beta_min={_BETA_MIN.value}")
  knob_names = tuple(k.strip() for k in _KNOBS.value.split(",") if k.strip())
  top_p_values = cli.parse_float_list("top_p_values", _TOP_P.value)
  top_k_values = cli.parse_float_list("top_k_values", _TOP_K.value)
  cli.require(all(k == int(k) for k in top_k_values),
              f"--top_k_values={_TOP_K.value}: expected whole numbers")
  betas = study.geometric_betas(_BETA_MIN.value, _BETA_MAX.value, _NUM_BETAS.value)
  labels, betas, truncation = knobs.grid(knob_names, betas, top_p_values, top_k_values,
                                         cfg.teacher_components)
  p_star = ground_truth.ground_truth(_GT.value, _GT_SEED.value)
  cli.require(_WORKDIR.value, "--workdir is required")
  config = dict(cfg.to_dict(), ground_truth=_GT.value, ground_truth_seed=_GT_SEED.value,
                beta_min=_BETA_MIN.value, beta_max=_BETA_MAX.value, num_betas=_NUM_BETAS.value,
                num_seeds=_NUM_SEEDS.value, seed=_SEED.value, knobs=",".join(knob_names),
                top_p_values=top_p_values if "top_p" in knob_names else None,
                top_k_values=[int(k) for k in top_k_values] if "top_k" in knob_names else None)
  cli.prepare_workdir(_WORKDIR.value, config, _OVERWRITE.value)

  seeds = list(range(_SEED.value, _SEED.value + _NUM_SEEDS.value))
  logging.info("GMM study: %d seeds x %d teacher settings (knobs %s), objectives %s", len(seeds),
               len(labels), ",".join(knob_names), ",".join(cfg.methods))
  out, timing = study.compile_and_run(cfg, p_star, seeds, betas, truncation)
  logging.info("compile %.2f s, sweep %.2f s for %d configurations (%.0f configs/s)",
               timing["compile_seconds"], timing["sweep_seconds"], timing["configs"],
               timing["configs"] / timing["sweep_seconds"])
  rows = report.rows_from_outputs(cfg.methods, out, seeds, betas, labels)
  result = report.write_results(_WORKDIR.value, rows, timing, config)
  t0 = time.perf_counter()
  plots.write_all(_WORKDIR.value, rows, p_star, out, cfg.methods, betas, x_train=out["x_train"][0])
  logging.info("plots %.1f s", time.perf_counter() - t0)
  for line in report.problems(rows):
    logging.warning("%s", line)
  for m, entry in result["summary"].items():
    logging.info("%-7s %s", m, "  ".join(_summary_text(label, e) for label, e in entry.items()))
  for m, per_knob in result["entropy_slopes"].items():
    logging.info("%-7s per nat of teacher entropy, precision / recall (95%% t-interval over seeds)"
                 ": %s", m, "  ".join(f"{k} {_slope_text(e)}" for k, e in per_knob.items()))
  for m, a in result.get("knn_agreement", {}).items():
    logging.info("%-7s over %d betas, rank correlation of precision with knn precision %s, of "
                 "recall with knn recall %s", m, a["betas"], _fmt(a["spearman_precision"]),
                 _fmt(a["spearman_recall"]))
  print(f"compile_seconds={timing['compile_seconds']:.2f} sweep_seconds="
        f"{timing['sweep_seconds']:.2f} configs={timing['configs']} -> {_WORKDIR.value}")
  dead = report.all_non_finite(rows)
  cli.require(dead is None, dead)


if __name__ == "__main__":
  cli.run(main)
