"""Few-shot splits in memory, exemplar/variation batches as the reference trains, and class augmentation.

LatentMatters trains its autoencoder and diffusion model on every drawing of the training categories, shuffled
each epoch, each paired with its category's exemplar (`exemplar_type='first'`: one fixed drawing per category;
`'shuffle'`: a random drawing of the same category each time). With `augment_class`, the reference makes new
categories by applying one random transform to both the exemplar and the variation: a horizontal flip, a
vertical flip or the identity (probability 0.2 each) or a random affine map (0.4; rotation within +-90
degrees, translation up to 30% of the side, scale 0.5-1.5, shear within +-30 degrees on both axes, nearest
neighbour sampling, zero fill).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

EXEMPLAR_MODES = ("first", "shuffle")
AFFINE_DEGREES = 90.0
AFFINE_TRANSLATE = 0.3
AFFINE_SCALE = (0.5, 1.5)
AFFINE_SHEAR = 30.0
AUGMENT_PROBABILITIES = (0.2, 0.2, 0.2, 0.4)  # horizontal flip, vertical flip, identity, affine


@dataclasses.dataclass(frozen=True)
class FewShotSplit:
  """One split of a few-shot drawing set, sorted by category.

  images: uint8 [N, S, S], ink = `max_value`, background = 0.
  labels: int32 [N], category index in 0..C-1 (categories sorted by name).
  category_names: C names.
  exemplar_index: int64 [C], the index into `images` of each category's exemplar.
  max_value: 1 for binary images, 255 for grey ones.
  """
  images: np.ndarray
  labels: np.ndarray
  category_names: tuple[str, ...]
  exemplar_index: np.ndarray
  max_value: int

  def __post_init__(self):
    if len(self.labels) != len(self.images):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels.")
    if np.any(np.diff(self.labels) < 0):
      raise ValueError("Images must be sorted by label.")

  @property
  def num_categories(self) -> int:
    return len(self.category_names)

  @property
  def image_size(self) -> int:
    return self.images.shape[-1]

  def exemplars(self) -> np.ndarray:
    """The exemplar of each category, uint8 [C, S, S]."""
    return self.images[self.exemplar_index]

  def as_float(self, images: np.ndarray) -> np.ndarray:
    """float32 [..., S, S, 1] in [0, 1] from stored uint8 images."""
    return (images.astype(np.float32) / self.max_value)[..., None]

  @classmethod
  def from_categories(cls, records: Sequence[Mapping[str, np.ndarray]], max_value: int) -> FewShotSplit:
    """Builds a split from one record per category (keys images [K, S, S], label, category, exemplar)."""
    if not records:
      raise ValueError("The split has no categories.")
    records = sorted(records, key=lambda r: int(r["label"]))
    labels = [int(r["label"]) for r in records]
    if labels != list(range(len(records))):
      raise ValueError(f"Category labels must be 0..C-1 without gaps or repeats; got {labels[:10]}...")
    counts = np.array([len(r["images"]) for r in records])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    exemplars = np.array([int(r["exemplar"]) for r in records])
    if np.any((exemplars < 0) | (exemplars >= counts)):
      raise ValueError("An exemplar index lies outside its category.")
    return cls(
        images=np.concatenate([r["images"] for r in records]).astype(np.uint8),
        labels=np.repeat(np.arange(len(records), dtype=np.int32), counts),
        category_names=tuple(_to_str(r["category"]) for r in records),
        exemplar_index=offsets + exemplars,
        max_value=max_value)


def _to_str(value) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode() if isinstance(value, bytes) else str(value)


def _affine_inverse_maps(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
  """Random inverse affine maps [count, 2, 3] (output pixel -> input pixel), about the image centre."""
  angle = np.deg2rad(rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES, count))
  max_shift = AFFINE_TRANSLATE * size
  shift = np.round(rng.uniform(-max_shift, max_shift, (count, 2)))
  scale = rng.uniform(*AFFINE_SCALE, count)
  shear = np.deg2rad(rng.uniform(-AFFINE_SHEAR, AFFINE_SHEAR, (count, 2)))
  cos, sin = np.cos(angle), np.sin(angle)
  rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
  shearing = np.stack([np.stack([np.ones(count), np.tan(shear[:, 0])], -1),
                       np.stack([np.tan(shear[:, 1]), np.ones(count)], -1)], -2)
  forward = scale[:, None, None] * rotation @ shearing
  inverse = np.linalg.inv(forward)
  centre = (size - 1) / 2.0
  offset = centre - np.einsum("nij,nj->ni", inverse, centre + shift)
  return np.concatenate([inverse, offset[..., None]], axis=-1)


def affine_warp(images: np.ndarray, inverse_maps: np.ndarray) -> np.ndarray:
  """Warps images [N, S, S] by inverse maps [N, 2, 3] (xy) with nearest-neighbour sampling, zero outside."""
  size = images.shape[-1]
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  out_xy = np.stack([x.ravel(), y.ravel(), np.ones(size * size)], 0).astype(np.float64)
  source = np.einsum("nij,jp->nip", inverse_maps, out_xy)
  sx, sy = np.round(source[:, 0]).astype(np.int64), np.round(source[:, 1]).astype(np.int64)
  inside = (sx >= 0) & (sx < size) & (sy >= 0) & (sy < size)
  batch = np.arange(len(images))[:, None]
  values = images[batch, np.clip(sy, 0, size - 1), np.clip(sx, 0, size - 1)]
  return np.where(inside, values, 0).reshape(images.shape).astype(images.dtype)


def augment_class(exemplars: np.ndarray, variations: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies one random transform per pair to both images [N, S, S]; returns them and the choice per pair.

  Choices: 0 horizontal flip, 1 vertical flip, 2 identity, 3 random affine (same parameters for both).
  """
  if exemplars.shape != variations.shape:
    raise ValueError(f"exemplars {exemplars.shape} and variations {variations.shape} must have one shape.")
  count, size = exemplars.shape[0], exemplars.shape[-1]
  choice = rng.choice(4, size=count, p=AUGMENT_PROBABILITIES)
  maps = _affine_inverse_maps(rng, count, size)
  pair = np.stack([exemplars, variations], 1)
  out = pair.copy()
  out[choice == 0] = pair[choice == 0][..., ::-1]
  out[choice == 1] = pair[choice == 1][..., ::-1, :]
  affine = choice == 3
  if affine.any():
    warped = affine_warp(pair[affine].reshape(-1, size, size), np.repeat(maps[affine], 2, axis=0))
    out[affine] = warped.reshape(-1, 2, size, size)
  return out[:, 0], out[:, 1], choice


def num_batches(split: FewShotSplit, batch_size: int, drop_last: bool = True) -> int:
  count = len(split.labels)
  return count // batch_size if drop_last else -(-count // batch_size)


def epoch_pairs(split: FewShotSplit, batch_size: int, seed: int, epoch: int = 0, *, exemplar: str = "first",
                drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.random.Generator]]:
  """One epoch of (variation indices, exemplar indices, rng) per batch: every drawing once in a seeded random
  order, each paired with an exemplar of its category. The rng is the epoch's, for further per-batch draws."""
  if exemplar not in EXEMPLAR_MODES:
    raise ValueError(f"exemplar must be one of {EXEMPLAR_MODES}; got {exemplar!r}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive; got {batch_size}.")
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(split.labels))
  starts = np.searchsorted(split.labels, np.arange(split.num_categories))
  counts = np.bincount(split.labels, minlength=split.num_categories)
  for b in range(num_batches(split, batch_size, drop_last)):
    index = order[b * batch_size:(b + 1) * batch_size]
    labels = split.labels[index]
    if exemplar == "first":
      exemplar_index = split.exemplar_index[labels]
    else:
      exemplar_index = starts[labels] + (rng.random(len(index)) * counts[labels]).astype(np.int64)
    yield index, exemplar_index, rng


def epoch_batches(split: FewShotSplit, batch_size: int, seed: int, epoch: int = 0, *,
                  exemplar: str = "first", augment: bool = False,
                  drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of batches (pairs from `epoch_pairs`).

  Yields dicts with `exemplar` and `variation` float32 [B, S, S, 1] in [0, 1] and `label` int32 [B]. The
  same (seed, epoch) gives the same batches.
  """
  for index, exemplar_index, rng in epoch_pairs(split, batch_size, seed, epoch, exemplar=exemplar,
                                                drop_last=drop_last):
    exemplars, variations = split.images[exemplar_index], split.images[index]
    if augment:
      exemplars, variations, _ = augment_class(exemplars, variations, rng)
    yield {"exemplar": split.as_float(exemplars), "variation": split.as_float(variations),
           "label": split.labels[index].astype(np.int32)}


def batches(split: FewShotSplit, batch_size: int, seed: int, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches, epoch after epoch (see `epoch_batches` for the options)."""
  if num_batches(split, batch_size, kwargs.get("drop_last", True)) == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the split's {len(split.labels)} drawings.")
  epoch = 0
  while True:
    yield from epoch_batches(split, batch_size, seed, epoch, **kwargs)
    epoch += 1
