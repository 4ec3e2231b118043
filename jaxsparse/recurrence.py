"""`lax.scan` over a cell with the recurrent weight gradient computed as one matmul over all steps.

Plain autodiff of a scan accumulates dR += y_{t-1}^T dRh_t inside the backward loop: T thin matmuls whose inner
dimension is the batch, each rewriting the whole (H, G*H) accumulator. Here the scan is differentiated with R
held constant, the per-step gradients dRh_t come out stacked (through a zero offset added to the recurrent
pre-activation), and dR = sum_t y_{t-1}^T dRh_t is a single (H, T*B) x (T*B, G*H) product after the loop.
Values and gradients equal plain autodiff; only the order of the summation changes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Step = Callable[[dict, Any, jax.Array], tuple[Any, jax.Array, dict]]


def _scan(step: Step, recurrent: jax.Array, others: dict, carry: Any, projected: jax.Array,
          offsets: jax.Array):

  def body(carry, xs):
    projected_t, offset_t = xs
    params = dict(others, R=recurrent, b_R=others["b_R"] + offset_t)
    carry, output, stats = step(params, carry, projected_t)
    return carry, (output, stats)

  return jax.lax.scan(body, carry, (projected, offsets))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scan_cell(step: Step, recurrent: jax.Array, others: dict, carry: Any, projected: jax.Array):
  """Runs `step(params, carry, projected_t)` over time with params = others | {'R': recurrent}.

  The carry's first field must be the output fed back through `R` (EGRU y, GRU/LSTM h).
  Returns (final carry, (outputs [T, B, H], per-step stats)), like `lax.scan`.
  """
  return _scan(step, recurrent, others, carry, projected, _zero_offsets(projected, recurrent))


def _zero_offsets(projected: jax.Array, recurrent: jax.Array) -> jax.Array:
  """[T, B, G*H] zeros added to the recurrent pre-activation; their cotangents are the stacked dRh_t."""
  return jnp.zeros(projected.shape[:2] + recurrent.shape[1:2], projected.dtype)


def _scan_cell_fwd(step, recurrent, others, carry, projected):
  result, pullback = jax.vjp(functools.partial(_scan, step, recurrent), others, carry, projected,
                             _zero_offsets(projected, recurrent))
  _, (outputs, _) = result
  previous_outputs = jnp.concatenate([carry[0][None], outputs[:-1]], axis=0)
  return result, (pullback, previous_outputs)


def _scan_cell_bwd(step, residuals, cotangents):
  pullback, previous_outputs = residuals
  d_others, d_carry, d_projected, d_preactivation = pullback(cotangents)
  d_recurrent = jnp.einsum("tbh,tbg->hg", previous_outputs, d_preactivation)
  return d_recurrent, d_others, d_carry, d_projected


scan_cell.defvjp(_scan_cell_fwd, _scan_cell_bwd)
