"""The two critics of the diversity-vs-recognizability evaluation, their losses, and the published weights.

Both critics share the few-shot backbone of Boutin et al. (2022): four blocks of (3x3 conv with 64
channels and padding 1, batch norm, ReLU, 2x2 max-pool) on 50x50 drawings with ink = 1, which leave
64x3x3 maps; these are flattened in PyTorch's channel-major (NCHW) order so that the published linear
weights apply unchanged, then ReLU and a linear layer to the 256-d `embedding`.
- SimCLR critic: `projection` 256 -> 128, trained with NT-Xent (tau 0.5) on augmented views. The
  evaluation uses the 256-d embedding (before the projection, not normalised) for diversity and
  originality.
- Prototypical critic: `metric_layer` 256 -> 128, trained on 60-way 1-shot episodes with squared L2
  distances to prototypes. Recognizability classifies queries with the 128-d metric-layer output.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxldm import torch_import
from trainkit import data_root as data_root_lib

IMAGE_SIZE = 50
EMBEDDING_SIZE = 256
HEAD_SIZE = 128
CHANNELS = 64
NUM_BLOCKS = 4
BN_EPSILON = 1e-5

PUBLISHED_CRITICS = {
    "simclr": ("critics/omniglot_simclr_z256.pt",
               "a8d7175fe240f6d05f0368261f956a5a62076f51ae97c6baa34ad90d449ce368", "projection.0"),
    "protonet": ("critics/omniglot_protonet_z256.pt",
                 "1155cd7cf5be21d165c015fb1e2e65ae373ed2105359013f601d2d6a076bf447", "metric_layer"),
}
_HOW_TO_GET = ("The published Omniglot critics are `trained_model/{proto_net,simclr}/*/_best.model` of "
               "github.com/serre-lab/diversity_vs_recognizability; save them under <data root>/critics/ as "
               "omniglot_protonet_z256.pt and omniglot_simclr_z256.pt.")


class ConvBlock(nnx.Module):
  """3x3 conv (padding 1) -> batch norm -> ReLU -> 2x2 max-pool (floor, as PyTorch's MaxPool2d)."""

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_channels, out_channels, (3, 3), padding=1, rngs=rngs)
    # PyTorch momentum 0.1 on the new batch statistic = Flax momentum 0.9 on the running one.
    self.norm = nnx.BatchNorm(out_channels, momentum=0.9, epsilon=BN_EPSILON, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.norm(self.conv(x)))
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class Backbone(nnx.Module):
  """Four conv blocks, NCHW flatten, ReLU, linear to the embedding: [B, 50, 50, 1] -> [B, 256]."""

  def __init__(self, embedding_size: int = EMBEDDING_SIZE, *, rngs: nnx.Rngs):
    channels = [1] + [CHANNELS] * NUM_BLOCKS
    self.blocks = nnx.List([ConvBlock(c_in, c_out, rngs=rngs) for c_in, c_out in zip(channels, channels[1:])])
    side = IMAGE_SIZE
    for _ in range(NUM_BLOCKS):
      side //= 2
    self.linear = nnx.Linear(CHANNELS * side * side, embedding_size, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
      raise ValueError(f"critic inputs must be [batch, {IMAGE_SIZE}, {IMAGE_SIZE}, 1] with ink = 1, "
                       f"got shape {images.shape}")
    x = images
    for block in self.blocks:
      x = block(x)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return self.linear(jax.nn.relu(x))


class SimCLRCritic(nnx.Module):
  """Feature critic: returns (256-d embedding, 128-d projection)."""

  def __init__(self, embedding_size: int = EMBEDDING_SIZE, *, rngs: nnx.Rngs):
    self.embedding = Backbone(embedding_size, rngs=rngs)
    self.projection = nnx.Linear(embedding_size, HEAD_SIZE, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.embedding(images)
    return features, self.projection(features)


class ProtoNetCritic(nnx.Module):
  """Prototypical critic: returns (256-d embedding, 128-d metric-layer output)."""

  def __init__(self, embedding_size: int = EMBEDDING_SIZE, *, rngs: nnx.Rngs):
    self.embedding = Backbone(embedding_size, rngs=rngs)
    self.metric_layer = nnx.Linear(embedding_size, HEAD_SIZE, rngs=rngs)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = self.embedding(images)
    return features, self.metric_layer(features)


# ----------------------------------------------------------------------------------------------------
# Losses.


def nt_xent_loss(projection_a: jax.Array, projection_b: jax.Array, temperature: float = 0.5) -> jax.Array:
  """SimCLR NT-Xent loss of paired views [B, D] x 2: mean over the 2B anchors of -log softmax(positive)."""
  z = jnp.concatenate([projection_a, projection_b], axis=0)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  n = projection_a.shape[0]
  logits = (z @ z.T) / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()


def prototype_logits(support: jax.Array, queries: jax.Array, way: int, shot: int) -> jax.Array:
  """-(squared L2 distance) of each query [Q, D] to the class means of `support` [way * shot, D].

  `support` is class-major: rows [c * shot, (c + 1) * shot) belong to class c.
  """
  prototypes = support.reshape(way, shot, -1).mean(axis=1)
  return -jnp.sum((queries[:, None, :] - prototypes[None, :, :]) ** 2, axis=-1)


def prototypical_loss(support: jax.Array, queries: jax.Array, way: int, shot: int
                      ) -> tuple[jax.Array, jax.Array]:
  """(mean NLL, accuracy) of class-major queries (`queries_per_class` consecutive rows per class)."""
  if queries.shape[0] % way:
    raise ValueError(f"{queries.shape[0]} queries cannot be split evenly over way={way} classes")
  labels = jnp.repeat(jnp.arange(way), queries.shape[0] // way)
  logits = prototype_logits(support, queries, way, shot)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


# ----------------------------------------------------------------------------------------------------
# Contrastive augmentation (the "normal" strength of the reference): per image one of a random resized
# crop, a random affine map, or a random perspective (applied with probability 1/2); zero fill; then
# min-max scaling and binarisation at 0.5. Each is a homography from output to input pixel coordinates.


def _resized_crop_homography(key: jax.Array, size: int) -> jax.Array:
  k_area, k_ratio, k_x, k_y = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, minval=0.75, maxval=1.33)
  ratio = jnp.exp(jax.random.uniform(k_ratio, minval=math.log(0.8), maxval=math.log(1.2)))
  width = jnp.minimum(jnp.sqrt(area * ratio), 1.0) * size
  height = jnp.minimum(jnp.sqrt(area / ratio), 1.0) * size
  x0 = jax.random.uniform(k_x) * (size - width)
  y0 = jax.random.uniform(k_y) * (size - height)
  return jnp.array([[width / size, 0.0, x0], [0.0, height / size, y0], [0.0, 0.0, 1.0]])


def _affine_homography(key: jax.Array, size: int) -> jax.Array:
  k_angle, k_scale, k_shear, k_shift = jax.random.split(key, 4)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, minval=-15.0, maxval=15.0))
  scale = jax.random.uniform(k_scale, minval=0.75, maxval=1.33)
  shear = jnp.deg2rad(jax.random.uniform(k_shear, minval=-10.0, maxval=10.0))
  shift = jax.random.uniform(k_shift, (2,), minval=-0.1, maxval=0.1) * size
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  linear = scale * jnp.array([[cos, -sin], [sin, cos]]) @ jnp.array([[1.0, jnp.tan(shear)], [0.0, 1.0]])
  center = jnp.full((2,), size / 2.0)
  forward = jnp.eye(3).at[:2, :2].set(linear).at[:2, 2].set(center + shift - linear @ center)
  return jnp.linalg.inv(forward)


def _homography_from_points(source: jax.Array, target: jax.Array) -> jax.Array:
  """The 3x3 homography mapping four `source` points [4, 2] onto `target` points [4, 2]."""
  rows = []
  rhs = []
  for i in range(4):
    (x, y), (u, v) = source[i], target[i]
    rows.append(jnp.stack([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y]))
    rows.append(jnp.stack([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y]))
    rhs.extend([u, v])
  h = jnp.linalg.solve(jnp.stack(rows), jnp.stack(rhs))
  return jnp.append(h, 1.0).reshape(3, 3)


def _perspective_homography(key: jax.Array, size: int, distortion: float = 0.5) -> jax.Array:
  k_apply, k_corners = jax.random.split(key)
  corners = jnp.array([[0.0, 0.0], [size, 0.0], [size, size], [0.0, size]])
  inward = jnp.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
  offsets = jax.random.uniform(k_corners, (4, 2)) * distortion * size / 2.0
  homography = _homography_from_points(corners, corners + inward * offsets)
  return jnp.where(jax.random.bernoulli(k_apply), homography, jnp.eye(3))


def _warp(image: jax.Array, homography: jax.Array) -> jax.Array:
  """Samples `image` [H, W] bilinearly at homography(output pixel centre), zero outside."""
  size = image.shape[0]
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  y, x = jnp.meshgrid(centres, centres, indexing="ij")
  points = homography @ jnp.stack([x.ravel(), y.ravel(), jnp.ones(size * size)])
  src_x, src_y = points[0] / points[2] - 0.5, points[1] / points[2] - 0.5
  sampled = jax.scipy.ndimage.map_coordinates(image, [src_y, src_x], order=1, mode="constant", cval=0.0)
  return sampled.reshape(size, size)


def binarize(images: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Per-image min-max scaling to [0, 1], then 1 where above `threshold` (a blank image stays 0)."""
  axes = tuple(range(1, images.ndim))
  low = images.min(axis=axes, keepdims=True)
  span = images.max(axis=axes, keepdims=True) - low
  scaled = jnp.where(span > 0, (images - low) / jnp.where(span > 0, span, 1.0), 0.0)
  return (scaled > threshold).astype(images.dtype)


@jax.jit
def contrastive_augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """One random view of each image [B, H, W, 1] (ink = 1), binarised like the reference's views."""

  def one(key, image):
    k_choice, k_crop, k_affine, k_perspective = jax.random.split(key, 4)
    size = image.shape[0]
    homographies = jnp.stack([_resized_crop_homography(k_crop, size), _affine_homography(k_affine, size),
                              _perspective_homography(k_perspective, size)])
    return _warp(image[..., 0], homographies[jax.random.randint(k_choice, (), 0, 3)])[..., None]

  views = jax.vmap(one)(jax.random.split(key, images.shape[0]), images)
  return binarize(views)


# ----------------------------------------------------------------------------------------------------
# Training: the step is a pure function of a pytree state, jitted once.


class CriticTrainState(NamedTuple):
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  step: jax.Array


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation
                     ) -> tuple[nnx.GraphDef, CriticTrainState]:
  """Splits `model` in training mode (batch statistics) into a graph and a train state."""
  model.train()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
  return graphdef, CriticTrainState(params, batch_stats, tx.init(params), jnp.zeros((), jnp.int32))


def to_model(graphdef: nnx.GraphDef, state: CriticTrainState) -> nnx.Module:
  """The trained critic in evaluation mode (running batch statistics)."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  model.eval()
  return model


def _apply_gradients(tx, state: CriticTrainState, grads: nnx.State, model: nnx.Module) -> CriticTrainState:
  """One optimizer update; the batch statistics are those `model` holds after its training-mode pass."""
  _, _, batch_stats = nnx.split(model, nnx.Param, ...)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return CriticTrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state, state.step + 1)


def make_simclr_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                           temperature: float = 0.5) -> Callable:
  """step(state, images [B, 50, 50, 1], key) -> (state, {'loss'}): two augmented views, NT-Xent."""

  def loss_fn(model, view_a, view_b):
    _, projection_a = model(view_a)
    _, projection_b = model(view_b)
    return nt_xent_loss(projection_a, projection_b, temperature)

  @jax.jit
  def step(state: CriticTrainState, images: jax.Array, key: jax.Array):
    key_a, key_b = jax.random.split(key)
    view_a, view_b = contrastive_augment(key_a, images), contrastive_augment(key_b, images)
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    loss, grads = nnx.value_and_grad(loss_fn)(model, view_a, view_b)
    return _apply_gradients(tx, state, grads, model), {"loss": loss}

  return step


def make_protonet_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                             way: int = 60, shot: int = 1) -> Callable:
  """step(state, support [way*shot, 50, 50, 1], queries [way*q, 50, 50, 1]) -> (state, {'loss', 'accuracy'}).

  Both are class-major; support and queries go through the network as one batch, as in the reference.
  """

  def loss_fn(model, support, queries):
    _, metric = model(jnp.concatenate([support, queries], axis=0))
    return prototypical_loss(metric[:way * shot], metric[way * shot:], way, shot)

  @jax.jit
  def step(state: CriticTrainState, support: jax.Array, queries: jax.Array):
    if support.shape[0] != way * shot:
      raise ValueError(f"support has {support.shape[0]} images, expected way*shot = {way}*{shot}")
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, support, queries)
    return _apply_gradients(tx, state, grads, model), {"loss": loss, "accuracy": accuracy}

  return step


# ----------------------------------------------------------------------------------------------------
# Published weights.


def _assign_backbone(backbone: Backbone, tensors: dict[str, np.ndarray]) -> None:
  for index, block in enumerate(backbone.blocks):
    conv, norm = f"embedding.{index}.0", f"embedding.{index}.1"
    block.conv.kernel[...] = jnp.asarray(tensors[f"{conv}.weight"].transpose(2, 3, 1, 0))  # OIHW -> HWIO
    block.conv.bias[...] = jnp.asarray(tensors[f"{conv}.bias"])
    block.norm.scale[...] = jnp.asarray(tensors[f"{norm}.weight"])
    block.norm.bias[...] = jnp.asarray(tensors[f"{norm}.bias"])
    block.norm.mean[...] = jnp.asarray(tensors[f"{norm}.running_mean"])
    block.norm.var[...] = jnp.asarray(tensors[f"{norm}.running_var"])
  # Index 6 of the reference's nn.Sequential: after the 4 blocks, Flatten (4) and ReLU (5).
  backbone.linear.kernel[...] = jnp.asarray(tensors["embedding.6.weight"].T)
  backbone.linear.bias[...] = jnp.asarray(tensors["embedding.6.bias"])


def critic_from_state_dict(kind: str, tensors: dict[str, np.ndarray]) -> SimCLRCritic | ProtoNetCritic:
  """Builds a critic of `kind` ('simclr' or 'protonet') in eval mode from a reference state dict."""
  if kind not in PUBLISHED_CRITICS:
    raise ValueError(f"unknown critic kind {kind!r}; valid: {sorted(PUBLISHED_CRITICS)}")
  head_name = PUBLISHED_CRITICS[kind][2]
  embedding_size = tensors["embedding.6.weight"].shape[0]
  expected = {f"embedding.{i}.{j}.{p}" for i in range(NUM_BLOCKS) for j, p in
              [(0, "weight"), (0, "bias"), (1, "weight"), (1, "bias"), (1, "running_mean"), (1, "running_var"),
               (1, "num_batches_tracked")]}
  expected |= {"embedding.6.weight", "embedding.6.bias", f"{head_name}.weight", f"{head_name}.bias"}
  if set(tensors) != expected:
    raise ValueError(f"state dict does not match the {kind} critic: missing {sorted(expected - set(tensors))}, "
                     f"unexpected {sorted(set(tensors) - expected)}")
  cls = SimCLRCritic if kind == "simclr" else ProtoNetCritic
  model = cls(embedding_size, rngs=nnx.Rngs(0))
  _assign_backbone(model.embedding, tensors)
  head = model.projection if kind == "simclr" else model.metric_layer
  head.kernel[...] = jnp.asarray(tensors[f"{head_name}.weight"].T)
  head.bias[...] = jnp.asarray(tensors[f"{head_name}.bias"])
  model.eval()
  return model


def load_published_critic(kind: str, data_root: str | os.PathLike | None = None
                          ) -> SimCLRCritic | ProtoNetCritic:
  """The published Omniglot critic `kind` ('simclr' or 'protonet'), checksum-verified, in eval mode."""
  if kind not in PUBLISHED_CRITICS:
    raise ValueError(f"unknown critic kind {kind!r}; valid: {sorted(PUBLISHED_CRITICS)}")
  relative, sha256, _ = PUBLISHED_CRITICS[kind]
  path = data_root_lib.require_file(Path(data_root_lib.resolve(data_root)) / relative, _HOW_TO_GET, sha256)
  return critic_from_state_dict(kind, torch_import.load_state_dict(path))
