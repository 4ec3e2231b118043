"""Schedules, forward process, loss, guidance and samplers, checked against closed-form Gaussian answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm import diffusion as df

DATA_MEAN = np.array([1.5, -0.5], np.float32)
DATA_STD = np.array([0.5, 2.0], np.float32)
NUM_SAMPLES = 4000
SHAPE = (NUM_SAMPLES, 2)


def gaussian_eps_fn(schedule: df.Schedule, data_std=DATA_STD):
  """The optimal noise prediction E[eps | x_t] for x0 ~ N(mean, std^2) per dimension.

  The data mean is the condition; null-condition rows use mean 0. With x_t = sqrt(a) x0 + sqrt(1 - a) eps,
  E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a std^2 + 1 - a).
  """
  def eps_fn(x_t, t, cond, drop):
    mean = jnp.where(drop[:, None], 0.0, cond)
    abar = schedule.alphas_cumprod[t][:, None]
    return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * mean) / (abar * data_std**2 + 1 - abar)
  return eps_fn


@pytest.fixture(scope="module")
def ldm_schedule():
  return df.make_schedule("scaled_linear")


@pytest.fixture(scope="module")
def data_cond():
  return jnp.broadcast_to(DATA_MEAN, SHAPE)


@pytest.fixture(scope="module")
def ddpm_samples(ldm_schedule, data_cond):
  eps_fn = gaussian_eps_fn(ldm_schedule)
  return jax.jit(lambda key: df.ddpm_sample(eps_fn, ldm_schedule, data_cond, key, SHAPE))(jax.random.key(0))


def assert_moments(samples, mean, std, mean_tol, std_rel_tol):
  samples = np.asarray(samples)
  np.testing.assert_allclose(samples.mean(0), mean, atol=mean_tol)
  np.testing.assert_allclose(samples.std(0), std, rtol=std_rel_tol)


# ----- schedules and forward process -----


def test_schedules_match_their_formulas():
  ldm = df.make_schedule("scaled_linear")
  expected = np.linspace(0.0015**0.5, 0.0195**0.5, 1000)**2
  np.testing.assert_allclose(ldm.betas, expected, rtol=1e-6)
  pixel = df.make_schedule("linear")
  assert pixel.num_timesteps == 500
  np.testing.assert_allclose(pixel.betas, np.linspace(1e-4, 0.02, 500), rtol=1e-6)
  for schedule in (ldm, pixel):
    betas = np.asarray(schedule.betas, np.float64)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(schedule.alphas_cumprod, abar, rtol=1e-5)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev, np.append(1.0, abar[:-1]), rtol=1e-5)
    np.testing.assert_allclose(schedule.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - abar), rtol=1e-5)
    abar_prev = np.append(1.0, abar[:-1])
    np.testing.assert_allclose(schedule.posterior_variance, betas * (1 - abar_prev) / (1 - abar),
                               rtol=1e-4, atol=1e-12)
    assert np.all(np.diff(np.asarray(schedule.alphas_cumprod)) < 0)
    assert 0 < schedule.alphas_cumprod[-1] < 0.01 and schedule.alphas_cumprod[0] < 1


def test_schedule_rejects_bad_arguments():
  with pytest.raises(ValueError, match="cosine"):
    df.make_schedule("cosine")
  with pytest.raises(ValueError, match="beta_start"):
    df.make_schedule("linear", beta_start=0.1, beta_end=0.01)
  assert df.make_schedule("linear", num_timesteps=7).num_timesteps == 7


def test_q_sample_has_the_forward_process_moments(ldm_schedule):
  x0 = jnp.array([2.0, -1.0, 0.5])
  t = jnp.array([0, 300, 999])
  noise = jax.random.normal(jax.random.key(1), (100_000, 3))
  x_t = jax.vmap(lambda n: df.q_sample(ldm_schedule, x0, t, n))(noise)
  abar = np.asarray(ldm_schedule.alphas_cumprod)[np.asarray(t)]
  np.testing.assert_allclose(x_t.mean(0), np.sqrt(abar) * np.asarray(x0), atol=0.015)
  np.testing.assert_allclose(x_t.var(0), 1 - abar, rtol=0.02)


def test_predict_x0_inverts_q_sample(ldm_schedule):
  x0 = jax.random.normal(jax.random.key(2), (5, 3, 4))
  noise = jax.random.normal(jax.random.key(3), (5, 3, 4))
  t = jnp.array([0, 10, 100, 500, 900])
  recovered = df.predict_x0(ldm_schedule, df.q_sample(ldm_schedule, x0, t, noise), t, noise)
  np.testing.assert_allclose(recovered, x0, atol=2e-3)


# ----- loss and condition dropout -----


def test_loss_of_the_optimal_predictor_is_the_posterior_noise_variance(ldm_schedule, data_cond):
  """With the optimal eps, the loss is E_t[Var(eps | x_t)] = E_t[1 - (1 - a_t) / (a_t s^2 + 1 - a_t)]."""
  x0 = DATA_MEAN + DATA_STD * jax.random.normal(jax.random.key(4), SHAPE)
  loss = jax.jit(lambda key: df.diffusion_loss(gaussian_eps_fn(ldm_schedule), ldm_schedule, x0, data_cond,
                                               key))(jax.random.key(5))
  abar = np.asarray(ldm_schedule.alphas_cumprod, np.float64)[:, None]
  expected = np.mean(1 - (1 - abar) / (abar * DATA_STD**2 + 1 - abar))
  np.testing.assert_allclose(loss, expected, rtol=0.05)
  zero_loss = df.diffusion_loss(lambda x, t, c, d: jnp.zeros_like(x), ldm_schedule, x0, data_cond,
                                jax.random.key(5))
  np.testing.assert_allclose(zero_loss, 1.0, rtol=0.05)


def test_condition_dropout_rate():
  drops = df.sample_condition_drop(jax.random.key(6), 200_000, 0.1)
  assert drops.dtype == jnp.bool_
  np.testing.assert_allclose(drops.mean(), 0.1, atol=0.003)
  assert not df.sample_condition_drop(jax.random.key(6), 1000, 0.0).any()


def test_null_condition_zeroes_dropped_rows():
  cond = {"a": jnp.ones((3, 2)), "b": jnp.full((3, 2, 2), 5.0)}
  out = df.null_condition(cond, jnp.array([False, True, False]))
  np.testing.assert_array_equal(out["a"], [[1, 1], [0, 0], [1, 1]])
  np.testing.assert_array_equal(out["b"][:, 0, 0], [5, 0, 5])


def test_loss_passes_the_dropout_mask_to_the_denoiser(ldm_schedule):
  """A denoiser that outputs K on dropped rows has loss ~ K^2 * rate for K >> 1."""
  big = 100.0
  eps_fn = lambda x, t, c, drop: jnp.where(drop[:, None], big, 0.0) * jnp.ones_like(x)
  x0 = jnp.zeros((50_000, 2))
  for rate in (0.0, 0.1, 0.5):
    loss = df.diffusion_loss(eps_fn, ldm_schedule, x0, x0, jax.random.key(7), cond_drop_prob=rate)
    np.testing.assert_allclose(loss / big**2, rate, atol=0.006)


# ----- guidance -----


def test_guidance_formula_and_zero_guidance_is_conditional():
  x = jax.random.normal(jax.random.key(8), (4, 3))
  cond = jax.random.normal(jax.random.key(9), (4, 3))
  t = jnp.arange(4)
  eps_fn = lambda x, t, c, drop: jnp.sin(x) + t[:, None] * 0.1 + jnp.where(drop[:, None], -2.0, c)
  conditional = eps_fn(x, t, cond, jnp.zeros(4, bool))
  unconditional = eps_fn(x, t, cond, jnp.ones(4, bool))
  np.testing.assert_array_equal(df.guided_eps(eps_fn, x, t, cond, None), conditional)
  np.testing.assert_array_equal(df.guided_eps(eps_fn, x, t, cond, 0.0), conditional)
  for w in (0.5, 3.0):
    np.testing.assert_allclose(df.guided_eps(eps_fn, x, t, cond, w),
                               (1 + w) * np.asarray(conditional) - w * np.asarray(unconditional), rtol=1e-6)


def test_zero_guidance_sampling_equals_conditional_sampling(ldm_schedule, data_cond, ddpm_samples):
  eps_fn = gaussian_eps_fn(ldm_schedule)
  guided = jax.jit(lambda key: df.ddpm_sample(eps_fn, ldm_schedule, data_cond, key, SHAPE,
                                              guidance=0.0))(jax.random.key(0))
  np.testing.assert_allclose(guided, ddpm_samples, atol=1e-5)


def test_guided_sampling_of_gaussians_shifts_the_mean(ldm_schedule, data_cond):
  """Equal-variance Gaussians: eps is linear in the mean, so guidance w samples N(mean_c + w (mean_c - mean_u))."""
  eps_fn = gaussian_eps_fn(ldm_schedule)
  w = 1.0
  samples = jax.jit(lambda key: df.ddim_sample(eps_fn, ldm_schedule, data_cond, key, SHAPE, 200, eta=1.0,
                                               guidance=w))(jax.random.key(10))
  assert_moments(samples, (1 + w) * DATA_MEAN, DATA_STD, mean_tol=0.1, std_rel_tol=0.08)


# ----- samplers -----


def test_ddpm_recovers_the_data_distribution(ddpm_samples):
  assert_moments(ddpm_samples, DATA_MEAN, DATA_STD, mean_tol=0.05, std_rel_tol=0.04)


def test_ddpm_with_beta_variance_on_the_pixel_schedule():
  schedule = df.make_schedule("linear")
  cond = jnp.broadcast_to(DATA_MEAN, SHAPE)
  samples = jax.jit(lambda key: df.ddpm_sample(gaussian_eps_fn(schedule), schedule, cond, key, SHAPE,
                                               variance="beta"))(jax.random.key(11))
  assert_moments(samples, DATA_MEAN, DATA_STD, mean_tol=0.05, std_rel_tol=0.04)
  with pytest.raises(ValueError, match="posterior"):
    df.ddpm_sample(gaussian_eps_fn(schedule), schedule, cond, jax.random.key(0), SHAPE, variance="fixed")


def test_ddim_with_eta_one_and_all_steps_is_ddpm(ldm_schedule, data_cond, ddpm_samples):
  eps_fn = gaussian_eps_fn(ldm_schedule)
  samples = jax.jit(lambda key: df.ddim_sample(eps_fn, ldm_schedule, data_cond, key, SHAPE,
                                               ldm_schedule.num_timesteps, eta=1.0))(jax.random.key(0))
  # Same keys give the same path up to float32 rounding, hence the same first two moments.
  np.testing.assert_allclose(samples, ddpm_samples, atol=2e-3)
  np.testing.assert_allclose(samples.mean(0), ddpm_samples.mean(0), atol=1e-3)
  np.testing.assert_allclose(samples.std(0), ddpm_samples.std(0), rtol=1e-3)


def test_deterministic_ddim_recovers_the_data_and_ignores_the_step_keys(ldm_schedule, data_cond):
  eps_fn = gaussian_eps_fn(ldm_schedule)
  x_init = jax.random.normal(jax.random.key(12), SHAPE)
  sample = jax.jit(lambda key, eta: df.ddim_sample(eps_fn, ldm_schedule, data_cond, key, SHAPE,
                                                   ldm_schedule.num_timesteps, eta=eta, x_init=x_init))
  first, second = sample(jax.random.key(1), 0.0), sample(jax.random.key(2), 0.0)
  np.testing.assert_array_equal(first, second)
  assert_moments(first, DATA_MEAN, DATA_STD, mean_tol=0.05, std_rel_tol=0.04)
  stochastic = sample(jax.random.key(1), 1.0), sample(jax.random.key(2), 1.0)
  assert np.abs(np.asarray(stochastic[0] - stochastic[1])).mean() > 0.1


def test_few_step_ddim_lands_close(ldm_schedule, data_cond):
  eps_fn = gaussian_eps_fn(ldm_schedule)
  samples = jax.jit(lambda key: df.ddim_sample(eps_fn, ldm_schedule, data_cond, key, SHAPE, 50))(
      jax.random.key(13))
  assert_moments(samples, DATA_MEAN, DATA_STD, mean_tol=0.05, std_rel_tol=0.1)


def test_ddim_timesteps():
  np.testing.assert_array_equal(df.ddim_timesteps(10, 10), np.arange(9, -1, -1))
  steps = df.ddim_timesteps(1000, 50)
  assert steps[0] == 999 and steps[-1] == 0 and len(np.unique(steps)) == 50 and np.all(np.diff(steps) < 0)
  np.testing.assert_array_equal(df.ddim_timesteps(1000, 1), [999])
  for bad in (0, 1001):
    with pytest.raises(ValueError, match="num_steps"):
      df.ddim_timesteps(1000, bad)


def test_x_init_shape_is_checked(ldm_schedule, data_cond):
  with pytest.raises(ValueError, match="x_init"):
    df.ddim_sample(gaussian_eps_fn(ldm_schedule), ldm_schedule, data_cond, jax.random.key(0), SHAPE, 5,
                   x_init=jnp.zeros((3, 2)))


# ----- latent standardisation -----


@pytest.mark.parametrize("per_dimension", [False, True])
def test_latent_standardisation_round_trip(per_dimension):
  latents = jnp.array([3.0, -2.0, 0.0]) + jnp.array([1.0, 4.0, 0.0]) * jax.random.normal(
      jax.random.key(14), (1000, 3))
  stats = df.fit_latent_stats(latents, per_dimension=per_dimension)
  standardized = df.standardize(latents, stats)
  if per_dimension:
    np.testing.assert_allclose(standardized.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(standardized.std(0), [1, 1, 0], atol=1e-5)  # a constant dimension keeps std 1
  else:
    np.testing.assert_allclose(standardized.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(standardized.std(), 1, atol=1e-5)
    assert stats.mean.shape == ()
  np.testing.assert_allclose(df.unstandardize(standardized, stats), latents, atol=1e-5)
