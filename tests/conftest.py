"""Test-wide JAX settings: 8 fake CPU devices and strict rank promotion (set before jax imports)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU's multi-threaded Eigen pool can wedge on the GMM study's vmapped grids (every thread
# idle, the result never ready); single-threaded Eigen avoids it (kdjax.gmm.study.compiler_options)
if "xla_cpu_multi_thread_eigen" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
