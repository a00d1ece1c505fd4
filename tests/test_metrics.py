"""Precision / recall against closed forms; the per-token helper of the LLM study."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import metrics
from kdjax import mixture as mx


def _expected_loglik(m_p, s_p, m_q, s_q):
  """E_{x~N(m_p, s_p^2)} log N(x; m_q, s_q^2), closed form."""
  return -0.5 * np.log(2 * np.pi * s_q**2) - (s_p**2 + (m_p - m_q)**2) / (2 * s_q**2)


def test_precision_and_recall_match_closed_forms():
  star = mx.Mixture(jnp.zeros((1,)), jnp.array([[0.0]]), jnp.log(jnp.array([[1.0]])))
  student = mx.Mixture(jnp.zeros((1,)), jnp.array([[0.5]]), jnp.log(jnp.array([[0.3]])))
  n = 200_000
  x_student = mx.sample(student, jax.random.PRNGKey(0), n)
  x_star = mx.sample(star, jax.random.PRNGKey(1), n)
  prec = float(metrics.precision(lambda x: mx.log_prob(star, x), x_student))
  rec = float(metrics.recall(lambda x: mx.log_prob(student, x), x_star))
  want_prec = _expected_loglik(0.5, 0.3, 0.0, 1.0)
  want_rec = _expected_loglik(0.0, 1.0, 0.5, 0.3)
  se_prec = float(metrics.standard_error(mx.log_prob(star, x_student)))
  se_rec = float(metrics.standard_error(mx.log_prob(student, x_star)))
  assert abs(prec - want_prec) < 5 * se_prec, (prec, want_prec, se_prec)
  assert abs(rec - want_rec) < 5 * se_rec, (rec, want_rec, se_rec)


def test_standard_error():
  v = jnp.array([1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(float(metrics.standard_error(v)), np.std([1, 2, 3, 4], ddof=1) / 2,
                             rtol=1e-6)


def test_mean_token_loglik_ignores_padding():
  lp = jnp.array([[-1.0, -2.0, -100.0], [-3.0, -100.0, -100.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  assert float(metrics.mean_token_loglik(lp, mask)) == -2.0
  assert float(metrics.mean_token_loglik(lp, jnp.zeros_like(mask))) == 0.0
