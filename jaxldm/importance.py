"""Feature-importance maps of guided one-shot drawing (LatentMatters `Feature_Importance_Maps.py`).

While the guided ancestral DDPM sampler draws from an exemplar, the guidance score at step t,

  s_t = (1 + w) sqrt(1 - abar_t) eps_c(x_t) - w sqrt(1 - abar_t) eps_u(x_t),

(w = 1 gives the paper's `2 sqrt(1 - abar_t) eps_c - sqrt(1 - abar_t) eps_u`) is a direction in the space
the diffusion runs in. For a latent model it is carried to pixels by the Jacobian of the decoder
(standardised latent -> image) at x_t, as one forward-mode product J(x_t) s_t (`jax.jvp`); for a
pixel-space model it already is an image. The importance map is the sum over a set of timesteps of
|projected score|: the pixels the exemplar pushes the drawing towards the hardest.

The reference indexes its per-step lists (stored from t = T - 1 down) with timestep values, so the
scores, states and sqrt(1 - abar) factors it combines come from mirrored steps, and it evaluates the
Jacobian at the state after the step; here every quantity of a term belongs to the same timestep t.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from jaxldm import diffusion

Decode = Callable[[jax.Array], jax.Array]


def reference_timesteps(num_timesteps: int = 1000) -> np.ndarray:
  """The reference's timesteps (20 in [100, 500], 30 in [510, 800], 50 in [801, 999] for T = 1000),
  scaled to `num_timesteps`, truncated to integers as `torch.long` does, without repeats."""
  if num_timesteps < 10:
    raise ValueError(f"num_timesteps must be >= 10 for the reference timesteps, got {num_timesteps}")
  scale = num_timesteps / 1000.0
  pieces = [np.linspace(100 * scale, 500 * scale, 20), np.linspace(510 * scale, 800 * scale, 30),
            np.linspace(801 * scale, num_timesteps - 1, 50)]
  return np.unique(np.concatenate(pieces).astype(np.int64))


class GuidanceTrace(NamedTuple):
  """A guided DDPM run: the final samples [B, ...], and the states x_t and guidance scores s_t at the
  requested timesteps [K, B, ...] (in the order of `timesteps`)."""
  samples: jax.Array
  states: jax.Array
  scores: jax.Array


def guidance_trace(eps_fn: diffusion.EpsFn, schedule: diffusion.Schedule, cond: Any, key: jax.Array,
                   shape: tuple[int, ...], timesteps, guidance: float = 1.0,
                   variance: str = "posterior") -> GuidanceTrace:
  """Ancestral guided DDPM sampling (the same draws as `diffusion.ddpm_sample` with this key) that also
  records x_t and the guidance score s_t at `timesteps`."""
  if variance not in diffusion.VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; valid: {diffusion.VARIANCES}")
  timesteps = np.asarray(timesteps, np.int64)
  num_timesteps = schedule.num_timesteps
  if timesteps.ndim != 1 or timesteps.size == 0 or timesteps.min() < 0 or timesteps.max() >= num_timesteps:
    raise ValueError(f"timesteps must be a non-empty list in [0, {num_timesteps}), got {timesteps}")
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, shape)
  step_variance = schedule.posterior_variance if variance == "posterior" else schedule.betas
  batch_size = shape[0]
  doubled_drop = jnp.arange(2 * batch_size) >= batch_size
  doubled_cond = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), cond)

  def step(x, inputs):
    t, step_key = inputs
    t_batch = jnp.full((2 * batch_size,), t, jnp.int32)
    eps = eps_fn(jnp.concatenate([x, x], axis=0), t_batch, doubled_cond, doubled_drop)
    eps_cond, eps_uncond = eps[:batch_size], eps[batch_size:]
    guided = (1.0 + guidance) * eps_cond - guidance * eps_uncond
    score = schedule.sqrt_one_minus_alphas_cumprod[t] * guided
    beta = schedule.betas[t]
    mean = (x - beta / schedule.sqrt_one_minus_alphas_cumprod[t] * guided) / jnp.sqrt(1.0 - beta)
    noise_scale = jnp.where(t > 0, jnp.sqrt(step_variance[t]), 0.0)
    return mean + noise_scale * jax.random.normal(step_key, shape), (x, score)

  descending = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)
  samples, (states, scores) = jax.lax.scan(step, x, (descending, jax.random.split(key_steps, num_timesteps)))
  rows = jnp.asarray(num_timesteps - 1 - timesteps)
  return GuidanceTrace(samples, states[rows], scores[rows])


def project_scores(decode: Decode | None, states: jax.Array, scores: jax.Array) -> jax.Array:
  """J_decode(x) s for each (state, score) pair [K, B, ...] -> [K, B, image...]; identity without a decoder.

  One batched forward-mode product per timestep (`lax.map` over K), so the decoder must treat batch
  rows independently (batch norm in evaluation mode).
  """
  if decode is None:
    return scores
  return jax.lax.map(lambda pair: jax.jvp(decode, (pair[0],), (pair[1],))[1], (states, scores))


def importance_maps(eps_fn: diffusion.EpsFn, schedule: diffusion.Schedule, cond: Any, key: jax.Array,
                    shape: tuple[int, ...], decode: Decode | None = None, timesteps=None,
                    guidance: float = 1.0, variance: str = "posterior") -> tuple[jax.Array, jax.Array]:
  """(maps, samples): per-sample importance maps sum_t |J(x_t) s_t| [B, image...] and the drawn samples.

  `decode` maps the diffusion space to images (None for a pixel-space model); `timesteps` defaults to
  `reference_timesteps(T)`. Pure: jit the caller with the model closed over.
  """
  if timesteps is None:
    timesteps = reference_timesteps(schedule.num_timesteps)
  trace = guidance_trace(eps_fn, schedule, cond, key, shape, timesteps, guidance, variance)
  return jnp.abs(project_scores(decode, trace.states, trace.scores)).sum(axis=0), trace.samples


def rank_correlation(maps_a, maps_b) -> np.ndarray:
  """Spearman rank correlation over pixels of each pair of maps [N, ...] x [N, ...] -> [N].

  Ties share their average rank; a constant map has no ranking and gives NaN.
  """
  maps_a, maps_b = np.asarray(maps_a, np.float64), np.asarray(maps_b, np.float64)
  if maps_a.shape != maps_b.shape or maps_a.ndim < 2:
    raise ValueError(f"maps must have equal shapes [N, ...], got {maps_a.shape} and {maps_b.shape}")
  ranks_a = scipy_stats.rankdata(maps_a.reshape(len(maps_a), -1), axis=1)
  ranks_b = scipy_stats.rankdata(maps_b.reshape(len(maps_b), -1), axis=1)
  centred_a = ranks_a - ranks_a.mean(axis=1, keepdims=True)
  centred_b = ranks_b - ranks_b.mean(axis=1, keepdims=True)
  denominator = np.sqrt((centred_a ** 2).sum(axis=1) * (centred_b ** 2).sum(axis=1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denominator > 0, (centred_a * centred_b).sum(axis=1) / denominator, np.nan)
