"""The device mesh and the ONE table of logical-axis rules.

Model code names only logical axes (kdjax/llm/model/llama.py: vocab, embed, heads, kv_heads, head_dim,
mlp, norm, layers); this table maps each onto the mesh axes ('data', 'fsdp', 'tensor'):

  * data   : pure data parallelism (parameters replicated, batch split).
  * fsdp   : the batch is split AND parameters are sharded along their `embed` dimension
             (ZeRO-3 / fully sharded data parallelism; XLA all-gathers them for each matmul).
  * tensor : Megatron-style tensor parallelism over heads, MLP width and vocabulary.

A parameter carrying a logical axis that no rule names is an error (a typo in model code must not
silently replicate a 1.7B-parameter matrix). A dimension that does not divide evenly by the size of
its mesh axes falls back to replication on that dimension: SmolLM2-135M has 9 heads and 3 kv heads,
so on tensor=2 its attention projections are replicated over 'tensor' while its MLP (1536 wide),
vocabulary (49152) and fsdp-sharded `embed` (576) dimensions are still split. Correct, just less
memory-efficient; pick tensor=3 for that model to shard its heads too.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax.cli import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). THE table.
LOGICAL_AXIS_RULES: dict[str, Optional[str | tuple[str, ...]]] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "students": None,     # leading axis of N students trained together (vmap)
    # activations (kdjax.sharding.constrain): the batch over data x fsdp, the hidden dimension
    # whole between layers, heads / MLP width over tensor inside them (the parameters' names)
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, dcn: int = 1) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all devices. data=-1 takes what the others leave.
  dcn > 1: a hybrid mesh whose data axis spans dcn slices (device_grid)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1:
    if fsdp < 1 or tensor < 1 or n % (fsdp * tensor):
      raise UserError(f"--mesh: fsdp={fsdp} x tensor={tensor} does not divide {n} devices")
    data = n // (fsdp * tensor)
  shape = (data, fsdp, tensor)
  if min(shape) < 1 or math.prod(shape) != n:
    raise UserError(f"--mesh: data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(shape)} "
                    f"devices, but {n} are available")
  if dcn < 1 or data % dcn:
    raise UserError(f"--mesh: dcn={dcn} must divide data={data}")
  return Mesh(device_grid(shape, devices, dcn), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def device_grid(shape: tuple[int, int, int], devices, dcn: int = 1) -> np.ndarray:
  """The devices laid out as a (data, fsdp, tensor) grid, with jax's mesh utilities.

  * dcn > 1: a hybrid mesh (mesh_utils.create_hybrid_device_mesh): the data axis spans dcn
    granules (TPU slices, or processes where devices carry no slice index: GPU hosts) and
    fsdp / tensor stay inside one granule, on its fast interconnect.
  * TPU: mesh_utils.create_device_mesh, which follows the physical topology (the axes that talk
    most on the torus's neighbours).
  * elsewhere: process-major order, so each process's devices, and a process's batch rows, are
    one contiguous block.
  """
  if dcn > 1:
    granule = "slice_index" if getattr(devices[0], "slice_index", None) is not None else None
    ici = (shape[0] // dcn, shape[1], shape[2])
    try:
      return mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices,
                                                  process_is_granule=granule is None)
    except ValueError as e:
      raise UserError(f"--mesh: dcn={dcn}: {e}") from None
  if getattr(devices[0], "platform", None) == "tpu":
    return mesh_utils.create_device_mesh(shape, devices)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.array(devices, dtype=object).reshape(shape)


def parse_mesh(text: str) -> tuple[int, int, int]:
  """'data=2,fsdp=2,tensor=1' -> (2, 2, 1); missing axes are 1 except data (-1: the rest).
  A `dcn=N` entry (hybrid meshes, parse_dcn) is accepted and not returned."""
  sizes = _parse_mesh_entries(text)
  return sizes["data"], sizes["fsdp"], sizes["tensor"]


def parse_dcn(text: str) -> int:
  """The `dcn=N` entry of a --mesh text (1 when absent): the data axis spans N slices or hosts."""
  return _parse_mesh_entries(text)["dcn"]


def mesh_from_text(text: str, devices=None) -> Mesh:
  """make_mesh from a --mesh text, e.g. 'data=-1,fsdp=8' or 'data=4,fsdp=8,dcn=4'."""
  return make_mesh(*parse_mesh(text), devices=devices, dcn=parse_dcn(text))


def _parse_mesh_entries(text: str) -> dict:
  sizes = {"data": -1, "fsdp": 1, "tensor": 1, "dcn": 1}
  for part in filter(None, (p.strip() for p in (text or "").split(","))):
    name, _, value = part.partition("=")
    if name not in sizes:
      raise UserError(f"--mesh={text!r}: unknown axis {name!r}; axes are data, fsdp, tensor "
                      "(and dcn: the slices / hosts the data axis spans)")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise UserError(f"--mesh={text!r}: {name} must be an integer") from None
    if sizes[name] < 1 and not (name == "data" and sizes[name] == -1):
      raise UserError(f"--mesh={text!r}: {name} must be >= 1" + (" (or -1: the devices the "
                      "other axes leave)" if name == "data" else ""))
  return sizes


def _mesh_axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_mesh(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    where: str = "") -> P:
  """One PartitionSpec from logical names, replicating dimensions the mesh does not divide."""
  if len(logical) != len(shape):
    raise ValueError(f"{where}: {len(logical)} logical axes for a rank-{len(shape)} array")
  out, used = [], set()
  for name, dim in zip(logical, shape):
    if name is None:
      out.append(None)
      continue
    if name not in LOGICAL_AXIS_RULES:
      raise ValueError(f"{where}: logical axis {name!r} has no rule in kdjax.sharding."
                       "LOGICAL_AXIS_RULES")
    axes = LOGICAL_AXIS_RULES[name]
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    flat = tuple(a for a in flat if a not in used)  # a mesh axis shards one dimension at most
    size = _mesh_axes_size(mesh, flat) if flat else 1
    if not flat or size == 1 or dim % size:
      out.append(None)  # replicate: no rule, trivial axis, or not divisible
      continue
    used.update(flat)
    out.append(flat[0] if len(flat) == 1 else flat)
  return P(*out)


def _is_spec(x):
  return isinstance(x, P)


def tree_shardings(logical_tree, abstract_tree, mesh: Mesh):
  """NamedShardings for a pytree, given its logical PartitionSpecs and its shapes."""
  def one(path, spec, abstract):
    return NamedSharding(mesh, logical_to_mesh(tuple(spec), abstract.shape, mesh,
                                               jax.tree_util.keystr(path)))
  return jax.tree_util.tree_map_with_path(one, logical_tree, abstract_tree, is_leaf=_is_spec)


def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
  """x with its sharding pinned to the logical axes' mesh axes, under the mesh of the current
  context (`use_mesh`); unchanged outside one. Activations carry these constraints so that XLA
  shards them over the batch and gathers each layer's fsdp-sharded weights (ZeRO-3), rather than
  carrying the weights' sharding into the activations."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_mesh(tuple(logical), x.shape, mesh, "activation")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def use_mesh(mesh: Mesh):
  """The context under which model code's `constrain` calls (and shard_map'ed losses) see the
  mesh: wrap the traced function's body (jit's tracing happens inside it)."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over (those of size > 1 among data, fsdp)."""
  axes = LOGICAL_AXIS_RULES["batch"]
  return tuple(a for a in axes if mesh.shape[a] > 1)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, students: bool = False) -> NamedSharding:
  """Sharding of a token batch [B, T] (or [N, B, T] with a student axis): batch over data x fsdp."""
  batch = logical_to_mesh(("batch",), (mesh.shape["data"] * mesh.shape["fsdp"],), mesh)[0]
  return NamedSharding(mesh, P(None, batch, None) if students else P(batch, None))
