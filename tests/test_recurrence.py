"""The scan with a batched recurrent-weight gradient equals plain autodiff of the same scan, for every cell."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import cells
from jaxsparse.recurrence import _scan, scan_cell

T, B, H, I = 6, 3, 5, 4


@pytest.mark.parametrize("cell", ["egru", "gru", "lstm"])
def test_gradients_equal_plain_autodiff(cell):
  spec = cells.cell_spec(cell)
  keys = jax.random.split(jax.random.key(0), 6)
  width = spec.gates * H
  recurrent = jax.random.normal(keys[0], (H, width)) * 0.5
  others = {"b_R": jax.random.normal(keys[1], (width,)) * 0.1}
  if cell == "egru":
    others["theta"] = jnp.full((H,), 0.05)
  projected = jax.random.normal(keys[2], (T, B, width))
  carry = spec.carry_type(*(jax.random.normal(k, (B, H)) * 0.3 for k in jax.random.split(keys[3], 2)[
      :len(spec.carry_type._fields)]))
  step = functools.partial(spec.step, gamma=3.6, eps=3.6) if cell == "egru" else spec.step
  weights = jax.random.normal(keys[4], (T, B, H))

  def loss(scan, recurrent, others, carry, projected):
    final, (outputs, stats) = scan(recurrent, others, carry, projected)
    return jnp.sum(outputs * weights) + jnp.sum(final[-1] ** 2) + stats["activity_regularizer"].sum()

  def plain(r, o, c, p):
    return _scan(step, r, o, c, p, jnp.zeros((T, B, width)))
  custom = functools.partial(scan_cell, step)
  args = (recurrent, others, carry, projected)
  value_plain, grads_plain = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1, 2, 3))(*args)
  value_custom, grads_custom = jax.value_and_grad(functools.partial(loss, custom), argnums=(0, 1, 2, 3))(*args)
  np.testing.assert_allclose(value_custom, value_plain, rtol=1e-6)
  assert np.abs(np.asarray(grads_plain[0])).max() > 0
  for a, b in zip(jax.tree.leaves(grads_plain), jax.tree.leaves(grads_custom)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
