"""Density KD losses: values near the divergences they estimate, finite gradients that point the
right way, and the mode-covering / mode-seeking contrast between forward and reverse KL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import mixture as mx
from kdjax.objectives import density


def _gauss(mean, log_std):
  return mx.Mixture(jnp.zeros((1,)), jnp.asarray([mean], jnp.float32),
                    jnp.full((1, len(mean)), log_std, jnp.float32))


def _kl_gauss_1comp(p, q):
  """KL(p || q) between diagonal Gaussians, closed form."""
  vp, vq = np.asarray(mx.variances(p)[0]), np.asarray(mx.variances(q)[0])
  dm = np.asarray(p.means[0] - q.means[0])
  return 0.5 * np.sum(vp / vq + dm**2 / vq - 1 + np.log(vq / vp))


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_kl_estimates_match_closed_form(name):
  s, t = _gauss([0.3, -0.2], -0.5), _gauss([0.0, 0.1], -0.2)
  value = float(density.LOSSES[name](s, t, jax.random.PRNGKey(0), 200_000))
  exact = _kl_gauss_1comp(t, s) if name == "fkl" else _kl_gauss_1comp(s, t)
  assert abs(value - exact) < 0.02 * max(exact, 0.1) + 0.01, (value, exact)


def test_losses_vanish_when_student_equals_teacher():
  t = mx.random_mixture(jax.random.PRNGKey(1), 3, 2)
  for name in ("fkl", "rkl", "jsd"):
    assert abs(float(density.LOSSES[name](t, t, jax.random.PRNGKey(2), 20_000))) < 1e-5, name


def test_jsd_is_bounded_and_positive():
  s, t = _gauss([5.0, 5.0], -2.0), _gauss([-5.0, -5.0], -2.0)  # nearly disjoint
  for mix in (0.2, 0.5, 0.8):
    v = float(density.generalized_jsd(s, t, jax.random.PRNGKey(3), 5000, mix))
    bound = -(mix * np.log(mix) + (1 - mix) * np.log(1 - mix))  # the entropy of the mix
    assert 0.95 * bound < v <= bound + 1e-4, (mix, v, bound)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_gradients_finite_and_pull_the_student_to_the_teacher(name):
  t = _gauss([1.0, -1.0], -1.0)
  s = _gauss([0.0, 0.0], -1.0)
  grads = jax.grad(density.LOSSES[name])(s, t, jax.random.PRNGKey(4), 4096)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
  direction = -np.asarray(grads.means[0])  # gradient descent moves the mean this way
  assert direction[0] > 0 and direction[1] < 0, direction
  # and a small step lowers the loss (same Monte Carlo draws)
  step = jax.tree.map(lambda p, g: p - 0.05 * g, s, grads)
  loss = lambda m: float(density.LOSSES[name](m, t, jax.random.PRNGKey(4), 4096))
  assert loss(step) < loss(s)


def test_forward_kl_covers_reverse_kl_seeks_a_mode():
  """Bimodal teacher, one-Gaussian student: forward KL widens over both modes, reverse KL narrows
  onto one (the gradients on the log-std have opposite signs from the same start)."""
  t = mx.Mixture(jnp.zeros((2,)), jnp.array([[-2.0], [2.0]]), jnp.full((2, 1), jnp.log(0.3)))
  s = _gauss([1.8], jnp.log(0.6))
  g_f = jax.grad(density.forward_kl)(s, t, jax.random.PRNGKey(5), 8192)
  g_r = jax.grad(density.reverse_kl)(s, t, jax.random.PRNGKey(5), 8192)
  assert float(g_f.scales[0, 0]) < 0  # fkl: grow the std
  assert float(g_r.scales[0, 0]) > 0  # rkl: shrink it onto the nearby mode
  assert float(g_f.means[0, 0]) > 0  # fkl: pull the mean back towards 0 (the mixture's mean)


def test_reverse_kl_gradient_reaches_student_weights():
  t = mx.Mixture(jnp.array([0.0, -3.0]), jnp.array([[-2.0], [2.0]]), jnp.full((2, 1), jnp.log(0.3)))
  s = mx.Mixture(jnp.zeros((2,)), t.means, t.scales)  # right components, wrong weights
  g = jax.grad(density.reverse_kl)(s, t, jax.random.PRNGKey(6), 4096)
  assert float(g.logits[1]) > 0 > float(g.logits[0])  # shift weight to the teacher's heavy component
