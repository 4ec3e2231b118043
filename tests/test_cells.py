"""EGRU, GRU and LSTM steps and layers against plain NumPy restatements of their equations, and EGRU gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse import cells, rnn

T, B, IN, H = 5, 3, 4, 6


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _numpy_egru(x, W, R, b_W, b_R, theta, y, c, eps):
  """Returns outputs [T, B, H], final (y, c), fraction of nonzero y, fraction of |c~ - theta| >= 1/eps."""
  outputs, distances = [], []
  for x_t in x:
    wx = x_t @ W + b_W
    rh = y @ R + b_R
    z = _sigmoid(wx[:, :H] + rh[:, :H])
    r = _sigmoid(wx[:, H:2 * H] + rh[:, H:2 * H])
    g = np.tanh(wx[:, 2 * H:] + r * rh[:, 2 * H:])
    candidate = z * c + (1 - z) * g
    event = (candidate - theta > 0).astype(x.dtype)
    y = event * candidate
    c = candidate - event * theta
    outputs.append(y)
    distances.append(candidate - theta)
  outputs, distances = np.stack(outputs), np.stack(distances)
  return outputs, (y, c), np.mean(outputs != 0), np.mean(np.abs(distances) * eps >= 1)


def _numpy_gru(x, W, R, b_W, b_R, h):
  outputs = []
  for x_t in x:
    wx = x_t @ W + b_W
    rh = h @ R + b_R
    z = _sigmoid(wx[:, :H] + rh[:, :H])
    r = _sigmoid(wx[:, H:2 * H] + rh[:, H:2 * H])
    g = np.tanh(wx[:, 2 * H:] + r * rh[:, 2 * H:])
    h = z * h + (1 - z) * g
    outputs.append(h)
  return np.stack(outputs), h


def _numpy_lstm(x, W, R, b_W, b_R, h, c):
  outputs = []
  for x_t in x:
    pre = x_t @ W + b_W + h @ R + b_R
    i, f, g, o = (pre[:, k * H:(k + 1) * H] for k in range(4))
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    outputs.append(h)
  return np.stack(outputs), h, c


def _random_case(cell, seed=0, dtype=np.float32):
  """Weights, inputs, carry and thresholds drawn so that some but not all EGRU units fire."""
  rng = np.random.default_rng(seed)
  gates = cells.cell_spec(cell).gates
  case = {
      "W": rng.normal(0, 0.6, (IN, gates * H)),
      "R": rng.normal(0, 0.6, (H, gates * H)),
      "b_W": rng.normal(0, 0.2, (gates * H,)),
      "b_R": rng.normal(0, 0.2, (gates * H,)),
      "theta": rng.uniform(0.05, 0.4, (H,)),
      "x": rng.normal(0, 1.0, (T, B, IN)),
      "carry": [rng.normal(0, 0.3, (B, H)) for _ in cells.cell_spec(cell).carry_type._fields],
  }
  return {name: ([v.astype(dtype) for v in value] if name == "carry" else value.astype(dtype))
          for name, value in case.items()}


def _layer(cell, case, **kwargs):
  dtype = case["W"].dtype
  layer = rnn.RecurrentLayer(cell, IN, H, rngs=nnx.Rngs(0), dtype=dtype, **kwargs)
  for name in ("W", "R", "b_W", "b_R") + (("theta",) if cell == "egru" else ()):
    getattr(layer, name)[...] = jnp.asarray(case[name])
  return layer


def _carry(cell, case):
  return cells.cell_spec(cell).carry_type(*(jnp.asarray(v) for v in case["carry"]))


def test_egru_step_matches_numpy():
  case = _random_case("egru")
  params = {"R": jnp.asarray(case["R"]), "b_R": jnp.asarray(case["b_R"]), "theta": jnp.asarray(case["theta"])}
  carry = _carry("egru", case)
  wx = jnp.asarray(case["x"][0] @ case["W"] + case["b_W"])
  new_carry, y, stats = cells.egru_step(params, carry, wx, gamma=3.6, eps=3.6)
  expected, (y_np, c_np), activity, bw_sparsity = _numpy_egru(case["x"][:1], *(case[k] for k in (
      "W", "R", "b_W", "b_R", "theta")), *case["carry"], eps=3.6)
  np.testing.assert_allclose(y, expected[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_carry.y, y_np, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_carry.c, c_np, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["activity"], activity, rtol=1e-6)
  np.testing.assert_allclose(stats["backward_sparsity"], bw_sparsity, rtol=1e-6)


def test_egru_layer_matches_numpy_over_time():
  case = _random_case("egru")
  layer = _layer("egru", case, eps=3.6)
  outputs, carry, stats = layer(jnp.asarray(case["x"]), _carry("egru", case))
  expected, (y_np, c_np), activity, bw_sparsity = _numpy_egru(case["x"], *(case[k] for k in (
      "W", "R", "b_W", "b_R", "theta")), *case["carry"], eps=3.6)
  assert 0.1 < activity < 0.9, "the case must have both firing and silent units"
  assert 0.0 < bw_sparsity < 1.0
  np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(outputs) != 0, expected != 0)
  np.testing.assert_allclose(carry.y, y_np, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry.c, c_np, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["activity"], activity, rtol=1e-6)
  np.testing.assert_allclose(stats["activity_regularizer"], activity, rtol=1e-6)
  np.testing.assert_allclose(stats["backward_sparsity"], bw_sparsity, rtol=1e-6)


def test_egru_thresholds_are_used_clipped_to_unit_interval():
  case = _random_case("egru")
  case["theta"][:2] = [-0.5, 1.7]
  outputs, _, _ = _layer("egru", case)(jnp.asarray(case["x"]), _carry("egru", case))
  expected, *_ = _numpy_egru(case["x"], *(case[k] for k in ("W", "R", "b_W", "b_R")), np.clip(case["theta"], 0, 1),
                             *case["carry"], eps=3.6)
  np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def test_recurrent_dropconnect_mask_multiplies_R():
  case = _random_case("egru")
  layer = _layer("egru", case)
  mask = layer.dropconnect_mask(jax.random.key(3), 0.5)
  outputs, _, _ = layer(jnp.asarray(case["x"]), _carry("egru", case), mask)
  expected, *_ = _numpy_egru(case["x"], case["W"], case["R"] * np.asarray(mask), case["b_W"], case["b_R"],
                             case["theta"], *case["carry"], eps=3.6)
  np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)


def test_dropconnect_mask_statistics():
  mask = np.asarray(rnn.dropconnect_mask(jax.random.key(0), (200, 300), 0.7))
  np.testing.assert_allclose(np.unique(mask), [0.0, 1 / 0.3], rtol=1e-6)
  np.testing.assert_allclose((mask == 0).mean(), 0.7, atol=0.01)
  np.testing.assert_allclose(mask.mean(), 1.0, atol=0.03)
  with pytest.raises(ValueError, match="rate"):
    rnn.dropconnect_mask(jax.random.key(0), (2, 2), 1.0)


def test_gru_layer_matches_numpy():
  case = _random_case("gru")
  outputs, carry, stats = _layer("gru", case)(jnp.asarray(case["x"]), _carry("gru", case))
  expected, h = _numpy_gru(case["x"], *(case[k] for k in ("W", "R", "b_W", "b_R")), *case["carry"])
  np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry.h, h, rtol=1e-5, atol=1e-6)
  assert stats["activity"] == 1.0 and stats["backward_sparsity"] == 0.0


def test_lstm_layer_matches_numpy():
  case = _random_case("lstm")
  outputs, carry, _ = _layer("lstm", case)(jnp.asarray(case["x"]), _carry("lstm", case))
  expected, h, c = _numpy_lstm(case["x"], *(case[k] for k in ("W", "R", "b_W", "b_R")), *case["carry"])
  np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry.h, h, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry.c, c, rtol=1e-5, atol=1e-6)


def test_layer_parameter_names_shapes_and_init():
  layer = rnn.RecurrentLayer("egru", 1000, H, rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  assert set(params.keys()) == {"W", "R", "b_W", "b_R"}
  assert layer.W.shape == (1000, 3 * H) and layer.R.shape == (H, 3 * H)
  np.testing.assert_allclose(np.std(layer.W[...]), np.sqrt(2 / (1000 + 3 * H)), rtol=0.05)
  np.testing.assert_allclose(np.std(layer.R[...]), np.sqrt(2 / (4 * H)), rtol=0.3)
  assert not np.any(layer.b_W[...]) and not np.any(layer.b_R[...])
  assert isinstance(layer.theta, rnn.Threshold) and layer.theta.shape == (H,)
  lstm = rnn.RecurrentLayer("lstm", 3, 5, rngs=nnx.Rngs(0))
  assert lstm.W.shape == (3, 20) and not hasattr(lstm, "theta")


def test_unknown_cell_is_rejected_with_the_valid_names():
  with pytest.raises(ValueError, match=r"'rnn'.*\['egru', 'gru', 'lstm'\]"):
    rnn.RecurrentLayer("rnn", 3, 4, rngs=nnx.Rngs(0))


def test_stack_feeds_masked_outputs_to_the_next_layer():
  stack = rnn.RecurrentStack("egru", IN, [H, H], rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(0), (T, B, IN))
  between = [rnn.dropconnect_mask(jax.random.key(2), (1, B, H), 0.5)]
  carries, outputs, stats = stack(x, stack.initial_carry(B), between_masks=between)
  first, carry0, _ = stack.layers[0](x, stack.layers[0].initial_carry(B))
  second, carry1, _ = stack.layers[1](first * between[0], stack.layers[1].initial_carry(B))
  np.testing.assert_allclose(outputs[0], first, rtol=1e-6)
  np.testing.assert_allclose(outputs[1], second, rtol=1e-6)
  np.testing.assert_allclose(carries[1].c, carry1.c, rtol=1e-6)
  assert len(stats) == 2


def _surrogate_step(v, gamma, eps):
  """Straight-through Heaviside: the value of H(v), the derivative of S(v) = gamma * integral of the triangle."""
  u = jnp.clip(v, -1 / eps, 1 / eps)
  smooth = gamma * (u - eps * u * jnp.abs(u) / 2)
  return smooth + jax.lax.stop_gradient((v > 0).astype(v.dtype) - smooth)


def _jax_egru_reference(W, R, b_W, b_R, theta, x, y, c, gamma, eps):
  """The EGRU equations in jnp with a Python loop and no custom_vjp: an independent route to the gradient."""
  outputs = []
  for x_t in x:
    wx = x_t @ W + b_W
    rh = y @ R + b_R
    z = jax.nn.sigmoid(wx[:, :H] + rh[:, :H])
    r = jax.nn.sigmoid(wx[:, H:2 * H] + rh[:, H:2 * H])
    g = jnp.tanh(wx[:, 2 * H:] + r * rh[:, 2 * H:])
    candidate = z * c + (1 - z) * g
    event = _surrogate_step(candidate - theta, gamma, eps)
    y = event * candidate
    c = candidate - event * theta
    outputs.append(y)
  return jnp.stack(outputs), y, c


def _loss_weights(seed=7):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(T, B, H)), rng.normal(size=(B, H)), rng.normal(size=(B, H))


def _layer_loss_fn(layer):
  """Loss of the layer as a function of (params, thresholds, x, y0, c0)."""
  graphdef, params, thresholds = nnx.split(layer, nnx.Param, rnn.Threshold)
  w_out, w_y, w_c = _loss_weights()

  def loss(params, thresholds, x, y, c):
    outputs, carry, _ = nnx.merge(graphdef, params, thresholds)(x, cells.EGRUCarry(y, c))
    return jnp.sum(outputs * w_out) + jnp.sum(carry.y * w_y) + jnp.sum(carry.c * w_c)

  return jax.jit(loss), params, thresholds


@pytest.mark.parametrize("gamma, eps", [(3.6, 3.6), (0.7, 1.0)])
def test_egru_gradient_matches_straight_through_restatement(gamma, eps):
  """jax.grad through the layer (custom_vjp Heaviside inside lax.scan) equals jax.grad of a loop restatement in
  which H(v) is S(v) + stop_gradient(H(v) - S(v)), S' being the pseudo-derivative: same forward value as H
  everywhere and derivative S' everywhere, so the two gradients must agree at every point, including where
  units sit inside the pseudo-derivative's support (asserted, so the surrogate term is really exercised)."""
  case = _random_case("egru", seed=1)
  layer = _layer("egru", case, gamma=gamma, eps=eps, trainable_thresholds=True)
  loss, params, thresholds = _layer_loss_fn(layer)
  x, (y0, c0) = jnp.asarray(case["x"]), (jnp.asarray(v) for v in case["carry"])
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(params, thresholds, x, y0, c0)
  _, _, _, bw_sparsity = _numpy_egru(case["x"], *(case[k] for k in ("W", "R", "b_W", "b_R", "theta")),
                                     *case["carry"], eps=eps)
  assert bw_sparsity < 0.9

  w_out, w_y, w_c = _loss_weights()

  def reference_loss(W, R, b_W, b_R, theta, x, y, c):
    outputs, y, c = _jax_egru_reference(W, R, b_W, b_R, theta, x, y, c, gamma, eps)
    return jnp.sum(outputs * w_out) + jnp.sum(y * w_y) + jnp.sum(c * w_c)

  names = ("W", "R", "b_W", "b_R", "theta")
  reference_grad = jax.jit(jax.grad(reference_loss, argnums=tuple(range(8))))
  reference = reference_grad(*(jnp.asarray(case[k]) for k in names), x, y0, c0)
  ours = [grads[0][k][...] for k in names[:4]] + [grads[1]["theta"][...], grads[2], grads[3], grads[4]]
  for name, got, want in zip(names + ("x", "y0", "c0"), ours, reference):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
  assert np.abs(reference[4]).max() > 1e-3


def test_frozen_thresholds_get_no_gradient():
  case = _random_case("egru", seed=1)
  loss, params, thresholds = _layer_loss_fn(_layer("egru", case))
  grad = jax.grad(loss, argnums=1)(params, thresholds, jnp.asarray(case["x"]),
                                   *(jnp.asarray(v) for v in case["carry"]))
  assert not np.any(grad["theta"][...])


def test_egru_gradient_matches_finite_differences_where_surrogate_and_step_agree():
  """Finite differences (float64, central, along random directions in all parameters, inputs and carry)
  agree with the custom gradient exactly where the smoothed model agrees with the step model: with
  gamma = eps the surrogate S rises from 0 to 1 inside |v| < 1/eps and equals H outside, so at a point where
  no pre-activation v = c~ - theta lies inside the support, S and H give the same forward value, the
  pseudo-derivative is zero, and the model is locally smooth (no event flips between the perturbed points,
  asserted). Inside the support the pseudo-derivative is a chosen surrogate, not the derivative of the step,
  so no finite difference can confirm it; the straight-through test covers that case."""
  gamma = eps = 200.0
  with jax.enable_x64(True):
    for seed in range(20):
      case = _random_case("egru", seed=seed, dtype=np.float64)
      _, _, activity, bw_sparsity = _numpy_egru(case["x"], *(case[k] for k in ("W", "R", "b_W", "b_R", "theta")),
                                                *case["carry"], eps=eps)
      if bw_sparsity == 1.0 and 0.1 < activity < 0.9:
        break
    else:
      pytest.fail("no case with events and every pre-activation outside the pseudo-derivative support")
    layer = _layer("egru", case, gamma=gamma, eps=eps, trainable_thresholds=True)
    loss, params, thresholds = _layer_loss_fn(layer)
    point = (params, thresholds, jnp.asarray(case["x"]), *(jnp.asarray(v) for v in case["carry"]))
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*point)
    graphdef = nnx.graphdef(layer)
    events_at = jax.jit(lambda params, thresholds, x, y, c: nnx.merge(graphdef, params, thresholds)(
        x, cells.EGRUCarry(y, c))[0] != 0)
    leaves, treedef = jax.tree.flatten(point)
    grad_leaves = jax.tree.leaves(grads)
    rng = np.random.default_rng(0)
    step = 1e-6
    for _ in range(3):
      direction = [rng.normal(size=np.shape(leaf)) for leaf in leaves]
      shifted = lambda sign: jax.tree.unflatten(treedef, [l + sign * step * d for l, d in zip(leaves, direction)])
      np.testing.assert_array_equal(events_at(*shifted(-1)), events_at(*shifted(1)))
      finite_difference = (loss(*shifted(1)) - loss(*shifted(-1))) / (2 * step)
      directional = sum(np.sum(np.asarray(g) * d) for g, d in zip(grad_leaves, direction))
      np.testing.assert_allclose(finite_difference, directional, rtol=1e-6)
