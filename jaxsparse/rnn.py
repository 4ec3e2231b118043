"""Recurrent layers: the input projection batched over all steps, then `lax.scan` over time; stacks of them."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse import cells
from jaxsparse.recurrence import scan_cell
from jaxsparse.events import Threshold, init_thresholds

LayerStats = dict[str, jax.Array]


def dropconnect_mask(key: jax.Array, shape: Sequence[int], rate: float, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """An elementwise DropConnect mask: 0 with probability `rate`, else 1 / (1 - rate), so E[mask] = 1."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate!r} must lie in [0, 1)")
  keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
  return keep.astype(dtype) / (1.0 - rate)


class RecurrentLayer(nnx.Module):
  """One recurrent layer of kind `cell` ("egru", "gru" or "lstm").

  Parameters: `W` (in, G*H), `R` (H, G*H), `b_W`, `b_R` (G*H,) with G gates in the order of `cells`, and for the
  EGRU the thresholds `theta` (H,) as a `Threshold` variable, used clipped to [0, 1]. Thresholds get no
  gradient unless `trainable_thresholds` (then a train loop must also differentiate `Threshold` variables).
  `gamma` (dampening) and `eps` (support) shape the EGRU pseudo-derivative. `W` and `R` are xavier-normal
  scaled by `weight_init_gain` (the reference's `weight_init_gain`).
  """

  def __init__(self, cell: str, in_features: int, hidden_size: int, *, rngs: nnx.Rngs, gamma: float = 3.6,
               eps: float = 3.6, threshold_mean: float = 0.01, trainable_thresholds: bool = False,
               weight_init_gain: float = 1.0, dtype: jnp.dtype = jnp.float32):
    spec = cells.cell_spec(cell)
    for name, size in (("in_features", in_features), ("hidden_size", hidden_size)):
      if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name}={size!r} must be a positive integer")
    if gamma <= 0 or eps <= 0:
      raise ValueError(f"pseudo-derivative gamma={gamma!r} and eps={eps!r} must both be positive")
    self.cell = cell
    self.in_features = in_features
    self.hidden_size = hidden_size
    self.gamma = float(gamma)
    self.eps = float(eps)
    self.trainable_thresholds = trainable_thresholds
    width = spec.gates * hidden_size
    if weight_init_gain <= 0:
      raise ValueError(f"weight_init_gain={weight_init_gain!r} must be positive")
    xavier = nnx.initializers.variance_scaling(weight_init_gain**2, "fan_avg", "normal")
    self.W = nnx.Param(xavier(rngs.params(), (in_features, width), dtype))
    self.R = nnx.Param(xavier(rngs.params(), (hidden_size, width), dtype))
    self.b_W = nnx.Param(jnp.zeros((width,), dtype))
    self.b_R = nnx.Param(jnp.zeros((width,), dtype))
    if cell == "egru":
      self.theta = Threshold(init_thresholds(rngs.params(), hidden_size, threshold_mean, dtype))

  def initial_carry(self, batch_size: int) -> cells.Carry:
    return cells.initial_carry(self.cell, batch_size, self.hidden_size, self.W.dtype)

  def dropconnect_mask(self, key: jax.Array, rate: float) -> jax.Array:
    """A DropConnect mask for `R`, to be drawn once per BPTT window."""
    return dropconnect_mask(key, self.R.shape, rate, self.R.dtype)

  def step_params(self, recurrent_mask: jax.Array | None = None) -> cells.Params:
    """The arrays a cell step reads, with `R` masked by `recurrent_mask` when given."""
    recurrent = self.R[...] if recurrent_mask is None else self.R[...] * recurrent_mask
    params = {"R": recurrent, "b_R": self.b_R[...]}
    if self.cell == "egru":
      theta = jnp.clip(self.theta[...], 0.0, 1.0)
      params["theta"] = theta if self.trainable_thresholds else jax.lax.stop_gradient(theta)
    return params

  def __call__(self, inputs: jax.Array, carry: cells.Carry, recurrent_mask: jax.Array | None = None
               ) -> tuple[jax.Array, cells.Carry, LayerStats]:
    """Runs time-major `inputs` [T, B, in] from `carry`; returns outputs [T, B, H], the final carry and the
    step statistics averaged over time."""
    if inputs.ndim != 3 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs of shape {inputs.shape} must be time-major [T, B, {self.in_features}]")
    if recurrent_mask is not None and recurrent_mask.shape != self.R.shape:
      raise ValueError(f"recurrent_mask shape {recurrent_mask.shape} must equal R's shape {self.R.shape}")
    step = cells.cell_spec(self.cell).step
    if self.cell == "egru":
      step = functools.partial(step, gamma=self.gamma, eps=self.eps)
    params = self.step_params(recurrent_mask)
    projected = inputs @ self.W[...] + self.b_W[...]
    recurrent = params.pop("R")
    carry, (outputs, stats) = scan_cell(step, recurrent, params, carry, projected)
    return outputs, carry, {name: jnp.mean(values) for name, values in stats.items()}


class RecurrentStack(nnx.Module):
  """Recurrent layers of one cell kind, each fed the previous layer's (optionally masked) outputs."""

  def __init__(self, cell: str, in_features: int, hidden_sizes: Sequence[int], *, rngs: nnx.Rngs, **layer_kwargs):
    if not hidden_sizes:
      raise ValueError("hidden_sizes must name at least one layer size")
    sizes = [in_features, *hidden_sizes]
    self.layers = nnx.List([
        RecurrentLayer(cell, sizes[i], sizes[i + 1], rngs=rngs, **layer_kwargs) for i in range(len(hidden_sizes))
    ])

  def initial_carry(self, batch_size: int) -> tuple[cells.Carry, ...]:
    return tuple(layer.initial_carry(batch_size) for layer in self.layers)

  def __call__(self, inputs: jax.Array, carries: Sequence[cells.Carry],
               recurrent_masks: Sequence[jax.Array | None] | None = None,
               between_masks: Sequence[jax.Array] | None = None
               ) -> tuple[tuple[cells.Carry, ...], list[jax.Array], list[LayerStats]]:
    """Runs time-major `inputs` [T, B, in] through all layers.

    `recurrent_masks`: one DropConnect mask (or None) per layer. `between_masks`: one mask per layer but the
    last, multiplied onto that layer's outputs before the next layer reads them (broadcast over [T, B, H]).
    Returns the final carries, every layer's unmasked outputs [T, B, H] and every layer's statistics.
    """
    num_layers = len(self.layers)
    if len(carries) != num_layers:
      raise ValueError(f"got {len(carries)} carries for {num_layers} layers")
    recurrent_masks = recurrent_masks if recurrent_masks is not None else [None] * num_layers
    if len(recurrent_masks) != num_layers:
      raise ValueError(f"got {len(recurrent_masks)} recurrent masks for {num_layers} layers")
    if between_masks is not None and len(between_masks) != num_layers - 1:
      raise ValueError(f"got {len(between_masks)} between-layer masks for {num_layers} layers (need one fewer)")
    new_carries, layer_outputs, layer_stats = [], [], []
    hidden = inputs
    for index, (layer, carry, mask) in enumerate(zip(self.layers, carries, recurrent_masks)):
      outputs, carry, stats = layer(hidden, carry, mask)
      new_carries.append(carry)
      layer_outputs.append(outputs)
      layer_stats.append(stats)
      hidden = outputs if between_masks is None or index == num_layers - 1 else outputs * between_masks[index]
    return tuple(new_carries), layer_outputs, layer_stats
