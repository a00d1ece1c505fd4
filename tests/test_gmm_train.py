"""Gradient-trained GMM students held to what is known exactly: the forward-KL student of one
Gaussian is the moment match (the `exact` row) at every beta in 2, 8 and 16 dimensions; reverse KL
and JSD students recover a one-Gaussian teacher from a start elsewhere; a student stopped early
is reported as not converged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import mixture as mx
from kdjax.gmm import study, train
from kdjax.gmm.ground_truth import ground_truth

BETAS = np.array([1.0, 10.0, 100.0], np.float32)
SEEDS = [0, 1]


def _se_of_scores(cfg, p_star, seed, student):
  """Monte Carlo standard errors of a student's precision and recall estimates (the study's own
  draws: the seed's eval draws and p* samples)."""
  part = study.seed_part(cfg, p_star, seed)
  x_student = mx.sample_with(student, part["eval_draws"])
  se = lambda v: float(jnp.std(v, ddof=1) / jnp.sqrt(v.shape[0]))
  return se(mx.log_prob(p_star, x_student)), se(mx.log_prob(student, part["x_star"]))


@pytest.mark.parametrize("gt,covariance", [("grid8", "diag"), ("random:6:8", "full"),
                                           ("random:6:16", "full")])
def test_fkl_one_gaussian_student_is_the_moment_match_at_every_beta(gt, covariance):
  cfg = study.StudyConfig(covariance=covariance, objectives=("fkl",), n_eval=2000)
  p_star = ground_truth(gt)
  out = study.grid_fn(cfg, p_star, jnp.asarray(SEEDS), jnp.asarray(BETAS))
  assert np.all(np.asarray(out["converged"]["fkl"]))
  for s, seed in enumerate(SEEDS):
    for b in range(len(BETAS)):
      exact = jax.tree.map(lambda a: a[s, b], out["students"]["exact"])
      se_p, se_r = _se_of_scores(cfg, p_star, seed, exact)
      for metric, se in (("precision", se_p), ("recall", se_r)):
        ours, lim = float(out[metric]["fkl"][s, b]), float(out[metric]["exact"][s, b])
        assert abs(ours - lim) <= 3 * se, (gt, seed, BETAS[b], metric, ours, lim, se)


def _one_gaussian_teacher(d):
  key_m, key_c = jax.random.split(jax.random.PRNGKey(7))
  a = jax.random.normal(key_c, (d, d)) / np.sqrt(d)
  cov = 0.05 * (a @ a.T + 0.3 * jnp.eye(d))
  return mx.from_moments(jnp.ones((1,)), jax.random.normal(key_m, (1, d)), cov[None])


@pytest.mark.parametrize("objective", ["rkl", "jsd"])
def test_mode_seeking_students_recover_a_one_gaussian_teacher(objective):
  d = 4
  teacher = _one_gaussian_teacher(d)
  tril = mx.scale_tril(teacher)
  # start away from the answer: shifted by 1.5 teacher stds along every axis, twice as wide
  shift = jnp.einsum("kde,e->kd", tril, jnp.full((d,), 1.5))
  init = train.Whitening(teacher.means + shift, 2.0 * tril)
  run = jax.jit(functools.partial(train.train_student, objective, components=1, steps=400,
                                  batch_size=256, learning_rate=0.1, init=init))
  student, info = run(teacher, jax.random.PRNGKey(3))
  assert bool(info.converged), info
  sd = np.sqrt(np.diag(np.asarray(mx.covariances(teacher)[0])))
  np.testing.assert_array_less(np.abs(np.asarray(student.means[0] - teacher.means[0])), 0.05 * sd)
  np.testing.assert_allclose(np.asarray(mx.covariances(student)[0]),
                             np.asarray(mx.covariances(teacher)[0]), atol=0.05 * sd.max() ** 2)


def test_a_student_stopped_early_is_not_converged():
  teacher = mx.random_mixture(jax.random.PRNGKey(2), 4, 8, "full")
  run = lambda steps: jax.jit(functools.partial(
      train.train_student, "fkl", components=1, steps=steps, batch_size=128,
      learning_rate=0.1))(teacher, jax.random.PRNGKey(0))
  _, early = run(6)
  _, done = run(300)
  assert not bool(early.converged) and bool(done.converged), (early, done)
  assert float(done.objective) < float(early.objective)


def test_whitened_origin_is_the_start():
  teacher = mx.random_mixture(jax.random.PRNGKey(4), 3, 5, "full")
  for objective in ("fkl", "rkl"):
    white = train.start(objective, teacher, jax.random.PRNGKey(1), 2)
    m = white.to_mixture(white.origin())
    np.testing.assert_allclose(np.asarray(m.means), np.asarray(white.mean), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mx.scale_tril(m)), np.asarray(white.scale), atol=1e-6)
