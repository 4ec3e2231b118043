"""Latent regularisers against NumPy statements of their formulas, finite differences, spec parsing, views, and
one jitted training step with every compatible loss at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxldm import latent_losses as ll
from jaxldm.autoencoder import Encoding, VectorQuantiser


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _numpy_kl(mean, logvar):
  per_dim = 0.5 * (np.exp(logvar) + mean ** 2 - 1.0 - logvar)
  return per_dim.sum(axis=1).mean()


def _numpy_nt_xent(a, b, tau):
  z = np.concatenate([a, b])
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  sim = z @ z.T
  n = len(a)
  total = 0.0
  for i in range(2 * n):
    partner = (i + n) % (2 * n)
    denominator = sum(np.exp(sim[i, k] / tau) for k in range(2 * n) if k != i)
    total += -np.log(np.exp(sim[i, partner] / tau) / denominator)
  return total / (2 * n)


def _numpy_standardise(x, eps=1e-5):
  return (x - x.mean(0)) / np.sqrt(x.var(0) + eps)


def _numpy_barlow(a, b, lam):
  c = _numpy_standardise(a).T @ _numpy_standardise(b) / len(a)
  on = sum((c[i, i] - 1.0) ** 2 for i in range(len(c)))
  off = sum(c[i, j] ** 2 for i in range(len(c)) for j in range(len(c)) if i != j)
  return on + lam * off


def _numpy_prototype(v, e):
  d = ((v[:, None, :] - e[None, :, :]) ** 2).sum(-1)
  logp = _log_softmax(-d)
  return -np.mean([logp[i, i] for i in range(len(v))])


def _numpy_projector(projector: ll.Projector, x: np.ndarray) -> np.ndarray:
  h = x @ np.asarray(projector.first.kernel[...])
  h = _numpy_standardise(h) * np.asarray(projector.norm.scale[...]) + np.asarray(projector.norm.bias[...])
  return np.maximum(h, 0.0) @ np.asarray(projector.second.kernel[...])


def _finite_difference_check(fn, *args, eps=1e-6, rtol=1e-5, atol=1e-7):
  """Compares jax.grad of a scalar fn of float64 arrays with central differences in every coordinate."""
  grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
  batched = jax.jit(jax.vmap(fn))
  for index, (arg, grad) in enumerate(zip(args, grads)):
    steps = eps * np.eye(arg.size).reshape((arg.size,) + arg.shape)
    def evaluate(sign):
      shifted = [jnp.broadcast_to(a, (arg.size,) + a.shape) for a in args]
      shifted[index] = jnp.asarray(np.asarray(arg) + sign * steps)
      return np.asarray(batched(*shifted))
    numeric = ((evaluate(1.0) - evaluate(-1.0)) / (2 * eps)).reshape(arg.shape)
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def pairs():
  rng = np.random.default_rng(0)
  return rng.normal(size=(5, 3)), rng.normal(size=(5, 3))


# Formulas.

def test_kl_matches_numpy_and_finite_differences(pairs):
  mean, logvar = pairs
  np.testing.assert_allclose(ll.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar)),
                             _numpy_kl(mean, logvar), rtol=1e-5)
  assert float(ll.kl_to_standard_normal(jnp.zeros((2, 3)), jnp.zeros((2, 3)))) == 0.0
  with jax.enable_x64(True):
    _finite_difference_check(ll.kl_to_standard_normal, jnp.asarray(mean), jnp.asarray(logvar))


def test_nt_xent_matches_numpy_and_finite_differences(pairs):
  a, b = pairs
  np.testing.assert_allclose(ll.nt_xent(jnp.asarray(a), jnp.asarray(b), 0.5), _numpy_nt_xent(a, b, 0.5), rtol=1e-5)
  aligned = ll.nt_xent(jnp.asarray(a), jnp.asarray(2.0 * a), 0.5)
  assert float(aligned) < float(ll.nt_xent(jnp.asarray(a), jnp.asarray(b), 0.5))
  with jax.enable_x64(True):
    _finite_difference_check(lambda x, y: ll.nt_xent(x, y, 0.5), jnp.asarray(a), jnp.asarray(b))


def test_barlow_matches_numpy_and_finite_differences(pairs):
  a, b = pairs
  np.testing.assert_allclose(ll.barlow_twins(jnp.asarray(a), jnp.asarray(b), 0.005), _numpy_barlow(a, b, 0.005),
                             rtol=1e-4)
  with jax.enable_x64(True):
    _finite_difference_check(lambda x, y: ll.barlow_twins(x, y, 0.005), jnp.asarray(a), jnp.asarray(b),
                             rtol=1e-4, atol=1e-6)


def test_prototype_matches_numpy_and_finite_differences(pairs):
  v, e = pairs
  loss, accuracy = ll.prototype_cross_entropy(jnp.asarray(v), jnp.asarray(e))
  np.testing.assert_allclose(loss, _numpy_prototype(v, e), rtol=1e-5)
  distances = ((v[:, None] - e[None]) ** 2).sum(-1)
  np.testing.assert_allclose(accuracy, np.mean(distances.argmin(1) == np.arange(len(v))))
  _, perfect = ll.prototype_cross_entropy(jnp.asarray(e), jnp.asarray(e))
  assert float(perfect) == 1.0
  with jax.enable_x64(True):
    _finite_difference_check(lambda x, y: ll.prototype_cross_entropy(x, y)[0], jnp.asarray(v), jnp.asarray(e))


# Vector quantisation.

@pytest.fixture(scope="module")
def quantiser_and_latents():
  quantiser = VectorQuantiser(8, codebook_size=16, rngs=nnx.Rngs(0))
  quantiser.codebook[...] = jax.random.normal(jax.random.key(1), (16, 4))
  latents = jax.random.normal(jax.random.key(2), (3, 8))
  return quantiser, latents


def test_vq_nearest_code_matches_brute_force(quantiser_and_latents):
  quantiser, latents = quantiser_and_latents
  codebook = np.asarray(quantiser.codebook[...])
  words = np.asarray(latents).reshape(3, 2, 4)
  expected = np.array([[np.argmin([np.sum((w - c) ** 2) for c in codebook]) for w in row] for row in words])
  np.testing.assert_array_equal(quantiser.nearest(latents), expected)


def test_vq_forward_is_the_quantised_vector(quantiser_and_latents):
  quantiser, latents = quantiser_and_latents
  code, codewords, indices = quantiser(latents)
  expected = np.asarray(quantiser.codebook[...])[np.asarray(indices)].reshape(3, 8)
  np.testing.assert_allclose(code, expected, atol=1e-6)
  np.testing.assert_array_equal(codewords, expected)


def test_vq_straight_through_passes_the_gradient_unchanged(quantiser_and_latents):
  quantiser, latents = quantiser_and_latents
  upstream = jax.random.normal(jax.random.key(3), latents.shape)
  grad = jax.grad(lambda z: jnp.sum(quantiser(z)[0] * upstream))(latents)
  np.testing.assert_allclose(grad, upstream, rtol=1e-6)


def test_vq_terms_match_formula_and_move_the_right_side(quantiser_and_latents):
  quantiser, latents = quantiser_and_latents
  code, codewords, _ = quantiser(latents)
  loss_module = ll.VQLoss()
  loss, metrics = loss_module(ll.LatentInputs(Encoding(mean=latents, code=code, codewords=codewords)))
  squared = np.mean((np.asarray(latents) - np.asarray(codewords)) ** 2)
  np.testing.assert_allclose(metrics["vq_commitment"], squared, rtol=1e-6)
  np.testing.assert_allclose(metrics["vq_codebook"], squared, rtol=1e-6)
  np.testing.assert_allclose(loss, (1.0 + 2.5) * squared, rtol=1e-6)
  commitment_grad = jax.grad(lambda z: ll.vq_terms(z, codewords)[0])(latents)
  np.testing.assert_allclose(commitment_grad, 2 * (latents - codewords) / latents.size, rtol=1e-5)
  assert float(jnp.abs(jax.grad(lambda z: ll.vq_terms(z, codewords)[1])(latents)).max()) == 0.0
  assert float(jnp.abs(jax.grad(lambda q: ll.vq_terms(latents, q)[0])(codewords)).max()) == 0.0


def test_vq_rejects_latent_not_divisible_by_word_size():
  with pytest.raises(ValueError, match="multiple of the VQ word size 4"):
    VectorQuantiser(6, rngs=nnx.Rngs(0))


# Modules.

@pytest.fixture(scope="module")
def latent_pairs():
  rng = np.random.default_rng(1)
  return rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)


def test_barlow_module_projects_then_correlates(latent_pairs):
  a, b = latent_pairs
  module = ll.BarlowLoss(8, rngs=nnx.Rngs(0))
  inputs = ll.LatentInputs(Encoding(mean=jnp.asarray(a), code=jnp.asarray(a)), view=jnp.asarray(b))
  expected = _numpy_barlow(_numpy_projector(module.projector, a), _numpy_projector(module.projector, b), 0.005)
  loss, _ = module(inputs)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  assert module.projector.first.kernel.shape == (8, 8) and module.projector.second.kernel.shape == (8, 8)


def test_prototype_module_projects_to_128(latent_pairs):
  v, e = latent_pairs
  module = ll.PrototypeLoss(8, rngs=nnx.Rngs(0))
  inputs = ll.LatentInputs(Encoding(mean=jnp.asarray(v), code=jnp.asarray(v)), exemplar=jnp.asarray(e))
  loss, _ = module(inputs)
  expected = _numpy_prototype(_numpy_projector(module.projector, v), _numpy_projector(module.projector, e))
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  assert module.projector.second.kernel.shape == (128, 128)


def test_classification_module_is_cross_entropy_of_a_linear_head(latent_pairs):
  a, _ = latent_pairs
  labels = np.array([0, 1, 2, 3, 4, 0])
  module = ll.ClassificationLoss(8, 5, rngs=nnx.Rngs(0))
  loss, metrics = module(ll.LatentInputs(Encoding(mean=jnp.asarray(a), code=jnp.asarray(a)),
                                         label=jnp.asarray(labels)))
  logits = a @ np.asarray(module.head.kernel[...]) + np.asarray(module.head.bias[...])
  np.testing.assert_allclose(loss, -np.mean(_log_softmax(logits)[np.arange(6), labels]), rtol=1e-5)
  np.testing.assert_allclose(metrics["classification_accuracy"], np.mean(logits.argmax(1) == labels))


def test_simclr_and_kl_modules_use_the_right_fields(latent_pairs):
  a, b = latent_pairs
  logvar = 0.1 * b
  encoding = Encoding(mean=jnp.asarray(a), code=jnp.asarray(a), logvar=jnp.asarray(logvar))
  simclr, _ = ll.SimCLRLoss()(ll.LatentInputs(encoding, target_view=jnp.asarray(b)))
  np.testing.assert_allclose(simclr, _numpy_nt_xent(a, b, 0.5), rtol=1e-5)
  kl, _ = ll.KLLoss()(ll.LatentInputs(encoding))
  np.testing.assert_allclose(kl, _numpy_kl(a, logvar), rtol=1e-5)
  with pytest.raises(ValueError, match="bottleneck='gaussian'"):
    ll.KLLoss()(ll.LatentInputs(Encoding(mean=jnp.asarray(a), code=jnp.asarray(a))))


def test_weighted_sum_and_requirements(latent_pairs):
  a, b = latent_pairs
  losses = ll.build_latent_losses("barlow:30,simclr:0.5", 8, None, nnx.Rngs(0))
  assert losses.requires == {"view", "target_view"}
  assert losses.bottleneck == "deterministic"
  inputs = ll.LatentInputs(Encoding(mean=jnp.asarray(a), code=jnp.asarray(a)), view=jnp.asarray(b),
                           target_view=jnp.asarray(b))
  total, metrics = losses(inputs)
  np.testing.assert_allclose(total, 30 * metrics["barlow_loss"] + 0.5 * metrics["simclr_loss"], rtol=1e-6)
  none_total, _ = ll.build_latent_losses("none", 8, None, nnx.Rngs(0))(inputs)
  assert float(none_total) == 0.0


# Spec parsing.

@pytest.mark.parametrize("spec, expected", [
    ("barlow:30,prototype:1", {"barlow": 30.0, "prototype": 1.0}),
    (" kl : 0.5 , classification:2 ", {"kl": 0.5, "classification": 2.0}),
    ("vq:1,simclr:1e-1", {"vq": 1.0, "simclr": 0.1}),
    ("none", {"none": 0.0}),
    ("prototype:0", {"prototype": 0.0}),
])
def test_parse_valid_specs(spec, expected):
  assert ll.parse_latent_spec(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("barlw:30", r"unknown latent loss 'barlw'.*valid: barlow, classification, kl, none, prototype, simclr, vq"),
    ("barlow", r"missing weight for 'barlow'.*barlow:WEIGHT"),
    ("barlow:", r"missing weight for 'barlow'"),
    ("barlow:-1", r"weight '-1' of 'barlow'.*>= 0"),
    ("barlow:abc", r"weight 'abc' of 'barlow'.*not a number"),
    ("barlow:nan", r"weight 'nan' of 'barlow'.*finite"),
    ("kl:1,kl:2", r"'kl' appears twice"),
    ("none,kl:1", r"'none' cannot be combined"),
    ("kl:1,vq:1", r"incompatible bottlenecks"),
    ("", r"empty latent-loss spec"),
    ("kl:1,", r"unknown latent loss ''"),
])
def test_parse_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    ll.parse_latent_spec(spec)


def test_build_chooses_the_bottleneck_and_checks_classes():
  assert ll.build_latent_losses("kl:1,prototype:1", 8, None, nnx.Rngs(0)).bottleneck == "gaussian"
  assert ll.build_latent_losses("vq:1,barlow:1", 8, None, nnx.Rngs(0)).bottleneck == "quantised"
  assert ll.build_latent_losses("simclr:1", 8, None, nnx.Rngs(0)).bottleneck == "deterministic"
  with pytest.raises(ValueError, match="num_classes >= 2"):
    ll.build_latent_losses("classification:1", 8, None, nnx.Rngs(0))


# Views.

def test_affine_warp_identity_shift_and_rotation():
  image = jax.random.uniform(jax.random.key(0), (9, 9, 1))
  identity = ll.affine_warp(image, jnp.eye(2), jnp.zeros(2))
  np.testing.assert_allclose(identity, image, atol=1e-6)
  shifted = ll.affine_warp(image, jnp.eye(2), jnp.array([2.0, -1.0]))
  expected = np.zeros((9, 9, 1), np.float32)
  expected[2:, :8] = np.asarray(image)[:7, 1:]
  np.testing.assert_allclose(shifted, expected, atol=1e-6)
  quarter_turn = ll.affine_warp(image, jnp.array([[0.0, -1.0], [1.0, 0.0]]), jnp.zeros(2))
  np.testing.assert_allclose(quarter_turn, np.rot90(np.asarray(image), 1), atol=1e-5)


def _numpy_bilinear_warp(image, matrix, translation):
  """Output pixel p samples input point matrix^-1 (p - centre - translation) + centre, bilinear, zero outside."""
  height, width, _ = image.shape
  centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
  inverse = np.linalg.inv(matrix)
  out = np.zeros_like(image)
  for r in range(height):
    for c in range(width):
      sr, sc = inverse @ (np.array([r, c]) - centre - translation) + centre
      r0, c0 = int(np.floor(sr)), int(np.floor(sc))
      for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        rr, cc = r0 + dr, c0 + dc
        if 0 <= rr < height and 0 <= cc < width:
          out[r, c] += (1 - abs(sr - rr)) * (1 - abs(sc - cc)) * image[rr, cc]
  return out


def test_affine_warp_matches_a_numpy_bilinear_sampler():
  rng = np.random.default_rng(0)
  image = rng.uniform(size=(11, 8, 2)).astype(np.float32)
  matrix = np.array([[0.9, 0.3], [-0.25, 1.2]])
  translation = np.array([1.3, -0.6])
  warped = ll.affine_warp(jnp.asarray(image), jnp.asarray(matrix, jnp.float32),
                          jnp.asarray(translation, jnp.float32))
  expected = _numpy_bilinear_warp(image.astype(np.float64), matrix, translation)
  assert np.abs(expected).sum() > 0 and (expected == 0).any()  # the map moves ink across the border
  np.testing.assert_allclose(warped, expected, atol=1e-5)


def test_random_affine_is_jittable_keyed_and_bounded():
  images = jax.random.uniform(jax.random.key(0), (3, 48, 48, 1))
  augment = jax.jit(ll.random_affine)
  first = augment(jax.random.key(1), images)
  assert first.shape == images.shape
  np.testing.assert_array_equal(first, augment(jax.random.key(1), images))
  assert float(jnp.abs(first - augment(jax.random.key(2), images)).mean()) > 1e-3
  assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
  assert float(jnp.abs(first[0] - first[1] - (images[0] - images[1])).mean()) > 1e-3


# One training step with every loss compatible with the Gaussian bottleneck.

ALL_LOSSES = "kl:0.5,classification:2,prototype:1,simclr:3,barlow:0.1"


@pytest.fixture(scope="module")
def two_steps():
  autoencoder, losses = ll.build_autoencoder_and_losses(ALL_LOSSES, 16, 4, nnx.Rngs(0))
  state, step = ll.make_train_step(autoencoder, losses, ll.make_optimizer(1e-3), ema_momentum=0.9)
  rng = np.random.default_rng(0)
  batch = {"variation": jnp.asarray(rng.uniform(size=(4, 48, 48, 1)), jnp.float32),
           "exemplar": jnp.asarray(rng.uniform(size=(4, 48, 48, 1)), jnp.float32),
           "label": jnp.array([0, 1, 2, 3])}
  initial = jax.tree.map(np.asarray, state)
  after_one, first_metrics = step(state, batch, jax.random.key(0))
  after_one = jax.tree.map(np.asarray, after_one)
  after_two, second_metrics = step(jax.tree.map(jnp.asarray, after_one), batch, jax.random.key(1))
  return autoencoder, initial, after_one, jax.tree.map(np.asarray, after_two), first_metrics, second_metrics


def test_step_reports_every_term_and_sums_them_with_their_own_weights(two_steps):
  *_, metrics, _ = two_steps
  weights = ll.parse_latent_spec(ALL_LOSSES)
  for name in weights:
    assert np.isfinite(float(metrics[f"{name}_loss"])), name
  expected = float(metrics["reconstruction_loss"]) + sum(w * float(metrics[f"{n}_loss"]) for n, w in weights.items())
  np.testing.assert_allclose(float(metrics["total_loss"]), expected, rtol=1e-5)


def test_step_updates_params_batch_stats_and_the_ema_target(two_steps):
  autoencoder, initial, after_one, after_two, *_ = two_steps
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), initial["params"], after_one["params"])
  assert all(value > 0 for value in jax.tree.leaves(moved))
  assert int(after_two["step"]) == 2
  stats_moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), initial["batch_stats"], after_one["batch_stats"])
  assert max(jax.tree.leaves(stats_moved)) > 0
  online_kernel = after_two["params"][0]["encoder"]["to_mean"]["kernel"][...]
  expected = 0.9 * after_one["target"]["to_mean"]["kernel"][...] + 0.1 * online_kernel
  np.testing.assert_allclose(after_two["target"]["to_mean"]["kernel"][...], expected, rtol=1e-5, atol=1e-7)


def test_episode_loss_needs_the_target_encoder_for_simclr():
  losses = ll.build_latent_losses("simclr:1", 8, None, nnx.Rngs(0))
  batch = {"variation": jnp.zeros((2, 48, 48, 1)), "exemplar": jnp.zeros((2, 48, 48, 1)), "label": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"\['simclr'\] need the EMA target encoder"):
    ll.episode_loss(None, losses, batch, jax.random.key(0))
