"""Feature-importance maps against finite differences, the DDPM sampler, and SciPy's Spearman."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from jaxldm import diffusion, importance

LATENT, SIDE, BATCH, STEPS = 3, 4, 2, 12
TIMESTEPS = np.array([2, 5, 11])


def _tiny_models():
  """A tiny exemplar-conditioned denoiser and a nonlinear decoder latent [B, 3] -> image [B, 4, 4, 1]."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(LATENT, LATENT)), rng.normal(size=(LATENT, LATENT))
  w1, w2 = rng.normal(size=(LATENT, 8)), rng.normal(size=(8, SIDE * SIDE))

  def eps_fn(x_t, t, cond, drop):
    cond = jnp.where(drop[:, None], 0.0, cond)
    return jnp.tanh(x_t @ a + cond @ b + 0.1 * t[:, None])

  def decode(z):
    return jax.nn.sigmoid(jnp.tanh(z @ w1) @ w2).reshape(z.shape[0], SIDE, SIDE, 1)

  return eps_fn, decode


@pytest.fixture(scope="module")
def setup():
  with jax.enable_x64(True):
    eps_fn, decode = _tiny_models()
    schedule = diffusion.make_schedule("scaled_linear", STEPS)
    cond = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, LATENT)))
    key = jax.random.key(3)
    run = jax.jit(lambda cond, key: importance.importance_maps(
        eps_fn, schedule, cond, key, (BATCH, LATENT), decode, TIMESTEPS))
    maps, samples = run(cond, key)
    trace = importance.guidance_trace(eps_fn, schedule, cond, key, (BATCH, LATENT), TIMESTEPS)
    yield dict(eps_fn=eps_fn, decode=decode, schedule=schedule, cond=cond, key=key, maps=np.asarray(maps),
               samples=np.asarray(samples), trace=jax.tree.map(np.asarray, trace))


def test_map_equals_finite_difference_estimate(setup):
  """sum_t |J(x_t) s_t| with J by central differences and s_t restated from the formula."""
  with jax.enable_x64(True):
    eps_fn, decode, schedule, cond = setup["eps_fn"], setup["decode"], setup["schedule"], setup["cond"]
    states = setup["trace"].states
    assert states.dtype == np.float64
    expected = np.zeros((BATCH, SIDE, SIDE, 1))
    h = 1e-6
    for k, t in enumerate(TIMESTEPS):
      x = states[k]
      t_batch = jnp.full((BATCH,), t)
      eps_c = np.asarray(eps_fn(x, t_batch, cond, jnp.zeros(BATCH, bool)))
      eps_u = np.asarray(eps_fn(x, t_batch, cond, jnp.ones(BATCH, bool)))
      scale = np.sqrt(1.0 - np.asarray(schedule.alphas_cumprod, np.float64)[t])
      score = 2 * scale * eps_c - scale * eps_u
      jacobian = np.stack([
          (np.asarray(decode(x + h * np.eye(LATENT)[i])) - np.asarray(decode(x - h * np.eye(LATENT)[i])))
          / (2 * h) for i in range(LATENT)], axis=-1)  # [B, 4, 4, 1, LATENT]
      expected += np.abs(np.einsum("bhwcd,bd->bhwc", jacobian, score))
    np.testing.assert_allclose(setup["maps"], expected, rtol=1e-6, atol=1e-9)
    assert np.all(setup["maps"] > 0)


def test_trace_draws_the_ddpm_samples(setup):
  with jax.enable_x64(True):
    expected = diffusion.ddpm_sample(setup["eps_fn"], setup["schedule"], setup["cond"], setup["key"],
                                     (BATCH, LATENT), guidance=1.0)
    np.testing.assert_allclose(setup["samples"], np.asarray(expected), rtol=1e-10, atol=1e-12)


def test_pixel_model_map_is_summed_absolute_score(setup):
  """Without a decoder the score is the image; a linear decoder W gives sum |W s_t| exactly."""
  with jax.enable_x64(True):
    eps_fn, schedule, cond, key = setup["eps_fn"], setup["schedule"], setup["cond"], setup["key"]
    scores = setup["trace"].scores
    pixel_maps, _ = importance.importance_maps(eps_fn, schedule, cond, key, (BATCH, LATENT), None, TIMESTEPS)
    np.testing.assert_allclose(np.asarray(pixel_maps), np.abs(scores).sum(axis=0), rtol=1e-12)
    weights = np.random.default_rng(5).normal(size=(LATENT, 7))
    linear_maps, _ = importance.importance_maps(eps_fn, schedule, cond, key, (BATCH, LATENT),
                                                lambda z: z @ weights, TIMESTEPS)
    np.testing.assert_allclose(np.asarray(linear_maps), np.abs(scores @ weights).sum(axis=0), rtol=1e-10)


def test_guidance_scale_changes_the_score():
  eps_fn, _ = _tiny_models()
  schedule = diffusion.make_schedule("scaled_linear", STEPS)
  cond = jnp.ones((1, LATENT))
  one = importance.guidance_trace(eps_fn, schedule, cond, jax.random.key(0), (1, LATENT), [STEPS - 1], 1.0)
  three = importance.guidance_trace(eps_fn, schedule, cond, jax.random.key(0), (1, LATENT), [STEPS - 1], 3.0)
  np.testing.assert_allclose(one.states, three.states)  # the first recorded state is the initial noise
  scale = schedule.sqrt_one_minus_alphas_cumprod[STEPS - 1]
  eps_c = eps_fn(one.states[0], jnp.full((1,), STEPS - 1), cond, jnp.zeros(1, bool))
  eps_u = eps_fn(one.states[0], jnp.full((1,), STEPS - 1), cond, jnp.ones(1, bool))
  np.testing.assert_allclose(three.scores[0], scale * (4 * eps_c - 3 * eps_u), rtol=1e-5, atol=1e-6)


def test_rank_correlation_matches_scipy_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 4, size=(5, 6, 6)).astype(float)  # many ties
  b = a + rng.normal(scale=2.0, size=a.shape)
  ours = importance.rank_correlation(a, b)
  expected = [scipy_stats.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
  np.testing.assert_allclose(ours, expected, rtol=1e-12)
  np.testing.assert_allclose(importance.rank_correlation(b, np.exp(b)), 1.0)
  np.testing.assert_allclose(importance.rank_correlation(b, -b), -1.0)
  assert np.isnan(importance.rank_correlation(np.ones((1, 3, 3)), b[:1, :3, :3]))[0]
  with pytest.raises(ValueError, match="equal shapes"):
    importance.rank_correlation(a, b[:, :5])


def test_reference_timesteps():
  steps = importance.reference_timesteps(1000)
  assert steps.size == 100 and steps[0] == 100 and steps[-1] == 999
  assert np.sum(steps <= 500) == 20 and np.sum((steps >= 510) & (steps <= 800)) == 30
  half = importance.reference_timesteps(500)
  assert half[0] == 50 and half[-1] == 499 and np.all(np.diff(half) > 0)
  with pytest.raises(ValueError, match="timesteps"):
    importance.guidance_trace(lambda *a: a[0], diffusion.make_schedule("linear", 20), jnp.zeros((1, 2)),
                              jax.random.key(0), (1, 2), [20])
