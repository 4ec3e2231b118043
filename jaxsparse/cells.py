"""One time step of the EGRU, GRU and LSTM cells as pure functions of (params, carry, projected input).

Every step takes `params` (a dict with the recurrent matrix `R` (H, G*H), its bias `b_R` (G*H,) and, for the
EGRU, the thresholds `theta` (H,)), the carry and `projected_input` = x_t W + b_W (B, G*H), precomputed for all
steps at once. It returns (new carry, output (B, H), step statistics), the statistics being scalars:
`activity` (fraction of nonzero outputs), `backward_sparsity` (fraction of units whose pseudo-derivative is
exactly zero) and `activity_regularizer` (differentiable mean of the events; zero for the dense cells).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse import events

Params = dict[str, jax.Array]
StepStats = dict[str, jax.Array]


class EGRUCarry(NamedTuple):
  """`y`: the previous event output (fed back through R); `c`: the internal state after the soft reset."""
  y: jax.Array
  c: jax.Array


class GRUCarry(NamedTuple):
  h: jax.Array


class LSTMCarry(NamedTuple):
  h: jax.Array
  c: jax.Array


Carry = EGRUCarry | GRUCarry | LSTMCarry


def _dense_stats(output: jax.Array) -> StepStats:
  zero = jnp.zeros((), output.dtype)
  return {
      "activity": jnp.mean(output != 0).astype(output.dtype),
      "backward_sparsity": zero,
      "activity_regularizer": zero,
  }


def egru_step(params: Params, carry: EGRUCarry, projected_input: jax.Array, *, gamma: float,
              eps: float) -> tuple[EGRUCarry, jax.Array, StepStats]:
  """EGRU: GRU gates driven by the previous events y, a thresholded event output and a soft reset of c."""
  wx_z, wx_r, wx_g = jnp.split(projected_input, 3, axis=-1)
  rh_z, rh_r, rh_g = jnp.split(carry.y @ params["R"] + params["b_R"], 3, axis=-1)
  z = jax.nn.sigmoid(wx_z + rh_z)
  r = jax.nn.sigmoid(wx_r + rh_r)
  g = jnp.tanh(wx_g + r * rh_g)
  candidate = z * carry.c + (1.0 - z) * g
  distance = candidate - params["theta"]
  event = events.heaviside(distance, gamma, eps)
  y = event * candidate
  c = candidate - event * params["theta"]
  stats = {
      "activity": jax.lax.stop_gradient(jnp.mean(y != 0).astype(y.dtype)),
      "backward_sparsity": jax.lax.stop_gradient(jnp.mean(jnp.abs(distance) * eps >= 1.0).astype(y.dtype)),
      "activity_regularizer": jnp.mean(event),
  }
  return EGRUCarry(y=y, c=c), y, stats


def gru_step(params: Params, carry: GRUCarry, projected_input: jax.Array) -> tuple[GRUCarry, jax.Array, StepStats]:
  """GRU in the cuDNN/PyTorch form: the reset gate scales (h R_g + b_R_g)."""
  wx_z, wx_r, wx_g = jnp.split(projected_input, 3, axis=-1)
  rh_z, rh_r, rh_g = jnp.split(carry.h @ params["R"] + params["b_R"], 3, axis=-1)
  z = jax.nn.sigmoid(wx_z + rh_z)
  r = jax.nn.sigmoid(wx_r + rh_r)
  g = jnp.tanh(wx_g + r * rh_g)
  h = z * carry.h + (1.0 - z) * g
  return GRUCarry(h=h), h, _dense_stats(h)


def lstm_step(params: Params, carry: LSTMCarry, projected_input: jax.Array) -> tuple[LSTMCarry, jax.Array, StepStats]:
  """LSTM with gate order [i, f, g, o]."""
  pre = projected_input + carry.h @ params["R"] + params["b_R"]
  pre_i, pre_f, pre_g, pre_o = jnp.split(pre, 4, axis=-1)
  c = jax.nn.sigmoid(pre_f) * carry.c + jax.nn.sigmoid(pre_i) * jnp.tanh(pre_g)
  h = jax.nn.sigmoid(pre_o) * jnp.tanh(c)
  return LSTMCarry(h=h, c=c), h, _dense_stats(h)


class CellSpec(NamedTuple):
  """What a recurrent layer needs to know about a cell kind."""
  gates: int
  carry_type: type
  step: Callable[..., tuple[Carry, jax.Array, StepStats]]


CELLS: dict[str, CellSpec] = {
    "egru": CellSpec(gates=3, carry_type=EGRUCarry, step=egru_step),
    "gru": CellSpec(gates=3, carry_type=GRUCarry, step=gru_step),
    "lstm": CellSpec(gates=4, carry_type=LSTMCarry, step=lstm_step),
}


def cell_spec(cell: str) -> CellSpec:
  """The spec of a cell kind; raises ValueError naming the valid kinds for an unknown one."""
  if cell not in CELLS:
    raise ValueError(f"unknown cell {cell!r}; valid cells are {sorted(CELLS)}")
  return CELLS[cell]


def initial_carry(cell: str, batch_size: int, hidden_size: int, dtype: jnp.dtype = jnp.float32) -> Carry:
  """An all-zero carry of the given cell kind."""
  carry_type = cell_spec(cell).carry_type
  return carry_type(*(jnp.zeros((batch_size, hidden_size), dtype) for _ in carry_type._fields))
