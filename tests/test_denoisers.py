"""Latent MLP U-Net and pixel conv U-Net: shapes, time and null-condition behaviour, and a tiny learning run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxldm import denoisers
from jaxldm import diffusion as df

LATENT = 6


def fast_rngs(seed: int) -> nnx.Rngs:
  """RBG keys: initialising many differently shaped parameters compiles far less than with threefry."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def latent_model():
  return denoisers.LatentUNet(LATENT, dim=16, time_dim=32, heads=2, head_dim=8, rngs=fast_rngs(0))


@pytest.fixture(scope="module")
def latent_apply(latent_model):
  graphdef, state = nnx.split(latent_model)
  apply = jax.jit(lambda state, x, t, c, drop: nnx.merge(graphdef, state)(x, t, c, drop))
  return lambda x, t, c, drop: apply(state, x, t, c, drop)


@pytest.fixture(scope="module")
def pixel_model():
  return denoisers.PixelUNet(features=8, dim_mults=(1, 2), heads=1, head_dim=8, rngs=fast_rngs(1))


@pytest.fixture(scope="module")
def pixel_outputs(pixel_model):
  """One jitted call on a batch of four 48x48 images: same image and exemplar, varied time and dropping."""
  image = jax.random.uniform(jax.random.key(2), (1, 48, 48, 1))
  exemplar = jax.random.uniform(jax.random.key(3), (1, 48, 48, 1))
  x = jnp.tile(image, (4, 1, 1, 1))
  cond = jnp.concatenate([exemplar, exemplar, exemplar, jnp.zeros_like(exemplar)])
  t = jnp.array([10, 400, 10, 10])
  drop = jnp.array([False, False, True, False])
  graphdef, state = nnx.split(pixel_model)
  return jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, cond, drop))(state)


def test_sinusoidal_embedding_matches_numpy():
  t = np.array([0.0, 3.0, 250.0])
  dim = 8
  freqs = np.exp(-math.log(10000.0) / 3 * np.arange(4))
  expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(denoisers.sinusoidal_embedding(jnp.asarray(t), dim), expected, atol=1e-5)
  with pytest.raises(ValueError, match="even"):
    denoisers.sinusoidal_embedding(jnp.asarray(t), 7)


def test_latent_unet_reference_widths():
  model = nnx.eval_shape(lambda: denoisers.LatentUNet(64, rngs=nnx.Rngs(0)))
  assert model.input.in_features == 128 and model.input.out_features == 64
  assert [level.down.out_features for level in model.downs] == [64, 32]
  assert [level.up.out_features for level in model.ups] == [64, 64]
  assert model.final_block.linear1.in_features == 128
  with pytest.raises(ValueError, match="groups"):
    denoisers.LatentUNet(8, dim=12, rngs=nnx.Rngs(0))


def test_latent_unet_time_and_null_condition(latent_apply):
  x = jax.random.normal(jax.random.key(4), (4, LATENT))
  cond = jax.random.normal(jax.random.key(5), (4, LATENT))
  t = jnp.array([3, 3, 3, 3])
  keep = jnp.zeros(4, bool)
  out = latent_apply(x, t, cond, keep)
  assert out.shape == (4, LATENT) and bool(jnp.all(jnp.isfinite(out)))
  later = latent_apply(x, t + 500, cond, keep)
  assert float(jnp.abs(later - out).min()) > 1e-4
  dropped = latent_apply(x, t, cond, jnp.array([True, False, True, False]))
  zero_cond = latent_apply(x, t, jnp.zeros_like(cond), keep)
  np.testing.assert_allclose(dropped[::2], zero_cond[::2], atol=1e-6)
  np.testing.assert_allclose(dropped[1::2], out[1::2], atol=1e-6)  # rows do not interact
  assert float(jnp.abs(dropped[::2] - out[::2]).min()) > 1e-4
  with pytest.raises(ValueError, match="cond"):
    latent_apply(x, t, cond[:, :3], keep)


def test_latent_unet_learns_a_conditional_problem(latent_model):
  """Each exemplar determines its target latent; the trained denoiser's loss drops and depends on the exemplar."""
  schedule = df.make_schedule("scaled_linear", num_timesteps=100)
  exemplars = jax.random.normal(jax.random.key(6), (4, LATENT))
  targets = jnp.tanh(exemplars @ jax.random.normal(jax.random.key(7), (LATENT, LATENT))) * 1.5
  cond = jnp.repeat(exemplars, 16, axis=0)
  x0 = jnp.repeat(targets, 16, axis=0)
  graphdef, params = nnx.split(latent_model)
  optimizer = optax.adam(3e-3)

  def loss_fn(params, key, cond, drop_prob):
    return df.diffusion_loss(nnx.merge(graphdef, params), schedule, x0, cond, key, drop_prob)

  @jax.jit
  def train(params, key):
    def step(carry, key):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, key, cond, 0.1)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, 150))
    return params, losses

  eval_keys = jax.random.split(jax.random.key(9), 16)
  evaluate = jax.jit(lambda params, cond: jnp.mean(jax.vmap(lambda k: loss_fn(params, k, cond, 0.0))(eval_keys)))
  initial = evaluate(params, cond)
  trained_params, losses = train(params, jax.random.key(10))
  trained = evaluate(trained_params, cond)
  shuffled = evaluate(trained_params, jnp.roll(cond, 16, axis=0))
  assert np.isfinite(np.asarray(losses)).all()
  assert trained < 0.5 * initial and trained < 0.7, (initial, trained)  # predicting zero scores 1.0
  assert shuffled > 1.5 * trained, (trained, shuffled)


def test_pixel_unet_on_48x48_with_stacked_exemplar(pixel_model, pixel_outputs):
  assert pixel_model.input.in_features == 2
  assert pixel_outputs.shape == (4, 48, 48, 1) and bool(jnp.all(jnp.isfinite(pixel_outputs)))
  reference, later, dropped, zero_exemplar = pixel_outputs
  assert float(jnp.abs(later - reference).mean()) > 1e-3
  assert float(jnp.abs(dropped - reference).mean()) > 1e-3
  np.testing.assert_allclose(dropped, zero_exemplar, atol=1e-5)


def test_pixel_unet_rejects_bad_shapes(pixel_model):
  image = jnp.zeros((1, 47, 47, 1))
  with pytest.raises(ValueError, match="divisible by 2"):
    pixel_model(image, jnp.array([0]), image)
  with pytest.raises(ValueError, match="dim_mults"):
    denoisers.PixelUNet(features=8, dim_mults=(1,), rngs=nnx.Rngs(0))
