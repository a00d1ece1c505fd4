"""--ground_truth=json:PATH: the README's example loads as the mixture it describes; every kind of
bad file is refused with one line naming what is wrong."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import mixture as mx
from kdjax.cli import UserError
from kdjax.gmm import ground_truth as gt
from tests.conftest import REPO

EXAMPLE = os.path.join(REPO, "experiments", "gmm_ground_truth_example.json")


def test_example_file_loads_as_written():
  doc = json.load(open(EXAMPLE))
  m = gt.ground_truth(f"json:{EXAMPLE}")
  np.testing.assert_allclose(np.asarray(mx.weights(m)), doc["weights"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m.means), doc["means"], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(mx.covariances(m)), doc["covariances"], atol=1e-6)


def test_diagonal_file(tmp_path):
  doc = {"weights": [0.25, 0.75], "means": [[0, 1], [2, 3]], "variances": [[0.1, 0.2], [0.3, 0.4]]}
  path = tmp_path / "g.json"
  path.write_text(json.dumps(doc))
  m = gt.ground_truth(f"json:{path}")
  assert mx.is_diag(m)
  np.testing.assert_allclose(np.asarray(mx.variances(m)), doc["variances"], rtol=1e-6)
  x = jnp.zeros((1, 2))
  ref = np.log(0.25 * np.exp(-0.5 * (0 / 0.1 + 1 / 0.2)) / (2 * np.pi * np.sqrt(0.02))
               + 0.75 * np.exp(-0.5 * (4 / 0.3 + 9 / 0.4)) / (2 * np.pi * np.sqrt(0.12)))
  np.testing.assert_allclose(float(mx.log_prob(m, x)[0]), ref, rtol=1e-5)


GOOD = {"weights": [0.5, 0.5], "means": [[0.0, 0.0], [1.0, 1.0]],
        "covariances": [[[1.0, 0.2], [0.2, 1.0]], [[0.5, 0.0], [0.0, 0.5]]]}


@pytest.mark.parametrize("change,message", [
    ({"weights": [0.5, 0.6]}, "sum to"),
    ({"weights": [1.0]}, "entries for 2 means"),
    ({"weights": [1.5, -0.5]}, "must be > 0"),
    ({"means": [[0.0], [1.0]]}, "expected (2, 1, 1)"),
    ({"covariances": [[[1.0, 2.0], [2.0, 1.0]], [[0.5, 0.0], [0.0, 0.5]]]}, "positive definite"),
    ({"covariances": [[[1.0, 0.2], [0.0, 1.0]], [[0.5, 0.0], [0.0, 0.5]]]}, "not symmetric"),
    ({"covariances": [[1.0, 0.2], [0.2, 1.0]]}, "3-D array"),
    ({"means": [[0.0, "a"], [1.0, 1.0]]}, "array of numbers"),
    ({"means": [[0.0, float("nan")], [1.0, 1.0]]}, "non-finite"),
    ({"variances": [[1.0, 1.0], [1.0, 1.0]]}, "exactly one of"),
    ({"extra": 1}, "unknown key"),
])
def test_bad_files_are_refused_with_what_is_wrong(tmp_path, change, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(dict(GOOD, **change)))
  with pytest.raises(UserError) as e:
    gt.ground_truth(f"json:{path}")
  assert message in str(e.value) and str(path) in str(e.value), str(e.value)


def test_missing_key_unreadable_and_malformed_files(tmp_path):
  path = tmp_path / "m.json"
  path.write_text(json.dumps({"weights": [1.0], "variances": [[1.0]]}))
  with pytest.raises(UserError, match="missing 'means'"):
    gt.ground_truth(f"json:{path}")
  path.write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    gt.ground_truth(f"json:{path}")
  with pytest.raises(UserError, match="cannot read"):
    gt.ground_truth(f"json:{tmp_path / 'absent.json'}")
  path.write_text(json.dumps(GOOD))  # and the good document itself loads
  assert gt.ground_truth(f"json:{path}").means.shape == (2, 2)
