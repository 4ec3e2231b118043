"""Gaussian diffusion: noise schedules, forward process, epsilon loss, classifier-free guidance, samplers.

Timesteps are integer indices t in [0, T): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with
abar_t = prod_{s <= t} (1 - beta_s), as in LatentMatters' `DDPM_ELBO`.

Every function takes the denoiser as `eps_fn(x_t, t, cond, drop) -> eps`: `t` is an int32 `(B,)` array and
`drop` a bool `(B,)` array; rows where `drop` is True must see the null condition (see `null_condition`).
Both references use a zero null condition (LatentMatters multiplies the kept exemplar by -1, a sign the first
linear layer absorbs), so we use zeros too. Nothing here is jitted internally: close over the parameters and
jit the caller; `shape`, `num_steps` and `variance` must be static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array, Any, jax.Array], jax.Array]

SCHEDULE_DEFAULTS: dict[str, tuple[float, float, int]] = {
    # LatentMatters' "linear": betas linear in sqrt(beta) between 0.0015 and 0.0195, T = 1000.
    "scaled_linear": (0.0015, 0.0195, 1000),
    # diffusion_as_artist's pixel DDPM: betas linear between 1e-4 and 0.02; T = 500 here.
    "linear": (1e-4, 0.02, 500),
}
VARIANCES = ("posterior", "beta")


class Schedule(NamedTuple):
  """Per-timestep constants of the forward and reverse processes, each of shape `(T,)`, float32."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


class LatentStats(NamedTuple):
  """Mean and standard deviation used to standardise latents before diffusion."""
  mean: jax.Array
  std: jax.Array


def beta_schedule(name: str, num_timesteps: int | None = None, beta_start: float | None = None,
                  beta_end: float | None = None) -> np.ndarray:
  """The betas of a named schedule in float64; unset arguments take the schedule's defaults."""
  if name not in SCHEDULE_DEFAULTS:
    raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULE_DEFAULTS)}")
  default_start, default_end, default_steps = SCHEDULE_DEFAULTS[name]
  start = default_start if beta_start is None else beta_start
  end = default_end if beta_end is None else beta_end
  steps = default_steps if num_timesteps is None else num_timesteps
  if steps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {steps}")
  if not 0.0 < start <= end < 1.0:
    raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={start}, beta_end={end}")
  if name == "scaled_linear":
    return np.linspace(start**0.5, end**0.5, steps, dtype=np.float64)**2
  return np.linspace(start, end, steps, dtype=np.float64)


def make_schedule(name: str = "scaled_linear", num_timesteps: int | None = None,
                  beta_start: float | None = None, beta_end: float | None = None) -> Schedule:
  """Builds the schedule pytree; constants are computed in float64 and stored in float32."""
  betas = beta_schedule(name, num_timesteps, beta_start, beta_end)
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  as_f32 = lambda a: jnp.asarray(a, jnp.float32)
  return Schedule(
      betas=as_f32(betas),
      alphas_cumprod=as_f32(alphas_cumprod),
      alphas_cumprod_prev=as_f32(alphas_cumprod_prev),
      sqrt_alphas_cumprod=as_f32(np.sqrt(alphas_cumprod)),
      sqrt_one_minus_alphas_cumprod=as_f32(np.sqrt(1.0 - alphas_cumprod)),
      posterior_variance=as_f32(posterior_variance),
  )


def _per_example(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """Gathers `values[t]` and reshapes it to broadcast against a batch shaped like `like`."""
  return values[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) given the standard normal `noise`."""
  return (_per_example(schedule.sqrt_alphas_cumprod, t, x0) * x0 +
          _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """Inverts the forward process for x_0 given the (predicted) noise."""
  return ((x_t - _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) /
          _per_example(schedule.sqrt_alphas_cumprod, t, x_t))


def null_condition(cond: Any, drop: jax.Array) -> Any:
  """Replaces the condition of the rows where `drop` is True by zeros (the null condition)."""
  def mask(leaf: jax.Array) -> jax.Array:
    return jnp.where(drop.reshape(drop.shape + (1,) * (leaf.ndim - drop.ndim)), 0, leaf)
  return jax.tree.map(mask, cond)


def sample_condition_drop(key: jax.Array, batch_size: int, prob: float | jax.Array) -> jax.Array:
  """Which rows train with the null condition: independent Bernoulli(prob) draws."""
  return jax.random.bernoulli(key, prob, (batch_size,))


def diffusion_loss(eps_fn: EpsFn, schedule: Schedule, x0: jax.Array, cond: Any, key: jax.Array,
                   cond_drop_prob: float | jax.Array = 0.0) -> jax.Array:
  """Mean squared error between the true and predicted noise at uniform timesteps (DDPM "simple" loss)."""
  batch_size = x0.shape[0]
  key_t, key_noise, key_drop = jax.random.split(key, 3)
  t = jax.random.randint(key_t, (batch_size,), 0, schedule.num_timesteps)
  noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  drop = sample_condition_drop(key_drop, batch_size, cond_drop_prob)
  eps = eps_fn(q_sample(schedule, x0, t, noise), t, cond, drop)
  return jnp.mean(jnp.square(eps - noise))


def guided_eps(eps_fn: EpsFn, x_t: jax.Array, t: jax.Array, cond: Any,
               guidance: float | jax.Array | None) -> jax.Array:
  """Classifier-free guidance `(1 + w) eps_c - w eps_u`; `guidance=None` evaluates the conditional model only.

  The conditional and null-condition passes share one doubled batch, as in both references.
  """
  batch_size = x_t.shape[0]
  if guidance is None:
    return eps_fn(x_t, t, cond, jnp.zeros((batch_size,), bool))
  double = lambda a: jnp.concatenate([a, a], axis=0)
  drop = jnp.arange(2 * batch_size) >= batch_size
  eps = eps_fn(double(x_t), double(t), jax.tree.map(double, cond), drop)
  eps_cond, eps_uncond = eps[:batch_size], eps[batch_size:]
  return (1.0 + guidance) * eps_cond - guidance * eps_uncond


def _initial_noise(key: jax.Array, shape: tuple[int, ...], x_init: jax.Array | None) -> jax.Array:
  if x_init is None:
    return jax.random.normal(key, shape)
  if tuple(x_init.shape) != tuple(shape):
    raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {tuple(shape)}")
  return x_init


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, cond: Any, key: jax.Array, shape: tuple[int, ...],
                guidance: float | jax.Array | None = None, x_init: jax.Array | None = None,
                variance: str = "posterior") -> jax.Array:
  """Ancestral DDPM sampling over all T steps (one `lax.scan`).

  `variance="posterior"` uses the posterior variance beta~_t (LatentMatters); `"beta"` uses beta_t
  (diffusion_as_artist). No noise is added at t = 0. `x_init` overrides the initial noise drawn from `key`.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; valid: {VARIANCES}")
  num_timesteps = schedule.num_timesteps
  key_init, key_steps = jax.random.split(key)
  x = _initial_noise(key_init, shape, x_init)
  step_variance = schedule.posterior_variance if variance == "posterior" else schedule.betas
  timesteps = jnp.arange(num_timesteps - 1, -1, -1, dtype=jnp.int32)

  def step(x: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    t, step_key = inputs
    t_batch = jnp.full((shape[0],), t, jnp.int32)
    eps = guided_eps(eps_fn, x, t_batch, cond, guidance)
    beta = schedule.betas[t]
    mean = (x - beta / schedule.sqrt_one_minus_alphas_cumprod[t] * eps) / jnp.sqrt(1.0 - beta)
    noise_scale = jnp.where(t > 0, jnp.sqrt(step_variance[t]), 0.0)
    return mean + noise_scale * jax.random.normal(step_key, shape), None

  x, _ = jax.lax.scan(step, x, (timesteps, jax.random.split(key_steps, num_timesteps)))
  return x


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The `num_steps` evenly spaced timesteps DDIM visits, descending from T - 1 (to 0 when num_steps > 1)."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, cond: Any, key: jax.Array, shape: tuple[int, ...],
                num_steps: int, eta: float | jax.Array = 0.0, guidance: float | jax.Array | None = None,
                x_init: jax.Array | None = None) -> jax.Array:
  """DDIM sampling over `num_steps` timesteps (one `lax.scan`).

  eta = 0 is deterministic given the initial noise; eta = 1 with all T steps is the DDPM ancestral sampler
  with posterior variance.
  """
  timesteps = ddim_timesteps(schedule.num_timesteps, num_steps)
  previous = np.append(timesteps[1:], -1).astype(np.int32)
  key_init, key_steps = jax.random.split(key)
  x = _initial_noise(key_init, shape, x_init)

  def step(x: jax.Array, inputs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    t, t_prev, step_key = inputs
    t_batch = jnp.full((shape[0],), t, jnp.int32)
    eps = guided_eps(eps_fn, x, t_batch, cond, guidance)
    abar = schedule.alphas_cumprod[t]
    abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    x0 = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    x_prev = jnp.sqrt(abar_prev) * x0 + direction + sigma * jax.random.normal(step_key, shape)
    return x_prev, None

  inputs = (jnp.asarray(timesteps), jnp.asarray(previous), jax.random.split(key_steps, num_steps))
  x, _ = jax.lax.scan(step, x, inputs)
  return x


def fit_latent_stats(latents: jax.Array, per_dimension: bool = False) -> LatentStats:
  """Mean and std of training latents `(N, D)`: one scalar pair (as LatentMatters) or one per dimension."""
  latents = jnp.asarray(latents, jnp.float32)
  axis = 0 if per_dimension else None
  std = jnp.std(latents, axis=axis)
  return LatentStats(mean=jnp.mean(latents, axis=axis), std=jnp.where(std > 0, std, 1.0))


def standardize(latents: jax.Array, stats: LatentStats) -> jax.Array:
  """Maps latents to the zero-mean, unit-std space the diffusion model works in."""
  return (latents - stats.mean) / stats.std


def unstandardize(latents: jax.Array, stats: LatentStats) -> jax.Array:
  """Maps diffusion samples back to the autoencoder's latent space."""
  return latents * stats.std + stats.mean
