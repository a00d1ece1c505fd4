"""Test-wide JAX settings: 8 fake CPU devices and strict rank promotion (set before jax imports)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
