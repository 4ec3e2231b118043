"""Pluggable latent regularisers for the autoencoder, chosen by a spec such as `'barlow:30,prototype:1'`.

Total loss = reconstruction + sum_k weight_k * loss_k (LatentMatters `train_RAE.py`). Each regulariser is an
`nnx.Module` subclass of `LatentLoss` in the `LATENT_LOSSES` registry. It declares what it needs (`requires`: a
subset of `INPUT_KINDS`) and which autoencoder bottleneck (`bottleneck`) it works with; `episode_loss` supplies
exactly those inputs. All regularisers act on the code the decoder sees (sample, quantised vector or encoder
output), as in the reference.

When a loss needs an augmented view (`simclr`, `barlow`), both the variation and its partner view are random
affine warps of the variation, and the warped variation is also the one reconstructed (the reference's
`pairing='augmentation'`). The reference's evaluation loss weights the KL term with the classification weight;
here each term always carries its own weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxldm.autoencoder import BATCH_NORM_MOMENTUM, Autoencoder, Encoder, Encoding, reconstruction_loss

INPUT_KINDS = ("exemplar", "view", "target_view", "label")
BATCH_NORM_EPSILON = 1e-5
SIMCLR_TEMPERATURE = 0.5
EMA_MOMENTUM = 0.99
BARLOW_OFF_DIAGONAL_WEIGHT = 0.005
PROTOTYPE_PROJECTION = 128
VQ_COMMITMENT_WEIGHT = 1.0
VQ_CODEBOOK_WEIGHT = 2.5


@dataclasses.dataclass(frozen=True)
class LatentInputs:
  """What the regularisers see for one batch; fields a loss does not require may be None.

  variation: the Encoding of the (possibly augmented) variations, the images being reconstructed.
  exemplar: codes [B, d] of each variation's category exemplar (online encoder).
  view: codes [B, d] of an augmented partner view of each variation (online encoder).
  target_view: codes [B, d] of the same partner view from the EMA target encoder (no gradient).
  label: training-category index [B].
  """

  variation: Encoding
  exemplar: jax.Array | None = None
  view: jax.Array | None = None
  target_view: jax.Array | None = None
  label: jax.Array | None = None


# Formulas, as pure functions of arrays.

def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over dimensions, averaged over the batch."""
  return jnp.mean(-0.5 * jnp.sum(1.0 + logvar - mean ** 2 - jnp.exp(logvar), axis=-1))


def vq_terms(latents: jax.Array, codewords: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(commitment, codebook) mean squared errors: the first moves the encoder, the second the codebook."""
  commitment = jnp.mean((latents - jax.lax.stop_gradient(codewords)) ** 2)
  codebook = jnp.mean((codewords - jax.lax.stop_gradient(latents)) ** 2)
  return commitment, codebook


def nt_xent(first: jax.Array, second: jax.Array, temperature: float = SIMCLR_TEMPERATURE) -> jax.Array:
  """SimCLR's normalised-temperature cross-entropy; row i of `first` and of `second` are a positive pair and
  every other row of either is a negative. Averaged over the 2B anchors."""
  both = jnp.concatenate([first, second], axis=0)
  both = both / jnp.maximum(jnp.linalg.norm(both, axis=-1, keepdims=True), 1e-8)
  logits = both @ both.T / temperature
  size = both.shape[0]
  logits = jnp.where(jnp.eye(size, dtype=bool), -jnp.inf, logits)
  partner = (jnp.arange(size) + size // 2) % size
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(log_probs[jnp.arange(size), partner])


def standardise(features: jax.Array, epsilon: float = BATCH_NORM_EPSILON) -> jax.Array:
  """Batch norm without affine parameters, with batch statistics (biased variance)."""
  mean = jnp.mean(features, axis=0)
  variance = jnp.mean((features - mean) ** 2, axis=0)
  return (features - mean) / jnp.sqrt(variance + epsilon)


def barlow_twins(first: jax.Array, second: jax.Array,
                 off_diagonal_weight: float = BARLOW_OFF_DIAGONAL_WEIGHT) -> jax.Array:
  """Barlow Twins: cross-correlation C of the standardised projections; sum (1 - C_ii)^2 + w sum_{i!=j} C_ij^2."""
  correlation = standardise(first).T @ standardise(second) / first.shape[0]
  diagonal = jnp.diagonal(correlation)
  on_diagonal = jnp.sum((diagonal - 1.0) ** 2)
  off_diagonal = jnp.sum(correlation ** 2) - jnp.sum(diagonal ** 2)
  return on_diagonal + off_diagonal_weight * off_diagonal


def squared_distances(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """[Q, K] squared L2 distances."""
  return jnp.sum((queries[:, None, :] - keys[None, :, :]) ** 2, axis=-1)


def prototype_cross_entropy(variations: jax.Array, exemplars: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss, accuracy): cross-entropy of softmax(-squared distance) from variation i to all exemplars, target i."""
  log_probs = jax.nn.log_softmax(-squared_distances(variations, exemplars), axis=-1)
  rows = jnp.arange(variations.shape[0])
  accuracy = jnp.mean(jnp.argmax(log_probs, axis=-1) == rows)
  return -jnp.mean(log_probs[rows, rows]), accuracy


# Regularisers.

class LatentLoss(nnx.Module):
  """One latent regulariser: `__call__(LatentInputs) -> (scalar loss, metrics)`, unweighted."""

  requires: ClassVar[frozenset[str]] = frozenset()
  bottleneck: ClassVar[str] = "deterministic"

  @classmethod
  def build(cls, latent_dim: int, num_classes: int | None, rngs: nnx.Rngs) -> LatentLoss:
    del latent_dim, num_classes, rngs
    return cls()

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError


class NoLatentLoss(LatentLoss):
  """The plain regularised autoencoder: no latent term. As in the reference RAE, its regularisation is the
  optimiser's L2 weight decay on all parameters (`make_optimizer`, 1e-5)."""

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    return jnp.zeros((), inputs.variation.code.dtype), {}


class KLLoss(LatentLoss):
  """VAE-style: Gaussian posterior, KL to N(0, I); the weight is beta."""

  bottleneck = "gaussian"

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    encoding = inputs.variation
    if encoding.logvar is None:
      raise ValueError("the 'kl' loss needs an autoencoder built with bottleneck='gaussian'")
    return kl_to_standard_normal(encoding.mean, encoding.logvar), {}


class VQLoss(LatentLoss):
  """VQ-VAE terms for the quantised bottleneck (words of 4, codebook of 512).

  Weights follow the reference (`commit_vq=2.5` multiplies the codebook term, the encoder commitment term has
  weight 1), i.e. VQ-VAE's beta = 0.4 up to an overall scale, not the VQ-VAE paper's 0.25.
  """

  bottleneck = "quantised"

  def __init__(self, commitment_weight: float = VQ_COMMITMENT_WEIGHT, codebook_weight: float = VQ_CODEBOOK_WEIGHT):
    self.commitment_weight = commitment_weight
    self.codebook_weight = codebook_weight

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    encoding = inputs.variation
    if encoding.codewords is None:
      raise ValueError("the 'vq' loss needs an autoencoder built with bottleneck='quantised'")
    commitment, codebook = vq_terms(encoding.mean, encoding.codewords)
    loss = self.commitment_weight * commitment + self.codebook_weight * codebook
    return loss, {"vq_commitment": commitment, "vq_codebook": codebook}


class ClassificationLoss(LatentLoss):
  """A linear head over the training categories, cross-entropy."""

  requires = frozenset({"label"})

  def __init__(self, latent_dim: int, num_classes: int, *, rngs: nnx.Rngs):
    self.head = nnx.Linear(latent_dim, num_classes, rngs=rngs)

  @classmethod
  def build(cls, latent_dim: int, num_classes: int | None, rngs: nnx.Rngs) -> ClassificationLoss:
    if num_classes is None or num_classes < 2:
      raise ValueError(f"the 'classification' loss needs num_classes >= 2, got {num_classes}")
    return cls(latent_dim, num_classes, rngs=rngs)

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits = self.head(inputs.variation.code)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, inputs.label))
    return loss, {"classification_accuracy": jnp.mean(jnp.argmax(logits, -1) == inputs.label)}


class Projector(nnx.Module):
  """Linear (no bias) -> batch norm -> ReLU -> linear (no bias), the reference's projection head."""

  def __init__(self, in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
    self.first = nnx.Linear(in_features, hidden, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(hidden, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, rngs=rngs)
    self.second = nnx.Linear(hidden, out_features, use_bias=False, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.second(jax.nn.relu(self.norm(self.first(features))))


class PrototypeLoss(LatentLoss):
  """Prototypical-network loss: project (d-128-128), classify each variation among the batch's exemplars by
  softmax(-squared distance), target its own exemplar."""

  requires = frozenset({"exemplar"})

  def __init__(self, latent_dim: int, *, rngs: nnx.Rngs):
    self.projector = Projector(latent_dim, PROTOTYPE_PROJECTION, PROTOTYPE_PROJECTION, rngs=rngs)

  @classmethod
  def build(cls, latent_dim: int, num_classes: int | None, rngs: nnx.Rngs) -> PrototypeLoss:
    del num_classes
    return cls(latent_dim, rngs=rngs)

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss, accuracy = prototype_cross_entropy(self.projector(inputs.variation.code), self.projector(inputs.exemplar))
    return loss, {"prototype_accuracy": accuracy}


class SimCLRLoss(LatentLoss):
  """NT-Xent (tau = 0.5) between the variation's code and the EMA target encoder's code of a partner view."""

  requires = frozenset({"target_view"})

  def __init__(self, temperature: float = SIMCLR_TEMPERATURE):
    self.temperature = temperature

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    return nt_xent(inputs.variation.code, inputs.target_view, self.temperature), {}


class BarlowLoss(LatentLoss):
  """Barlow Twins between the projected (d-d-d) codes of the variation and of a partner view."""

  requires = frozenset({"view"})

  def __init__(self, latent_dim: int, off_diagonal_weight: float = BARLOW_OFF_DIAGONAL_WEIGHT, *, rngs: nnx.Rngs):
    self.projector = Projector(latent_dim, latent_dim, latent_dim, rngs=rngs)
    self.off_diagonal_weight = off_diagonal_weight

  @classmethod
  def build(cls, latent_dim: int, num_classes: int | None, rngs: nnx.Rngs) -> BarlowLoss:
    del num_classes
    return cls(latent_dim, rngs=rngs)

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    first = self.projector(inputs.variation.code)
    second = self.projector(inputs.view)
    return barlow_twins(first, second, self.off_diagonal_weight), {}


LATENT_LOSSES: dict[str, type[LatentLoss]] = {
    "none": NoLatentLoss,
    "kl": KLLoss,
    "vq": VQLoss,
    "classification": ClassificationLoss,
    "prototype": PrototypeLoss,
    "simclr": SimCLRLoss,
    "barlow": BarlowLoss,
}


def parse_latent_spec(spec: str) -> dict[str, float]:
  """'barlow:30,prototype:1' -> {'barlow': 30.0, 'prototype': 1.0}. `none` needs no weight and stands alone;
  `kl` and `vq` choose different bottlenecks and cannot be combined."""
  valid = ", ".join(sorted(LATENT_LOSSES))
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"empty latent-loss spec {spec!r}; write NAME:WEIGHT[,NAME:WEIGHT...] with NAME in: {valid} "
                     "(or 'none' for the plain autoencoder)")
  weights: dict[str, float] = {}
  for item in spec.split(","):
    name, sep, weight_text = (part.strip() for part in item.partition(":"))
    if name not in LATENT_LOSSES:
      raise ValueError(f"unknown latent loss {name!r} in spec {spec!r}; valid: {valid}")
    if name in weights:
      raise ValueError(f"latent loss {name!r} appears twice in spec {spec!r}")
    if not sep and name == "none":
      weights[name] = 0.0
      continue
    if not weight_text:
      raise ValueError(f"missing weight for {name!r} in spec {spec!r}; write {name}:WEIGHT")
    try:
      weight = float(weight_text)
    except ValueError:
      raise ValueError(f"weight {weight_text!r} of {name!r} in spec {spec!r} is not a number") from None
    if not math.isfinite(weight) or weight < 0:
      raise ValueError(f"weight {weight_text!r} of {name!r} in spec {spec!r} must be finite and >= 0")
    weights[name] = weight
  if "none" in weights and len(weights) > 1:
    raise ValueError(f"'none' cannot be combined with other latent losses in spec {spec!r}")
  bottlenecks = {LATENT_LOSSES[name].bottleneck for name in weights} - {"deterministic"}
  if len(bottlenecks) > 1:
    raise ValueError(f"spec {spec!r} asks for incompatible bottlenecks {sorted(bottlenecks)} ('kl' and 'vq')")
  return weights


class LatentLosses(nnx.Module):
  """The weighted set of regularisers of one spec; `__call__` returns (sum of weighted losses, metrics)."""

  def __init__(self, weights: Mapping[str, float], latent_dim: int, num_classes: int | None, *, rngs: nnx.Rngs):
    self.weights = dict(weights)
    self.losses = nnx.Dict({name: LATENT_LOSSES[name].build(latent_dim, num_classes, rngs) for name in weights})

  @property
  def requires(self) -> frozenset[str]:
    return frozenset().union(*(loss.requires for loss in self.losses.values()))

  @property
  def bottleneck(self) -> str:
    kinds = {loss.bottleneck for loss in self.losses.values()} - {"deterministic"}
    return kinds.pop() if kinds else "deterministic"

  def __call__(self, inputs: LatentInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    total = jnp.zeros((), inputs.variation.code.dtype)
    metrics: dict[str, jax.Array] = {}
    for name, loss_module in self.losses.items():
      value, extra = loss_module(inputs)
      total = total + self.weights[name] * value
      metrics[f"{name}_loss"] = value
      metrics.update(extra)
    return total, metrics


def build_latent_losses(spec: str | Mapping[str, float], latent_dim: int, num_classes: int | None,
                        rngs: nnx.Rngs) -> LatentLosses:
  """Builds the regularisers of a spec string (or an already parsed {name: weight})."""
  weights = parse_latent_spec(spec) if isinstance(spec, str) else dict(spec)
  return LatentLosses(weights, latent_dim, num_classes, rngs=rngs)


def build_autoencoder_and_losses(spec: str, latent_dim: int, num_classes: int | None,
                                 rngs: nnx.Rngs) -> tuple[Autoencoder, LatentLosses]:
  """The autoencoder with the bottleneck the spec's losses need, and those losses."""
  losses = build_latent_losses(spec, latent_dim, num_classes, rngs)
  return Autoencoder(latent_dim, bottleneck=losses.bottleneck, rngs=rngs), losses


# Views.

def affine_warp(image: jax.Array, matrix: jax.Array, translation: jax.Array) -> jax.Array:
  """Warps one [H, W, C] image: output pixel p shows input pixel matrix^-1 (p - centre - translation) + centre
  (pixel coordinates (row, column)), bilinear, zero outside."""
  height, width = image.shape[:2]
  centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0], image.dtype)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=image.dtype), jnp.arange(width, dtype=image.dtype),
                            indexing="ij")
  out = jnp.stack([rows.ravel(), cols.ravel()])
  (a, b), (c, d) = matrix
  inverse = jnp.array([[d, -b], [-c, a]]) / (a * d - b * c)  # closed form: no LAPACK call inside the train step
  source = inverse @ (out - (centre + translation)[:, None]) + centre[:, None]

  def warp_channel(channel: jax.Array) -> jax.Array:
    return jax.scipy.ndimage.map_coordinates(channel, list(source), order=1, mode="constant", cval=0.0)

  return jax.vmap(warp_channel, in_axes=-1, out_axes=-1)(image).reshape(image.shape)


def random_affine(key: jax.Array, images: jax.Array, *, max_rotation_deg: float = 15.0,
                  scale_range: tuple[float, float] = (0.75, 1.33), aspect_range: tuple[float, float] = (0.8, 1.2),
                  max_shear_deg: float = 10.0, max_translation: float = 0.1) -> jax.Array:
  """Independent random affine warps of a batch [B, H, W, C]: rotation, shear, scale with an aspect change, and a
  shift up to `max_translation` of the side; defaults follow the reference's 'normal' contrastive strength."""
  batch, height, width = images.shape[:3]
  keys = jax.random.split(key, 5)

  def uniform(subkey: jax.Array, low: float, high: float) -> jax.Array:
    return jax.random.uniform(subkey, (batch,), images.dtype, low, high)

  angle = jnp.deg2rad(uniform(keys[0], -max_rotation_deg, max_rotation_deg))
  shear = jnp.deg2rad(uniform(keys[1], -max_shear_deg, max_shear_deg))
  scale = jnp.exp(uniform(keys[2], *np.log(scale_range)))
  aspect = jnp.sqrt(jnp.exp(uniform(keys[3], *np.log(aspect_range))))
  side = jnp.array([height, width], images.dtype)
  translation = jax.random.uniform(keys[4], (batch, 2), images.dtype, -max_translation, max_translation) * side
  cos, sin, tan = jnp.cos(angle), jnp.sin(angle), jnp.tan(shear)
  rotation = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
  shearing = jnp.stack([jnp.stack([jnp.ones_like(tan), tan], -1),
                        jnp.stack([jnp.zeros_like(tan), jnp.ones_like(tan)], -1)], -2)
  scaling = jax.vmap(jnp.diag)(jnp.stack([scale * aspect, scale / aspect], -1))
  matrices = rotation @ shearing @ scaling
  return jax.vmap(affine_warp)(images, matrices, translation)


# The training objective.

def episode_loss(autoencoder: Autoencoder, latent_losses: LatentLosses, batch: Mapping[str, jax.Array],
                 key: jax.Array, target_encoder: Encoder | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + weighted latent losses for an episode batch {exemplar, variation: [B, 48, 48, 1] in [0, 1],
  label: [B]}. `target_encoder` (the EMA copy of `autoencoder.encoder`) is needed when a loss requires
  'target_view'. Returns (total, metrics)."""
  requires = latent_losses.requires
  if "target_view" in requires and target_encoder is None:
    raise ValueError(f"the latent losses {sorted(latent_losses.weights)} need the EMA target encoder")
  augment_key, view_key, sample_key, exemplar_key, partner_key = jax.random.split(key, 5)
  variation = batch["variation"]
  view_images = None
  if requires & {"view", "target_view"}:
    variation = jax.lax.stop_gradient(variation)  # the views are data: no gradient through the warp
    view_images = random_affine(view_key, variation)
    variation = random_affine(augment_key, variation)
  encoding, reconstruction = autoencoder(variation, sample_key)
  inputs = LatentInputs(variation=encoding)
  if "exemplar" in requires:
    inputs = dataclasses.replace(inputs, exemplar=autoencoder.encode(batch["exemplar"], exemplar_key).code)
  if "view" in requires:
    inputs = dataclasses.replace(inputs, view=autoencoder.encode(view_images, partner_key).code)
  if "target_view" in requires:
    target = autoencoder.apply_bottleneck(*target_encoder(view_images), partner_key).code
    inputs = dataclasses.replace(inputs, target_view=jax.lax.stop_gradient(target))
  if "label" in requires:
    inputs = dataclasses.replace(inputs, label=batch["label"])
  reconstruction_term = reconstruction_loss(variation, reconstruction)
  latent_term, metrics = latent_losses(inputs)
  total = reconstruction_term + latent_term
  return total, {**metrics, "reconstruction_loss": reconstruction_term, "total_loss": total}


def ema_update(target: Any, online: Any, momentum: float = EMA_MOMENTUM) -> Any:
  """target <- momentum * target + (1 - momentum) * online, leaf by leaf, outside any gradient."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(o), target, online)


def make_optimizer(learning_rate: float = 1e-4, weight_decay: float = 1e-5) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient (PyTorch `Adam(weight_decay=...)`), the reference's setup."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))


TrainStep = Callable[[dict[str, Any], Mapping[str, jax.Array], jax.Array], tuple[dict[str, Any], dict[str, jax.Array]]]


def make_train_step(autoencoder: Autoencoder, latent_losses: LatentLosses, optimizer: optax.GradientTransformation,
                    ema_momentum: float = EMA_MOMENTUM) -> tuple[dict[str, Any], TrainStep]:
  """Splits the models once and returns (state, step). `state` is a pytree {params, batch_stats, opt_state,
  target, step}; `target` is the EMA copy of the encoder's whole state (parameters and batch-norm statistics) when a
  loss needs it, else None. `step(state, batch, key) -> (state, metrics)` is a jitted pure function that donates
  `state`; the EMA update follows each optimiser update. Write a state back into the modules with
  `nnx.update((autoencoder, latent_losses), state['params'], state['batch_stats'])`."""
  graphdef, params, batch_stats = nnx.split((autoencoder, latent_losses), nnx.Param, ...)
  encoder_graphdef = nnx.graphdef(autoencoder.encoder)
  target = None
  if "target_view" in latent_losses.requires:
    target = jax.tree.map(jnp.copy, nnx.state(autoencoder.encoder))
  state = {"params": params, "batch_stats": batch_stats, "opt_state": optimizer.init(params), "target": target,
           "step": jnp.zeros((), jnp.int32)}

  def loss_fn(params, batch_stats, target_state, batch, key):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    target_encoder = None if target_state is None else nnx.merge(encoder_graphdef, target_state, copy=True)
    loss, metrics = episode_loss(*model, batch, key, target_encoder)
    return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

  def step(state, batch, key):
    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(
        state["params"], state["batch_stats"], state["target"], batch, key)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    target = state["target"]
    if target is not None:
      online_autoencoder, _ = nnx.merge(graphdef, params, batch_stats)
      target = ema_update(target, nnx.state(online_autoencoder.encoder), ema_momentum)
    new_state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state, "target": target,
                 "step": state["step"] + 1}
    return new_state, metrics

  return state, jax.jit(step, donate_argnums=0)
