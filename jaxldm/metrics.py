"""Originality-vs-recognizability evaluation of one-shot drawing models (Boutin et al. 2022, 2024).

For C test categories, a model draws N samples conditioned on each category's exemplar.
- Diversity of a category: the standard deviation (unbiased) of the samples' SimCLR embeddings across
  samples, averaged over feature dimensions (`3_diversity.py`, l2 variability).
- Originality of a sample: the RMS distance between its SimCLR embedding and the exemplar's, in the
  feature space divided by the normaliser (mean over samples of the std across feature dimensions;
  LatentMatters `Originality_Recognizability.py`).
- Recognizability of a category: accuracy of the prototypical critic on 20-way 1-shot episodes whose
  support is the exemplars of 20 distinct categories and whose queries are one random sample of each.
  Episodes are balanced (each category appears equally often, up to one) and fixed by a seed.
- Generalization curve: within each category, samples are ranked by originality and cut into equal
  bins (rank-based, as the reference); recognizability is measured per bin, then averaged over
  categories and plotted against the bin's mean originality.
Critic inputs are 50x50 with ink = 1, min-max scaled and binarised per image, as the critics were trained.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxldm import critics

EVAL_WAY = 20
NUM_ORIGINALITY_BINS = 10


def prepare_images(images, threshold: float = 0.5, size: int = critics.IMAGE_SIZE) -> jax.Array:
  """[N, H, W] or [N, H, W, 1] images with ink = 1 -> [N, size, size, 1] binary critic inputs.

  Resizes bilinearly (48x48 model outputs become 50x50, as the reference's `Resize(50)`), then scales
  each image to [0, 1] and binarises at `threshold` (0.5 as the critics' training data; LatentMatters
  used 0.3 for generated samples).
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be [N, H, W] or [N, H, W, 1] square grey drawings, got {images.shape}")
  if images.shape[1] != size:
    images = jax.image.resize(images, (images.shape[0], size, size, 1), "bilinear", antialias=True)
  return critics.binarize(images, threshold)


def critic_apply(model: nnx.Module, batch_size: int = 512) -> Callable[[jax.Array], tuple[np.ndarray, np.ndarray]]:
  """A function images [N, 50, 50, 1] -> (embedding [N, 256], head [N, 128]) of `model` in eval mode."""
  model.eval()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

  def apply(images):
    images = jnp.asarray(images, jnp.float32)
    outputs = [forward(state, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return (np.concatenate([np.asarray(f) for f, _ in outputs]),
            np.concatenate([np.asarray(h) for _, h in outputs]))

  return apply


def feature_normalizer(features: np.ndarray) -> float:
  """Mean over samples of the (unbiased) std across feature dimensions; features [..., F]."""
  features = np.asarray(features, np.float64)
  return float(features.reshape(-1, features.shape[-1]).std(axis=-1, ddof=1).mean())


def diversity(sample_features: np.ndarray, normalizer: float = 1.0) -> np.ndarray:
  """Per-category diversity [C] of sample features [C, N, F]: mean over F of the std over N (ddof 1)."""
  sample_features = np.asarray(sample_features, np.float64)
  if sample_features.ndim != 3 or sample_features.shape[1] < 2:
    raise ValueError(f"sample features must be [categories, samples >= 2, features], got {sample_features.shape}")
  return sample_features.std(axis=1, ddof=1).mean(axis=-1) / normalizer


def originality(sample_features: np.ndarray, exemplar_features: np.ndarray, normalizer: float = 1.0
                ) -> np.ndarray:
  """Per-sample originality [C, N]: RMS over F of (sample - exemplar) features, divided by `normalizer`."""
  sample_features = np.asarray(sample_features, np.float64)
  exemplar_features = np.asarray(exemplar_features, np.float64)
  if exemplar_features.shape != (sample_features.shape[0], sample_features.shape[-1]):
    raise ValueError(f"exemplar features {exemplar_features.shape} do not match sample features "
                     f"{sample_features.shape}: expected [categories, features]")
  difference = (sample_features - exemplar_features[:, None, :]) / normalizer
  return np.sqrt(np.mean(difference ** 2, axis=-1))


def originality_bins(sample_originality: np.ndarray, num_bins: int = NUM_ORIGINALITY_BINS) -> np.ndarray:
  """Sample indices [C, num_bins, N // num_bins]: each category's samples sorted by originality, cut evenly."""
  num_categories, num_samples = sample_originality.shape
  if num_bins < 1 or num_samples % num_bins:
    raise ValueError(f"{num_samples} samples per category cannot be cut into num_bins={num_bins} equal bins; "
                     f"use a num_bins that divides {num_samples}")
  order = np.argsort(sample_originality, axis=1, kind="stable")
  return order.reshape(num_categories, num_bins, num_samples // num_bins)


def balanced_episodes(num_categories: int, rounds: int, way: int = EVAL_WAY, seed: int = 44) -> np.ndarray:
  """Episodes [E, way] of distinct categories in which each category appears `rounds` times (up to one).

  As the reference: the category list repeated `rounds` times is cut into windows of
  floor(C / way) * way consecutive entries (all distinct), each window is shuffled and split into
  episodes; a final window too short for a whole episode is dropped.
  """
  if way < 2 or num_categories < way:
    raise ValueError(f"way={way} needs at least 2 and at most num_categories={num_categories}")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  rng = np.random.default_rng(seed)
  sequence = np.tile(np.arange(num_categories), rounds)
  window = (num_categories // way) * way
  episodes = []
  for start in range(0, sequence.size, window):
    chunk = rng.permutation(sequence[start:start + window])
    usable = (chunk.size // way) * way
    episodes.append(chunk[:usable].reshape(-1, way))
  return np.concatenate(episodes)


def recognizability_from_embeddings(exemplar_metric: np.ndarray, sample_metric: np.ndarray,
                                    episodes: np.ndarray, seed: int = 0) -> np.ndarray:
  """Per-category accuracy [C] of nearest-prototype classification on `episodes` [E, way].

  exemplar_metric [C, D] and sample_metric [C, N, D] are prototypical-critic metric outputs; each
  episode's query for category c is one of its N samples, drawn with `seed`.
  """
  exemplar_metric = jnp.asarray(exemplar_metric)
  sample_metric = jnp.asarray(sample_metric)
  num_categories, num_samples = sample_metric.shape[:2]
  episodes = np.asarray(episodes)
  if episodes.min() < 0 or episodes.max() >= num_categories:
    raise ValueError(f"episodes name categories outside [0, {num_categories})")
  picks = np.random.default_rng(seed).integers(num_samples, size=episodes.shape)
  support = exemplar_metric[episodes]
  queries = sample_metric[episodes, picks]
  logits = jax.vmap(lambda s, q: critics.prototype_logits(s, q, episodes.shape[1], 1))(support, queries)
  correct = np.asarray(jnp.argmax(logits, axis=-1) == jnp.arange(episodes.shape[1]))
  appearances = np.bincount(episodes.ravel(), minlength=num_categories)
  hits = np.bincount(episodes[correct], minlength=num_categories)
  return hits / np.maximum(appearances, 1)


def generalization_curve(sample_originality: np.ndarray, bins: np.ndarray, recognizability_per_bin: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(mean originality per bin [B], mean recognizability per bin [B]), averaged over categories."""
  binned = np.take_along_axis(sample_originality, bins.reshape(bins.shape[0], -1), axis=1).reshape(bins.shape)
  return binned.mean(axis=(0, 2)), np.asarray(recognizability_per_bin).mean(axis=0)


def human_gap(model_point, human_point, axis_scale=(1.0, 1.0)) -> float:
  """Euclidean distance between (diversity, recognizability) points, each axis divided by `axis_scale`."""
  delta = (np.asarray(model_point, np.float64) - np.asarray(human_point, np.float64)) / np.asarray(axis_scale)
  return float(np.linalg.norm(delta))


def curve_gap(model_curve: tuple[np.ndarray, np.ndarray], human_curve: tuple[np.ndarray, np.ndarray],
              grid_size: int = 256) -> float:
  """Area between two generalization curves (x = originality, y = recognizability).

  Both are interpolated linearly on a common grid over the union of their originality ranges (held
  constant beyond a curve's ends) and |difference| is integrated with the trapezoid rule.
  """
  (x_model, y_model), (x_human, y_human) = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
                                            for x, y in (model_curve, human_curve)]
  grid = np.linspace(min(x_model.min(), x_human.min()), max(x_model.max(), x_human.max()), grid_size)
  order_model, order_human = np.argsort(x_model), np.argsort(x_human)
  difference = np.abs(np.interp(grid, x_model[order_model], y_model[order_model])
                      - np.interp(grid, x_human[order_human], y_human[order_human]))
  return float(np.trapezoid(difference, grid))


def evaluate(simclr: nnx.Module, protonet: nnx.Module, exemplars, samples, *, rounds: int = 100,
             num_bins: int = NUM_ORIGINALITY_BINS, way: int = EVAL_WAY, seed: int = 44,
             threshold: float = 0.5) -> dict[str, np.ndarray]:
  """All metrics for exemplars [C, H, W(, 1)] and samples [C, N, H, W(, 1)] (ink = 1).

  Returns per-category 'diversity' [C] and 'recognizability' [C], per-sample 'originality' [C, N],
  'recognizability_per_bin' [C, num_bins], and the curve 'curve_originality', 'curve_recognizability'
  [num_bins]; 'normalizer' is the SimCLR feature scale used for diversity and originality.
  """
  samples = np.asarray(samples)
  num_categories, num_samples = samples.shape[:2]
  if np.asarray(exemplars).shape[0] != num_categories:
    raise ValueError(f"{np.asarray(exemplars).shape[0]} exemplars for {num_categories} sample categories")
  exemplar_inputs = prepare_images(exemplars, threshold)
  sample_inputs = prepare_images(samples.reshape(num_categories * num_samples, *samples.shape[2:]), threshold)
  simclr_apply, protonet_apply = critic_apply(simclr), critic_apply(protonet)
  exemplar_features, _ = simclr_apply(exemplar_inputs)
  sample_features = simclr_apply(sample_inputs)[0].reshape(num_categories, num_samples, -1)
  _, exemplar_metric = protonet_apply(exemplar_inputs)
  sample_metric = protonet_apply(sample_inputs)[1].reshape(num_categories, num_samples, -1)

  normalizer = feature_normalizer(sample_features)
  sample_originality = originality(sample_features, exemplar_features, normalizer)
  bins = originality_bins(sample_originality, num_bins)
  episodes = balanced_episodes(num_categories, rounds, way, seed)
  per_bin = np.stack([
      recognizability_from_embeddings(exemplar_metric, np.take_along_axis(
          sample_metric, bins[:, b, :, None], axis=1), episodes, seed + 1 + b) for b in range(num_bins)], axis=1)
  curve_x, curve_y = generalization_curve(sample_originality, bins, per_bin)
  return {
      "diversity": diversity(sample_features, normalizer),
      "recognizability": recognizability_from_embeddings(exemplar_metric, sample_metric, episodes, seed),
      "originality": sample_originality,
      "recognizability_per_bin": per_bin,
      "curve_originality": curve_x,
      "curve_recognizability": curve_y,
      "normalizer": np.asarray(normalizer),
  }
