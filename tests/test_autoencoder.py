"""The 48x48 autoencoder: layer sizes, output range, bottlenecks, the fused batch norm, and a tiny run that
learns."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxldm import autoencoder as ae_lib
from jaxldm import latent_losses as ll


def _strokes(count: int, seed: int) -> np.ndarray:
  """Drawings of one horizontal and one vertical bar at random places, ink 1 on 0."""
  rng = np.random.default_rng(seed)
  images = np.zeros((count, 48, 48, 1), np.float32)
  for image in images:
    row, col = rng.integers(8, 40, size=2)
    image[row:row + 3, 6:42] = 1.0
    image[6:42, col:col + 3] = 1.0
  return images


@pytest.fixture(scope="module")
def autoencoder():
  return ae_lib.Autoencoder(64, rngs=nnx.Rngs(0))


def test_encoder_and_decoder_sizes_follow_the_reference(autoencoder):
  shape = jax.ShapeDtypeStruct((2, 48, 48, 1), jnp.float32)
  sizes = []
  for conv in autoencoder.encoder.convs:
    shape = jax.eval_shape(conv, shape)
    sizes.append(shape.shape[1:])
  assert sizes == [(24, 24, 16), (12, 12, 32), (7, 7, 64), (3, 3, 128)]
  assert autoencoder.encoder.to_mean.in_features == 3 * 3 * 128
  shape = jax.ShapeDtypeStruct((2, 6, 6, 128), jnp.float32)
  sizes = []
  for conv in autoencoder.decoder.up_convs:
    shape = jax.eval_shape(conv, shape)
    sizes.append(shape.shape[1:])
  assert sizes == [(12, 12, 64), (24, 24, 32), (48, 48, 16)]
  assert jax.eval_shape(autoencoder.decoder.to_image, shape).shape == (2, 48, 48, 1)


def test_forward_shapes_and_sigmoid_range(autoencoder):
  graphdef, state = nnx.split(autoencoder)

  @jax.jit
  def forward(state, images):
    encoding, reconstruction = nnx.merge(graphdef, state, copy=True)(images)
    return encoding.code, reconstruction

  images = jnp.asarray(_strokes(3, seed=0))
  codes, reconstruction = forward(state, images)
  assert codes.shape == (3, 64)
  assert reconstruction.shape == (3, 48, 48, 1)
  assert float(reconstruction.min()) > 0.0 and float(reconstruction.max()) < 1.0
  assert float(jnp.abs(codes[0] - codes[1]).max()) > 0.0


def test_reconstruction_loss_sums_pixels_and_averages_batch():
  rng = np.random.default_rng(0)
  images, reconstructions = rng.uniform(size=(2, 3, 48, 48, 1)).astype(np.float32)
  expected = np.mean([np.sum((images[i] - reconstructions[i]) ** 2) for i in range(3)])
  np.testing.assert_allclose(ae_lib.reconstruction_loss(images, reconstructions), expected, rtol=1e-5)


def test_gaussian_bottleneck_samples_with_a_key_and_uses_the_mean_without():
  gaussian = ae_lib.Autoencoder(8, bottleneck="gaussian", rngs=nnx.Rngs(0))
  assert gaussian.encoder.to_logvar is not None
  mean = jnp.arange(16.0).reshape(2, 8) / 10
  logvar = -jnp.ones((2, 8))
  without_key = gaussian.apply_bottleneck(mean, logvar, None)
  np.testing.assert_array_equal(without_key.code, mean)
  key = jax.random.key(4)
  sampled = gaussian.apply_bottleneck(mean, logvar, key)
  np.testing.assert_allclose(sampled.code, mean + np.exp(-0.5) * jax.random.normal(key, (2, 8)), rtol=1e-6)
  np.testing.assert_array_equal(sampled.logvar, logvar)


def test_quantised_bottleneck_outputs_codebook_words():
  quantised = ae_lib.Autoencoder(8, bottleneck="quantised", rngs=nnx.Rngs(0))
  assert quantised.quantiser.codebook.shape == (512, 4)
  assert float(jnp.abs(quantised.quantiser.codebook[...]).max()) <= 1.0 / 512
  encoding = quantised.apply_bottleneck(jax.random.normal(jax.random.key(0), (2, 8)) / 512, None, None)
  words = np.asarray(encoding.code).reshape(-1, 4)
  codebook = np.asarray(quantised.quantiser.codebook[...])
  np.testing.assert_allclose(words, codebook[np.asarray(encoding.code_indices).ravel()], atol=1e-7)
  assert encoding.code_indices.shape == (2, 2)


def test_batch_norm_relu_equals_flax_batch_norm_then_relu():
  x = jax.random.normal(jax.random.key(0), (6, 5, 4, 3)) * 2.0 + 1.0
  ours = ae_lib.BatchNormReLU(3, rngs=nnx.Rngs(0))
  reference = nnx.BatchNorm(3, momentum=ae_lib.BATCH_NORM_MOMENTUM, rngs=nnx.Rngs(0))
  for module in (ours, reference):
    module.scale[...] = jnp.array([1.5, -0.5, 0.8])
    module.bias[...] = jnp.array([0.1, 0.2, -0.3])
  weights = jax.random.normal(jax.random.key(1), x.shape)
  loss = lambda model, x: jnp.sum(weights * model(x) ** 2)
  ours_grads = nnx.grad(loss, argnums=(0, 1))(ours, x)
  reference_grads = nnx.grad(lambda m, x: loss(lambda h: jax.nn.relu(m(h)), x), argnums=(0, 1))(reference, x)
  np.testing.assert_allclose(ours(x), jax.nn.relu(reference(x)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_grads[1], reference_grads[1], rtol=1e-4, atol=1e-5)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(getattr(ours_grads[0], name)[...], getattr(reference_grads[0], name)[...],
                               rtol=1e-4, atol=1e-5)
  for name in ("mean", "var"):  # the running statistics moved alike (two training calls each)
    np.testing.assert_allclose(getattr(ours, name)[...], getattr(reference, name)[...], rtol=1e-5, atol=1e-6)
  ours.eval(), reference.eval()
  np.testing.assert_allclose(ours(x), jax.nn.relu(reference(x)), rtol=1e-5, atol=1e-5)


def test_batch_norm_relu_statistics_carry_their_gradient():
  x = jax.random.normal(jax.random.key(2), (7, 3)) + 0.5
  scale, bias = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 0.3, -0.2])

  def fused(x):
    out, mean, var = ae_lib.batch_norm_relu(x, scale, bias, 1e-5)
    return jnp.sum(jnp.sin(out)) + jnp.sum(mean * jnp.arange(3.0)) + jnp.sum(var ** 2)

  def plain(x):
    mean, var = jnp.mean(x, 0), jnp.var(x, 0)
    out = jax.nn.relu((x - mean) / jnp.sqrt(var + 1e-5) * scale + bias)
    return jnp.sum(jnp.sin(out)) + jnp.sum(mean * jnp.arange(3.0)) + jnp.sum(var ** 2)

  np.testing.assert_allclose(jax.grad(fused)(x), jax.grad(plain)(x), rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors(autoencoder):
  with pytest.raises(ValueError, match=r"unknown bottleneck 'vae'; valid: deterministic, gaussian, quantised"):
    ae_lib.Autoencoder(8, bottleneck="vae", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expected images \[B, 48, 48, 1\], got \(2, 28, 28, 1\)"):
    autoencoder.encode(jnp.zeros((2, 28, 28, 1)))


def test_a_tiny_run_learns_to_reconstruct():
  autoencoder, losses = ll.build_autoencoder_and_losses("none", 32, None, nnx.Rngs(0))
  state, step = ll.make_train_step(autoencoder, losses, ll.make_optimizer(learning_rate=3e-3))
  images = jnp.asarray(_strokes(8, seed=1))
  batch = {"variation": images, "exemplar": images, "label": jnp.zeros(8, jnp.int32)}
  history = []
  for index in range(30):
    state, metrics = step(state, batch, jax.random.key(index))
    history.append(float(metrics["reconstruction_loss"]))
  assert history[-1] < 0.25 * history[0], history
  nnx.update((autoencoder, losses), state["params"], state["batch_stats"])
  autoencoder.eval()
  _, reconstruction = autoencoder(images)
  assert float(ae_lib.reconstruction_loss(images, reconstruction)) < 0.5 * history[0]
