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

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Every multiprocess test is slow (before -m deselects); modules with slow tests first."""
  for item in items:
    if item.get_closest_marker("multiprocess") and not item.get_closest_marker("slow"):
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


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drop every compiled program after each module. XLA:CPU maps each executable's code into
  a few memory regions; the whole suite in one process compiles thousands of programs, and past
  the kernel's vm.max_map_count (65530) the next compile dies with a segfault (CI: after ~300
  tests, in whichever module came next)."""
  yield
  jax.clear_caches()
  gc.collect()
