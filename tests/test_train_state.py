"""kdjax.llm.train.state's parameter checksums: the definition (a numpy reference), the same value
however the parameters are sharded, per-student checksums, and sensitivity to one changed bit."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.llm.model import partition
from kdjax import sharding
from kdjax.llm.model import llama as model
from kdjax.llm.model.config import get_preset
from kdjax.llm.train.state import _fingerprint_fn, _student_checksums, params_checksum

CFG = get_preset("test-tiny")


def _fmix32(h):
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def reference_checksum(params) -> str:
  """The checksum's definition, in numpy on the host (uint32 arithmetic wraps modulo 2**32)."""
  seeds = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
  lanes = np.zeros(4, np.uint32)
  with np.errstate(over="ignore"):
    for j, leaf in enumerate(jax.tree.leaves(params)):
      bits = np.ascontiguousarray(np.asarray(leaf, np.float32)).reshape(-1).view(np.uint32)
      index = np.arange(bits.size, dtype=np.uint32)
      where = _fmix32(index + np.uint32(j * 0x9E3779B9 % 2**32))
      for lane, seed in enumerate(seeds):
        term = _fmix32(bits + _fmix32(where ^ np.uint32(seed)))
        lanes[lane] += np.sum(term, dtype=np.uint32)
  return "".join(f"{int(v):08x}" for v in lanes)


@pytest.fixture(scope="module")
def params():
  return jax.device_get(jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0)))


def test_checksum_is_its_definition(params):
  got = params_checksum(params)
  assert len(got) == 32 and got == reference_checksum(params)


def test_same_checksum_on_one_device_and_sharded_over_eight(params):
  one = params_checksum(jax.device_put(params, jax.devices()[0]))
  for axes in (dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2)):
    mesh = sharding.make_mesh(**axes)
    placed = jax.device_put(params, partition.param_shardings(CFG, mesh))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed))
    assert params_checksum(placed) == one, axes
    # computed where the shards live: partial sums reduced across devices, nothing gathered
    hlo = _fingerprint_fn(0, NamedSharding(mesh, P())).lower(placed).compile().as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo


def test_one_changed_bit_changes_it_and_students_match_their_own(params):
  flipped = jax.tree.map(np.array, params)
  scale = flipped["final_norm"]["scale"]
  scale.view(np.uint32)[5] ^= np.uint32(1)            # the lowest mantissa bit of one element
  assert params_checksum(flipped) != params_checksum(params)
  stacked = jax.tree.map(lambda a, b: np.stack([a, b]), params, flipped)
  mesh = sharding.make_mesh(data=1, fsdp=8)
  stacked = jax.device_put(stacked, partition.param_shardings(CFG, mesh, 2))
  assert _student_checksums(stacked, 2) == [params_checksum(params), params_checksum(flipped)]
