"""The Heaviside event function, its pseudo-derivative and the threshold initialisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import events


def test_heaviside_forward_is_a_step_with_zero_at_zero():
  x = jnp.array([-2.0, -1e-6, 0.0, 1e-6, 3.0])
  np.testing.assert_array_equal(events.heaviside(x, 1.0, 1.0), [0.0, 0.0, 0.0, 1.0, 1.0])
  assert events.heaviside(x, 1.0, 1.0).dtype == x.dtype


@pytest.mark.parametrize("gamma, eps", [(3.6, 3.6), (0.7, 1.0), (2.0, 10.0)])
def test_heaviside_gradient_is_the_triangular_pseudo_derivative(gamma, eps):
  x = jnp.array([-1.0, -0.5 / eps, -0.1 / eps, 0.0, 0.25 / eps, 0.9 / eps, 1.0 / eps, 2.0 / eps, 5.0])
  upstream = jnp.linspace(0.5, 2.0, x.size)
  grad = jax.grad(lambda x: jnp.sum(upstream * events.heaviside(x, gamma, eps)))(x)
  expected = np.asarray(upstream) * gamma * np.maximum(0.0, 1.0 - eps * np.abs(np.asarray(x)))
  assert grad.shape == x.shape
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grad[3], upstream[3] * gamma, rtol=1e-6)
  assert grad[0] == 0.0 and grad[-1] == 0.0 and grad[6] == 0.0
  np.testing.assert_allclose(events.pseudo_derivative(x, gamma, eps), expected / np.asarray(upstream), rtol=1e-6)


def test_heaviside_works_under_jit_and_vmap():
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  grad_fn = jax.jit(jax.vmap(jax.grad(lambda row: jnp.sum(events.heaviside(row, 2.0, 4.0)))))
  np.testing.assert_allclose(grad_fn(x), 2.0 * np.maximum(0.0, 1.0 - 4.0 * np.abs(np.asarray(x))), rtol=1e-6)


def test_thresholds_follow_the_beta_distribution_with_mean_mu():
  mu, n = 0.2, 50_000
  theta = np.asarray(events.init_thresholds(jax.random.key(0), n, mu=mu))
  alpha, beta = 3 * mu / (1 - mu), 3.0
  variance = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
  assert theta.shape == (n,) and theta.dtype == np.float32
  assert theta.min() >= 0.0 and theta.max() <= 1.0
  np.testing.assert_allclose(theta.mean(), mu, rtol=0.03)
  np.testing.assert_allclose(theta.var(), variance, rtol=0.05)


def test_default_thresholds_are_small_and_not_all_equal():
  theta = np.asarray(events.init_thresholds(jax.random.key(1), 20_000))
  np.testing.assert_allclose(theta.mean(), 0.01, rtol=0.2)
  assert theta.std() > 0


@pytest.mark.parametrize("mu", [0.0, 1.0, -0.1])
def test_threshold_mean_outside_unit_interval_is_rejected(mu):
  with pytest.raises(ValueError, match="mu"):
    events.init_thresholds(jax.random.key(0), 4, mu=mu)


def test_threshold_is_its_own_variable_kind():
  class Holder(nnx.Module):
    def __init__(self):
      self.theta = events.Threshold(jnp.zeros(3))
      self.weight = nnx.Param(jnp.ones(2))

  holder = Holder()
  assert set(nnx.state(holder, events.Threshold).keys()) == {"theta"}
  assert set(nnx.state(holder, nnx.Param).keys()) == {"weight"}
