"""p* of the GMM study from --ground_truth: "grid8" (the paper's), "random:K:D", or "json:PATH".

A json:PATH file holds one mixture (K components in D dimensions):

  {"weights":   [w_1, ..., w_K],                    positive, summing to 1 (within 1e-6)
   "means":     [[...D numbers...], ...K rows],
   "variances": [[...D numbers...], ...K rows]}      diagonal covariances, all > 0
or, instead of "variances",
   "covariances": [[[...D...], ...D rows], ...K]}    symmetric positive definite D x D matrices

Every problem (unreadable file, bad JSON, missing or unknown key, wrong shape, non-finite
number, weights not summing to 1, a covariance not symmetric positive definite) is one `error:`
line naming the file and what is wrong.

The study runs in float32, so a file is also checked as float32 sees it (`check_float32`): a
matrix positive definite in float64 can be singular once rounded (a correlation of 0.99999999
rounds to 1), and a variance of 1e-50 or 1e40 is 0 or inf. Refused: a variance (a covariance's
diagonal) outside float32's normal range; a full covariance whose correlation matrix has a
condition number above 1 / float32's epsilon (~8.4e6: its smallest eigenvalue is then below the
rounding of its largest, and float32 Cholesky / solves lose every digit; the correlation matrix,
because Cholesky's accuracy does not depend on the variables' scales); any parameter of the
float32 mixture (log weights, means, the Cholesky factors' logs) that is not finite.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import mixture as mx
from kdjax.cli import UserError, require
from kdjax.mixture import Mixture

KEYS = ("weights", "means", "variances", "covariances")


def ground_truth(spec: str, seed: int = 0) -> Mixture:
  """p* from --ground_truth (random:K:D draws with key `seed`)."""
  if spec == "grid8":
    return mx.grid8()
  if spec.startswith("json:"):
    return from_json(spec[len("json:"):])
  parts = spec.split(":")
  ok = len(parts) == 3 and parts[0] == "random" and all(p.isdigit() for p in parts[1:])
  require(ok, f"--ground_truth={spec!r}: expected grid8, random:K:D (e.g. random:6:3) or "
          "json:PATH")
  k, d = int(parts[1]), int(parts[2])
  require(k >= 1 and d >= 1, f"--ground_truth={spec!r}: K and D must be >= 1")
  return mx.random_mixture(jax.random.PRNGKey(seed), k, d)


def _array(doc: dict, key: str, ndim: int, where: str) -> np.ndarray:
  try:
    a = np.asarray(doc[key], dtype=np.float64)
  except (TypeError, ValueError):
    raise UserError(f"{where}: {key!r} must be a {ndim}-D array of numbers") from None
  require(a.ndim == ndim, f"{where}: {key!r} must be a {ndim}-D array, got shape {a.shape}")
  require(bool(np.all(np.isfinite(a))), f"{where}: {key!r} holds a non-finite number")
  return a


def validate(doc, where: str) -> Mixture:
  """A Mixture (float32) from a parsed JSON document, or UserError naming what is wrong."""
  require(isinstance(doc, dict), f"{where}: expected a JSON object with keys {', '.join(KEYS)}")
  unknown = sorted(set(doc) - set(KEYS))
  require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}; expected "
          f"weights, means, and variances or covariances")
  for key in ("weights", "means"):
    require(key in doc, f"{where}: missing {key!r}")
  require(("variances" in doc) != ("covariances" in doc),
          f"{where}: give exactly one of 'variances' (diagonal) or 'covariances' (full)")
  w = _array(doc, "weights", 1, where)
  means = _array(doc, "means", 2, where)
  k, d = means.shape
  require(k >= 1 and d >= 1, f"{where}: 'means' must have at least one row and column")
  require(w.shape == (k,), f"{where}: 'weights' has {w.shape[0]} entries for {k} means")
  require(bool(np.all(w > 0)), f"{where}: every weight must be > 0")
  require(abs(w.sum() - 1.0) <= 1e-6, f"{where}: weights sum to {w.sum():.9g}, not 1")
  if "variances" in doc:
    cov = _array(doc, "variances", 2, where)
    require(cov.shape == (k, d), f"{where}: 'variances' has shape {cov.shape}, expected {(k, d)}")
    require(bool(np.all(cov > 0)), f"{where}: every variance must be > 0")
  else:
    cov = _array(doc, "covariances", 3, where)
    require(cov.shape == (k, d, d),
            f"{where}: 'covariances' has shape {cov.shape}, expected {(k, d, d)}")
    for i in range(k):
      c = cov[i]
      require(np.allclose(c, c.T, rtol=1e-6, atol=1e-9),
              f"{where}: covariance {i} is not symmetric")
      require(np.linalg.eigvalsh(c).min() > 0, f"{where}: covariance {i} is not positive definite")
  check_float32(cov, where)
  with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused below
    w32, means32, cov32 = (np.asarray(a, np.float32) for a in (w, means, cov))
  m = mx.from_moments(jnp.asarray(w32), jnp.asarray(means32), jnp.asarray(cov32))
  for name, a in (*zip(("log weights", "means", "covariance factors"), m),
                  ("variances", mx.variances(m))):
    require(bool(np.all(np.isfinite(np.asarray(a)))),
            f"{where}: the {name} are not finite in float32 (the study runs in float32)")
  return m


F32 = np.finfo(np.float32)
MAX_CONDITION = 1.0 / float(F32.eps)  # of a correlation matrix, in float32


def check_float32(cov: np.ndarray, where: str) -> None:
  """UserError unless the covariances are usable in float32 (see the module docstring): `cov` is
  the file's variances [K, D] or covariances [K, D, D] in float64."""
  var = cov if cov.ndim == 2 else np.diagonal(cov, axis1=-2, axis2=-1)
  for i, v_D in enumerate(var):
    bad = [float(v) for v in v_D if not F32.tiny <= v <= F32.max]
    if bad:
      raise UserError(f"{where}: component {i} has variance {bad[0]:.3g}, outside float32's "
                      f"range [{F32.tiny:.3g}, {F32.max:.3g}] (the study runs in float32)")
  if cov.ndim == 3:
    for i, c in enumerate(cov.astype(np.float32).astype(np.float64)):
      sd = np.sqrt(np.diagonal(c))
      eig = np.linalg.eigvalsh(c / sd[:, None] / sd[None, :])
      cond = eig.max() / eig.min() if eig.min() > 0 else np.inf
      require(cond <= MAX_CONDITION,
              f"{where}: covariance {i} is singular in float32 (condition number of its "
              f"correlation matrix {cond:.3g} once rounded to float32, above {MAX_CONDITION:.3g}; "
              "the study runs in float32)")


def from_json(path: str) -> Mixture:
  where = f"--ground_truth=json:{path}"
  try:
    with open(path) as f:
      doc = json.load(f)
  except OSError as e:
    raise UserError(f"{where}: cannot read the file ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
  return validate(doc, where)
