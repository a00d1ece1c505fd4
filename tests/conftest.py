"""Test-wide settings: 8 fake CPU devices and strict rank promotion (set before jax imports);
compiled programs freed after each test module; the tiers and how xdist deals the tests.

Tiers (README, "Tests"): `slow` marks end-to-end runs (a flagfile, an entry point in a subprocess,
a whole tiny study), `multiprocess` several real processes on localhost (always slow too);
`pytest -m "not slow"` is the fast tier to run while working. Shared helpers: tests/helpers.py.

With `-n N` (pytest-xdist) each worker takes whole modules: a module's shared fixtures (a tiny
study, a smoke run) are built once, not once per worker, and its tests share their compiles.
Modules holding slow tests go first, so the long ones do not start last.
`--cpu-durations=N` lists the N tests of most CPU seconds (the test process and the children it
waited for): on a shared machine wall-clock durations measure the load as much as the tests.
"""

import gc
import os
import resource
import tempfile

# XLA:CPU's LLVM backend at -O0 and its older (non-MLIR) fusion emitters (XLA_TEST_FLAGS, also
# given to every subprocess by tests/helpers): the tests' programs are tiny and each is compiled
# more often than it runs, so compiling is most of the suite's time. -O0 halves it (7 train-step
# tests: 125 -> 67 CPU seconds); the older emitters cut a test-tiny train step's compile again from
# 1.9 to 0.4 CPU seconds (three sampling / decoding / GMM tests: 25.8 -> 17.4), as the GMM study's
# own compiler_options do for users. Both leave the HLO passes (fusion, SPMD partitioning) and the
# programs' semantics as they are. Users' runs keep -O2 and the default emitters.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {XLA_TEST_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# numpy / scipy / scikit-learn / torch on one thread each: two xdist workers already fill the two
# cores, and OpenBLAS's spinning threads made a tiny scikit-learn reference 25x dearer (34 -> 1.4 s).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
# One persistent compilation cache for the run, shared by the xdist workers (they inherit this
# process's environment) and every subprocess a test starts: tests rebuild the same tiny programs
# under new jit wrappers, and a program compiled once is then read back (test_llm_train_family,
# test_llm_train and test_study_multihost: 538 s -> 376 s on 2 workers). A fresh directory per
# run, so a run costs what CI's cold run costs; set JAX_COMPILATION_CACHE_DIR to keep one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="kdjax-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CPU_SECONDS = {}  # test id -> CPU seconds of its setup, call and teardown


def pytest_addoption(parser):
  parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                   help="show the N tests of most CPU seconds (0: all) and the total")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: an end-to-end run (a flagfile, a CLI in a subprocess)")
  config.addinivalue_line("markers", "multiprocess: several real processes on localhost (also slow)")
  named = any(a == "--dist" or a.startswith(("--dist=", "-d")) for a in config.invocation_params.args)
  if getattr(config.option, "dist", "no") == "load" and not named:  # -n N without --dist
    config.option.dist = "loadscope"
    config.option.loadscopereorder = False  # the order below


# Unit tests of over ~4 CPU seconds each (`--cpu-durations`, 2026-12-05): they run in the whole
# suite, not the fast tier; every module keeps cheaper tests of the same code there (e.g. one
# parametrization of two). Per module: test-name prefixes ("" = the whole module).
HEAVY = {
    "test_attention.py": (
        "test_training_loss_and_gradients_match",
    ),
    "test_checkpoint.py": (
        "test_state_roundtrip_keep_n_and_shardings",
    ),
    "test_compiled.py": (
        "test_bfloat16_study_samples_and_scores_with_bfloat16_weights_and_cache",
        "test_footprint_train_step_students_and_remat",
        "test_fsdp_shards_activations_over_the_batch_and_reduces_the_head_once",
        "test_remat_reaches_train_lm_and_the_study_and_keeps_the_gradients",
    ),
    "test_compiled_cost.py": (
        "test_train_step_compiled_by_the_tpu_compiler_for_a_v5p_slice",
    ),
    "test_decode_blocks.py": (
        "test_decoding_in_blocks_equals_the_full_forward[4]",
        "test_decoding_in_blocks_equals_the_full_forward[3]",
        "test_samples_do_not_depend_on_the_block_size",
        "test_step_i_draws_from_fold_in_key_i_by_inverse_cdf",
    ),
    "test_embedding_map.py": (
        "test_one_pass_gives_the_scores_and_the_mean_hidden_state[preset:test-tiny@3]",
        "test_same_seed_same_map[umap]",
    ),
    "test_gkd_lambda.py": (
        "test_mixed_batches_take_the_right_rows_from_each_source",
        "test_train_with_a_mixed_batch_runs_and_records_the_data_position",
    ),
    "test_gmm_knn.py": (
        "test_rows_and_csv_carry_knn",
        "test_grid_knn_is_the_metric_on_the_grids_samples",
        "test_knn_orders_the_students_like_the_likelihoods",
    ),
    "test_gmm_knobs.py": (
        "test_beta_configurations_of_the_knob_sweep_equal_the_beta_only_sweep",
        "test_grid_lays_out_every_knob_at_the_others_identity",
        "test_knob_sweep_equals_one_by_one_runs",
    ),
    "test_gmm_study.py": (
        "test_agrees_with_sklearn_within_monte_carlo_error[precision-direct]",
        "test_full_covariance_two_component_students_agree_with_sklearn",
        "test_one_gaussian_fkl_is_checked_against_its_known_optimum",
    ),
    "test_gmm_train.py": (
        "test_a_student_stopped_early_is_not_converged",
        "test_fkl_one_gaussian_student_is_the_moment_match_at_every_beta[grid8-diag]",
        "test_fkl_one_gaussian_student_is_the_moment_match_at_every_beta[random",
        "test_mode_seeking_gradient_estimator_is_unbiased[jsd]",
        "test_mode_seeking_gradient_estimator_is_unbiased[rkl]",
        "test_mode_seeking_students_converge_on_one_gaussian_teachers_in_16d[jsd]",
        "test_mode_seeking_students_converge_on_one_gaussian_teachers_in_16d[rkl]",
        "test_mode_seeking_students_of_a_two_component_teacher_in_8d",
        "test_mode_seeking_students_recover_a_one_gaussian_teacher[jsd]",
    ),
    "test_hardware.py": (
        "test_compiled_memory_follows_the_mesh",
    ),
    "test_head_kd.py": (
        "test_head_kd_matches_the_unfused_heads_and_loss[vd-rkl]",
        "test_head_kd_matches_the_unfused_heads_and_loss[vd-fkl]",
    ),
    "test_llm_bad_input.py": (
        "test_preset_seed_and_tokenizer_vocab_check",
        "test_truncated_gguf[-1]",
        "test_truncated_gguf[2000000]",
    ),
    "test_llm_convert.py": (
        "test_round_trip[4-False]",
    ),
    "test_llm_model.py": (
        "test_left_padding_matches_unpadded",
        "test_token_by_token_decoding_equals_full_forward[test-tiny-untied]",
    ),
    "test_llm_real_checkpoint.py": ("",),  # SmolLM2-135M and transformers loaded: 80 s
    "test_llm_sampling.py": (
        "test_batch_sharded_over_data_agrees_with_unsharded_up_to_rounding",
        "test_decode_loop_follows_the_model",
        "test_fast_decode_path_matches_model_forward[test-tiny-untied]",
        "test_first_token_frequencies_match_softmax_over_temperature",
        "test_top_k_and_top_p_never_emit_excluded_tokens",
        "test_top_p_keeps_the_boundary_token_at_its_renormalised_frequency",
    ),
    "test_llm_train.py": (
        "test_evaluate_is_per_token_mean",
        "test_every_score_counts_the_generated_tokens_only[False]",
        "test_every_score_counts_the_generated_tokens_only[True]",
        "test_fused_head_nll_matches_autodiff_of_the_unfused_loss[shape0-vd]",
        "test_grad_accumulation_equals_full_batch[False]",
        "test_grad_accumulation_equals_full_batch[True]",
        "test_kd_step_runs_and_self_distillation_is_zero",
        "test_train_summary_checksum_and_determinism",
        "test_vmapped_students_equal_one_by_one[lr_scales0]",
        "test_vmapped_students_equal_one_by_one[lr_scales1]",
    ),
    "test_llm_train_family.py": (
        "test_each_objective_trains[jsd]",
        "test_onpolicy_batches_are_each_students_own_samples",
        "test_onpolicy_steps_train_on_fresh_samples",
        "test_target_is_the_tempered_teacher_and_the_student_is_untempered[fkl]",
        "test_train_runs_and_exports_each_student[False]",
        "test_train_runs_and_exports_each_student[True]",
        "test_vmapped_temperatures_equal_one_by_one_runs",
    ),
    "test_mixture_paths.py": (
        "test_unrolled_and_vectorized_log_prob_agree_with_gradients[2-8]",
    ),
    "test_objectives_density.py": (
        "test_forward_kl_covers_reverse_kl_seeks_a_mode",
    ),
    "test_sharding.py": (
        "test_2x2x2_mesh_trains_like_one_device",
    ),
    "test_train_eval.py": (
        "test_first_n_sequences_only_and_each_student_on_its_own_set",
        "test_train_selects_each_student_on_the_first_n_of_its_own_set",
    ),
    "test_train_state.py": (
        "test_same_checksum_on_one_device_and_sharded_over_eight",
    ),
}
_HEAVY_PREFIXES = tuple(f"tests/{module}::{name}".rstrip(":") for module, names in HEAVY.items()
                        for name in names)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Every multiprocess and HEAVY test is slow (before -m deselects); modules with slow tests
  first."""
  for item in items:
    heavy = item.nodeid.startswith(_HEAVY_PREFIXES)
    if (heavy or item.get_closest_marker("multiprocess")) and not item.get_closest_marker("slow"):
      item.add_marker(pytest.mark.slow)
  slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)  # stable


def _cpu_seconds():
  return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                               resource.getrusage(resource.RUSAGE_CHILDREN)))


def _timed(when):
  @pytest.hookimpl(wrapper=True)
  def hook(item):
    t0 = _cpu_seconds()
    try:
      return (yield)
    finally:
      item.user_properties.append((f"cpu_{when}", _cpu_seconds() - t0))
  return hook


pytest_runtest_setup = _timed("setup")
pytest_runtest_call = _timed("call")
pytest_runtest_teardown = _timed("teardown")


def pytest_runtest_logreport(report):
  """Sums each test's CPU seconds (reports come from the xdist workers too)."""
  seconds = dict(report.user_properties).get(f"cpu_{report.when}")
  if seconds is not None:
    _CPU_SECONDS[report.nodeid] = _CPU_SECONDS.get(report.nodeid, 0.0) + seconds


def pytest_terminal_summary(terminalreporter, config):
  n = config.getoption("cpu_durations")
  if n is None or not _CPU_SECONDS:
    return
  total = sum(_CPU_SECONDS.values())
  terminalreporter.write_sep("=", f"CPU seconds: {total:.1f} in {len(_CPU_SECONDS)} tests")
  ranked = sorted(_CPU_SECONDS.items(), key=lambda kv: -kv[1])
  for nodeid, seconds in ranked[:n or None]:
    terminalreporter.write_line(f"{seconds:8.1f}s  {nodeid}")


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


# Half the kernel's default vm.max_map_count (65530): room for the next module's compiles (the
# whole suite on 2 workers, 2026-12-06: at most 7047 maps added by one module, 34320 reached, the
# caches dropped 2 times instead of 61).
MAX_MAPS = 32768


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drop every compiled program after a module that leaves the process with many memory maps.
  XLA:CPU maps each executable's code into a few memory regions; the whole suite in one process
  compiles thousands of programs, and past the kernel's vm.max_map_count (65530) the next compile
  dies with a segfault (CI: after ~300 tests, in whichever module came next). Below MAX_MAPS the
  programs stay: later modules that trace and compile the same functions (the tiny study, the
  tiny model's steps) reuse them."""
  yield
  if _memory_maps() > MAX_MAPS:
    jax.clear_caches()
    gc.collect()
