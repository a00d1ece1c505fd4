"""How the Llama's parameters are laid out on a mesh: its logical axes (kdjax.llm.model.llama)
through the shared table of rules (kdjax.sharding), with an optional leading student axis. The
model-specific half of partitioning lives here, so that kdjax.sharding knows no model."""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kdjax import sharding
from kdjax.llm.model import llama


def param_shardings(config, mesh: Mesh, num_students: Optional[int] = None):
  """NamedShardings of the model's parameters (with a leading student axis if num_students)."""
  logical = llama.logical_axes(config)
  abstract = llama.abstract_params(config)
  if num_students is not None:
    logical = jax.tree.map(lambda s: P("students", *s), logical,
                           is_leaf=lambda x: isinstance(x, P))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((num_students,) + a.shape, a.dtype), abstract)
  return sharding.tree_shardings(logical, abstract, mesh)
