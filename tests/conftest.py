"""Test-wide JAX settings: 8 fake CPU devices and strict rank promotion (set before jax imports);
compiled programs freed after each test module."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  """Tiers (README, "Tests"): `pytest -m "not slow"` is the fast tier to run while working."""
  config.addinivalue_line("markers", "slow: an end-to-end run (a flagfile, a CLI in a subprocess)")
  config.addinivalue_line("markers", "multiprocess: several real processes on localhost (also slow)")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drop every compiled program after each module. XLA:CPU maps each executable's code into
  a few memory regions; the whole suite in one process compiles thousands of programs, and past
  the kernel's vm.max_map_count (65530) the next compile dies with a segfault (CI: after ~300
  tests, in whichever module came next)."""
  yield
  jax.clear_caches()
  gc.collect()

