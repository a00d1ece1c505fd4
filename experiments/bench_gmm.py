"""The GMM study's speed: kdjax's one jitted, vmapped sweep against the authors' way (scikit-learn
GaussianMixture, one configuration at a time), side by side in one process.

  python -m experiments.bench_gmm                      # 64 betas x 64 seeds, paper protocol

Both sides run the same protocol (experiments/flags/gmm_paper.flags: grid8, 100 training points,
4-component diagonal teacher by EM, sharpen, 1000 teacher samples, 1-component diagonal student,
precision / recall with n_eval samples) for the objectives the baseline has: direct and seqkd
(the exact moment-matching rows are off: --exact=false). The baseline fits each seed's teacher and
direct student once and then loops over betas (the natural loop; it is never charged twice).
Prints ONE JSON line: configs, kdjax compile_seconds / sweep_seconds / configs_per_s, the
baseline's configs_per_s measured on baseline_configs_measured configurations (whole seeds, every
beta) and extrapolated to the grid when fewer than all (`baseline_extrapolated`), the ratio, and
the whole-process comparison: `python -m experiments.gmm` on the grid in a subprocess (imports,
compilation, sweep, results and figures) against the baseline's time for the same grid.

  python -m experiments.bench_gmm --compile_table [--covariance=full]

Compile seconds instead (no baseline): for every K'' in --table_components and D in --table_dims,
the study of experiments/flags/gmm_smoke.flags (its sizes; all five objectives) on a random:6:D
ground truth with a max(3, K'')-component teacher, compiled and run once by study.compile_and_run.
Prints ONE JSON line: a table of compile_seconds per (K'', D), and rows with sweep_seconds and
cpu_seconds (process CPU time of compile + sweep: less sensitive to other load than wall time),
measured after a warm-up compile reported apart (a process's first compile pays one-time costs).
The --num_betas / --num_seeds / --n_eval flags do not apply: the smoke flagfile's sizes do.
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags, logging

from kdjax import cli

_NUM_BETAS = flags.DEFINE_integer("num_betas", 64, "betas in the grid (1..100, geometric)")
_NUM_SEEDS = flags.DEFINE_integer("num_seeds", 64, "seeds in the grid")
_BASELINE_SEEDS = flags.DEFINE_integer("baseline_seeds", 8, "seeds (x all betas) the baseline "
                                       "runs; fewer than num_seeds -> extrapolated, and said so")
_N_EVAL = flags.DEFINE_integer("n_eval", 10000, "Monte Carlo samples per metric")
_WHOLE = flags.DEFINE_bool("whole_process", True, "also time python -m experiments.gmm")
_TABLE = flags.DEFINE_bool("compile_table", False, "measure compile seconds per (K'', D) on the "
                           "smoke flagfile's sizes instead of the speed comparison")
_TABLE_K = flags.DEFINE_string("table_components", "1,2,4,8", "K'' values of --compile_table")
_TABLE_D = flags.DEFINE_string("table_dims", "2,8,16,32", "D values of --compile_table")
_COV = flags.DEFINE_string("covariance", "diag", "--compile_table: diag or full")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_FLAGS = os.path.join(REPO, "experiments", "flags", "gmm_paper.flags")
SMOKE_FLAGS = os.path.join(REPO, "experiments", "flags", "gmm_smoke.flags")


def baseline(seeds, betas, n_eval):
  """The authors' way: numpy + scikit-learn, one configuration after another. Returns seconds."""
  import numpy as np
  from scipy.special import logsumexp
  from sklearn.mixture import GaussianMixture
  grid = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)], float)

  def sample_gm(rng, w, means, var, n):
    comp = rng.choice(len(w), size=n, p=w)
    return means[comp] + np.sqrt(var[comp]) * rng.standard_normal((n, means.shape[1]))

  def log_p_star(x):
    d2 = ((x[:, None, :] - grid[None]) ** 2).sum(-1)
    return logsumexp(-d2 / 0.05 - np.log(2 * np.pi * 0.025) - np.log(8), axis=-1)

  def score(rng, student, x_star):
    xs = sample_gm(rng, student.weights_, student.means_, student.covariances_, n_eval)
    return log_p_star(xs).mean(), student.score(x_star)

  start = time.perf_counter()
  for seed in seeds:
    rng = np.random.default_rng(seed)
    x = sample_gm(rng, np.full(8, 1 / 8), grid, np.full((8, 2), 0.025), 100)
    teacher = GaussianMixture(4, covariance_type="diag", random_state=seed).fit(x)
    x_star = sample_gm(rng, np.full(8, 1 / 8), grid, np.full((8, 2), 0.025), n_eval)
    score(rng, GaussianMixture(1, covariance_type="diag").fit(x), x_star)
    for beta in betas:
      w = teacher.weights_ ** beta
      xt = sample_gm(rng, w / w.sum(), teacher.means_, teacher.covariances_, 1000)
      score(rng, GaussianMixture(1, covariance_type="diag").fit(xt), x_star)
  return time.perf_counter() - start


def _flagfile(path) -> dict:
  """--name=value lines of a flagfile (comments and blank lines skipped) as {name: value}."""
  with open(path) as f:
    lines = [ln.strip() for ln in f if ln.strip().startswith("--")]
  return dict(ln[2:].split("=", 1) for ln in lines)


def _int_list(name: str, text: str) -> list[int]:
  values = cli.parse_float_list(name, text)
  cli.require(all(v == int(v) for v in values), f"--{name}={text!r}: expected whole numbers")
  return [int(v) for v in values]


def _smoke_config(k: int, covariance: str):
  """The study config of the smoke flagfile with K'' = k students, a max(3, k)-component teacher,
  all five objectives and the given covariance; and its (seeds, betas)."""
  from kdjax.gmm import study
  values = _flagfile(SMOKE_FLAGS)
  fields = {f.name: f.default for f in dataclasses.fields(study.StudyConfig)}
  convert = lambda default, v: v.lower() in ("true", "1") if isinstance(default, bool) else (
      type(default)(v))
  kwargs = {name: convert(fields[name], v) for name, v in values.items()
            if name in fields and name != "objectives"}
  kwargs.update(student_components=k, teacher_components=max(3, k), covariance=covariance,
                objectives=study.OBJECTIVES)
  betas = study.geometric_betas(float(values["beta_min"]), float(values["beta_max"]),
                                int(values["num_betas"]))
  return study.StudyConfig(**kwargs), list(range(int(values["num_seeds"]))), betas


def compile_table() -> dict:
  """Compile (and run) the smoke study for every (K'', D); returns the JSON line's dict."""
  from kdjax.gmm import ground_truth, study
  ks = _int_list("table_components", _TABLE_K.value)
  ds = _int_list("table_dims", _TABLE_D.value)
  cli.require(ks and min(ks) >= 1, f"--table_components={_TABLE_K.value}: give K'' >= 1")
  cli.require(ds and min(ds) >= 1, f"--table_dims={_TABLE_D.value}: give D >= 1")
  cli.require(_COV.value in ("diag", "full"), f"--covariance={_COV.value!r}: diag or full")
  load_before = os.getloadavg()
  start = time.perf_counter()
  cfg, seeds, betas = _smoke_config(1, _COV.value)  # warm-up: one-time costs of the first compile
  warmup = study.compile_and_run(dataclasses.replace(cfg, objectives=("direct",)),
                                 ground_truth.ground_truth("random:6:2"), seeds, betas)[1]
  rows = []
  for k in ks:
    for d in ds:
      cfg, seeds, betas = _smoke_config(k, _COV.value)
      p_star = ground_truth.ground_truth(f"random:6:{d}")
      cpu = time.process_time()
      _, timing = study.compile_and_run(cfg, p_star, seeds, betas)
      rows.append({"student_components": k, "dim": d,
                   "compile_seconds": round(timing["compile_seconds"], 2),
                   "sweep_seconds": round(timing["sweep_seconds"], 3),
                   "cpu_seconds": round(time.process_time() - cpu, 2)})
      logging.info("compile table: %s", rows[-1])
  table = {f"K''={k}": {f"D={r['dim']}": r["compile_seconds"] for r in rows
                        if r["student_components"] == k} for k in ks}
  return {"mode": "compile_table", "flagfile": os.path.relpath(SMOKE_FLAGS, REPO),
          "covariance": _COV.value, "objectives": ",".join(study.OBJECTIVES),
          "ground_truth": "random:6:D", "teacher_components": "max(3, K'')",
          "configs": len(seeds) * len(betas), "compile_seconds": table, "rows": rows,
          "warmup_compile_seconds": round(warmup["compile_seconds"], 2),
          "total_seconds": round(time.perf_counter() - start, 1),
          "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}


def main(argv):
  cli.require(len(argv) == 1, f"unexpected arguments: {' '.join(argv[1:])}")
  if _TABLE.value:
    print(json.dumps(compile_table()), flush=True)
    return
  for name, flag in (("num_betas", _NUM_BETAS), ("num_seeds", _NUM_SEEDS),
                     ("baseline_seeds", _BASELINE_SEEDS), ("n_eval", _N_EVAL)):
    cli.require(flag.value >= 1, f"--{name}={flag.value}: must be >= 1")
  import numpy as np
  from kdjax import mixture as mx
  from kdjax.gmm import study
  seeds = list(range(_NUM_SEEDS.value))
  betas = np.asarray(study.geometric_betas(1.0, 100.0, _NUM_BETAS.value))
  cfg = study.StudyConfig(objectives=("direct", "seqkd"), n_eval=_N_EVAL.value, exact=False)
  _, timing = study.compile_and_run(cfg, mx.grid8(), seeds, betas)
  configs = timing["configs"]
  kdjax_rate = configs / timing["sweep_seconds"]

  base_seeds = seeds[:min(_BASELINE_SEEDS.value, len(seeds))]
  base_measured = len(base_seeds) * len(betas)
  base_seconds = baseline(base_seeds, betas, _N_EVAL.value)
  base_rate = base_measured / base_seconds
  base_grid_seconds = configs / base_rate

  result = {
      "configs": configs, "grid": f"{len(betas)} betas x {len(seeds)} seeds",
      "objectives": "direct,seqkd", "n_eval": _N_EVAL.value,
      "kdjax_compile_seconds": round(timing["compile_seconds"], 3),
      "kdjax_sweep_seconds": round(timing["sweep_seconds"], 3),
      "kdjax_configs_per_s": round(kdjax_rate, 1),
      "baseline": "scikit-learn GaussianMixture, one configuration at a time",
      "baseline_configs_measured": base_measured,
      "baseline_extrapolated": base_measured < configs,
      "baseline_measured_seconds": round(base_seconds, 3),
      "baseline_configs_per_s": round(base_rate, 1),
      "sweep_speedup": round(kdjax_rate / base_rate, 1),
  }
  if _WHOLE.value:
    with tempfile.TemporaryDirectory() as workdir:
      cmd = [sys.executable, "-m", "experiments.gmm", f"--flagfile={PAPER_FLAGS}",
             f"--num_betas={len(betas)}", f"--num_seeds={len(seeds)}", "--objectives=direct,seqkd",
             "--exact=false",
             f"--n_eval={_N_EVAL.value}", f"--workdir={workdir}"]
      start = time.perf_counter()
      proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
      whole = time.perf_counter() - start
      cli.require(proc.returncode == 0, f"experiments.gmm failed: {proc.stderr.strip()[-300:]}")
    result.update({
        "kdjax_whole_process_seconds": round(whole, 2),
        "baseline_grid_seconds": round(base_grid_seconds, 2),
        "baseline_grid_seconds_note": "extrapolated from the measured rate, imports excluded"
                                      if base_measured < configs else "measured, imports excluded",
        "whole_process_speedup": round(base_grid_seconds / whole, 2)})
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  cli.run(main)
