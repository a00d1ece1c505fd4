"""The layout's rules, read from the source (README, "What is here"): layers point down only, and
kdjax's own imports sit at the top of each module where a reader sees the graph."""

import ast
import glob
import os

from tests.conftest import REPO

# Lower layers first; a module may import its own layer and the layers before it.
LAYERS = [
    ("shared", ("kdjax.cli", "kdjax.metrics", "kdjax.sample_metrics", "kdjax.mixture",
                "kdjax.linalg", "kdjax.objectives", "kdjax.sharding", "kdjax.compiled",
                "kdjax.hbm",
                "kdjax.checkpoint", "kdjax.distributed", "kdjax.events")),
    ("gmm", ("kdjax.gmm",)),
    ("model", ("kdjax.llm.model",)),
    ("weights", ("kdjax.llm.weights",)),
    ("data", ("kdjax.llm.data", "kdjax.llm.dataset_record")),
    ("train", ("kdjax.llm.train",)),
    ("study", ("kdjax.llm.study",)),
]
FACADES = {"kdjax", "kdjax.llm"}  # package __init__ files that re-export the public API


def _layer(module: str):
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  return None


def _modules():
  for path in sorted(glob.glob(os.path.join(REPO, "kdjax", "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
    yield name, ast.parse(open(path).read())


def _kdjax_imports(tree):
  """(module imported, at top level?) for every kdjax import of a module."""
  top = {id(n) for n in tree.body}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdjax"):
      names = [f"{node.module}.{a.name}" for a in node.names]
      yield [n if _layer(n) is not None else node.module for n in names], id(node) in top
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("kdjax"):
          yield [a.name], id(node) in top


def test_layers_point_down():
  wrong = []
  for name, tree in _modules():
    if name in FACADES:
      continue
    mine = _layer(name)
    assert mine is not None, f"{name} belongs to no layer: add it to LAYERS"
    for targets, _ in _kdjax_imports(tree):
      for t in targets:
        if _layer(t) is not None and _layer(t) > mine:
          wrong.append(f"{name} ({LAYERS[mine][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
  assert not wrong, "\n".join(wrong)


def test_kdjax_imports_sit_at_module_top():
  inner = [f"{name} imports {t[0]} inside a function" for name, tree in _modules()
           for t, top in _kdjax_imports(tree) if not top]
  assert not inner, "\n".join(inner)
