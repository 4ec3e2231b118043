"""Exemplar/variation batches and class augmentation on a small synthetic split."""

from __future__ import annotations

import numpy as np
import pytest

from jaxldm.datasets import episodes


def _split(categories: int = 5, per_category: int = 4, size: int = 8) -> episodes.FewShotSplit:
  rng = np.random.default_rng(0)
  records = [{"images": rng.integers(0, 256, (per_category, size, size), dtype=np.uint8), "label": c,
              "category": f"cat{c}", "exemplar": c % per_category} for c in range(categories)]
  return episodes.FewShotSplit.from_categories(records[::-1], max_value=255)


def _row_of(split: episodes.FewShotSplit, image: np.ndarray) -> int:
  stored = split.as_float(split.images)
  rows = np.flatnonzero(np.all(stored == image, axis=(1, 2, 3)))
  assert len(rows) == 1
  return int(rows[0])


def test_from_categories_orders_by_label_and_places_exemplars():
  split = _split()
  assert split.category_names == tuple(f"cat{c}" for c in range(5))
  np.testing.assert_array_equal(split.labels, np.repeat(np.arange(5), 4))
  np.testing.assert_array_equal(split.exemplar_index, np.arange(5) * 4 + np.arange(5) % 4)


def test_from_categories_rejects_gaps():
  records = [{"images": np.zeros((2, 4, 4), np.uint8), "label": label, "category": "x", "exemplar": 0}
             for label in (0, 2)]
  with pytest.raises(ValueError, match="0..C-1"):
    episodes.FewShotSplit.from_categories(records, max_value=1)


@pytest.mark.parametrize("mode", ["first", "shuffle"])
def test_batches_pair_same_category_and_cover_the_epoch(mode):
  split = _split()
  seen = []
  for batch in episodes.epoch_batches(split, 3, seed=1, exemplar=mode, drop_last=False):
    assert batch["exemplar"].shape == batch["variation"].shape == (len(batch["label"]), 8, 8, 1)
    assert batch["exemplar"].dtype == np.float32 and 0.0 <= batch["variation"].min() <= batch["variation"].max() <= 1
    for exemplar, variation, label in zip(batch["exemplar"], batch["variation"], batch["label"]):
      row = _row_of(split, variation)
      assert split.labels[row] == label
      exemplar_row = _row_of(split, exemplar)
      assert split.labels[exemplar_row] == label
      if mode == "first":
        assert exemplar_row == split.exemplar_index[label]
      seen.append(row)
  assert sorted(seen) == list(range(20))


def test_batches_are_seed_deterministic():
  split = _split()
  def labels(seed, epoch):
    return np.concatenate([b["label"] for b in episodes.epoch_batches(
        split, 4, seed, epoch, exemplar="shuffle", augment=True)])
  first = [b for b in episodes.epoch_batches(split, 4, 7, exemplar="shuffle", augment=True)]
  again = [b for b in episodes.epoch_batches(split, 4, 7, exemplar="shuffle", augment=True)]
  for a, b in zip(first, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(labels(7, 0), labels(8, 0))
  assert not np.array_equal(labels(7, 0), labels(7, 1))


def test_drop_last_and_endless_batches():
  split = _split()
  assert episodes.num_batches(split, 6) == 3 and episodes.num_batches(split, 6, drop_last=False) == 4
  stream = episodes.batches(split, 6, seed=0)
  assert len([next(stream) for _ in range(7)]) == 7
  with pytest.raises(ValueError, match="exceeds"):
    next(episodes.batches(split, 50, seed=0))
  with pytest.raises(ValueError, match="exemplar must be one of"):
    next(episodes.epoch_batches(split, 2, seed=0, exemplar="prototype"))


def test_affine_warp_identity_rotation_and_translation():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 2, (3, 6, 6)).astype(np.uint8)
  identity = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (3, 1, 1))
  np.testing.assert_array_equal(episodes.affine_warp(images, identity), images)
  shift = identity.copy()
  shift[:, 0, 2] = -2  # output (x, y) reads input (x - 2, y): content moves right by 2
  expected = np.zeros_like(images)
  expected[..., 2:] = images[..., :-2]
  np.testing.assert_array_equal(episodes.affine_warp(images, shift), expected)
  centre = 2.5  # output (x, y) reads input (c + (y - c), c - (x - c))
  quarter = np.tile(np.array([[0.0, 1, 0], [-1, 0, 2 * centre]]), (3, 1, 1))
  np.testing.assert_array_equal(episodes.affine_warp(images, quarter), np.rot90(images, k=-1, axes=(1, 2)))


def test_augment_class_applies_one_transform_to_both_images():
  rng = np.random.default_rng(0)
  a = (rng.random((64, 12, 12)) < 0.3).astype(np.uint8)
  b = (rng.random((64, 12, 12)) < 0.3).astype(np.uint8)
  a1, b1, choice = episodes.augment_class(a, b, np.random.default_rng(5))
  b2, a2, choice2 = episodes.augment_class(b, a, np.random.default_rng(5))
  np.testing.assert_array_equal(choice, choice2)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(b1, b2)
  same_a, same_b, _ = episodes.augment_class(a, a.copy(), np.random.default_rng(9))
  np.testing.assert_array_equal(same_a, same_b)
  np.testing.assert_array_equal(a1[choice == 0], a[choice == 0][..., ::-1])
  np.testing.assert_array_equal(b1[choice == 1], b[choice == 1][:, ::-1])
  np.testing.assert_array_equal(a1[choice == 2], a[choice == 2])
  assert set(np.unique(choice)) == {0, 1, 2, 3}
  assert not np.array_equal(a1[choice == 3], a[choice == 3])
