"""The EGRU event function: a Heaviside step with a triangular pseudo-derivative, and firing thresholds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Threshold(nnx.Variable):
  """Per-unit firing thresholds: a variable kind of its own so a train loop can freeze, train or exempt them."""


def pseudo_derivative(x: jax.Array, gamma: float, eps: float) -> jax.Array:
  """Surrogate dH/dx = gamma * max(0, 1 - eps |x|): height `gamma` (dampening), support |x| < 1/eps."""
  return gamma * jnp.maximum(0.0, 1.0 - eps * jnp.abs(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def heaviside(x: jax.Array, gamma: float, eps: float) -> jax.Array:
  """H(x) = 1 where x > 0 else 0 (so H(0) = 0); its gradient is `pseudo_derivative(x, gamma, eps)`.

  `gamma` and `eps` are static Python floats (hyperparameters, not traced values).
  """
  return (x > 0).astype(x.dtype)


def _heaviside_fwd(x: jax.Array, gamma: float, eps: float) -> tuple[jax.Array, jax.Array]:
  return heaviside(x, gamma, eps), x


def _heaviside_bwd(gamma: float, eps: float, x: jax.Array, cotangent: jax.Array) -> tuple[jax.Array]:
  return (cotangent * pseudo_derivative(x, gamma, eps),)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def init_thresholds(key: jax.Array, n: int, mu: float = 0.01, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Draws `n` thresholds from Beta(3 mu / (1 - mu), 3) (mean `mu`), clipped to [0, 1].

  Sampled by NumPy from the key's bits through a host callback: `jax.random.beta` compiles a rejection-
  sampling loop per shape, which took seconds per layer at model construction on CPU.
  """
  if not 0.0 < mu < 1.0:
    raise ValueError(f"threshold mean mu={mu!r} must lie in the open interval (0, 1)")
  beta = 3.0
  alpha = beta * mu / (1.0 - mu)
  bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key

  def sample(seed_bits: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(np.asarray(seed_bits, np.uint32).ravel().tolist())
    return np.clip(rng.beta(alpha, beta, n), 0.0, 1.0).astype(dtype)

  return jax.pure_callback(sample, jax.ShapeDtypeStruct((n,), dtype), bits)
