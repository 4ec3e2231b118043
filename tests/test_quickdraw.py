"""QuickDraw-FS builder (real and test-written files) and the stroke rasteriser."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from jaxldm.datasets import quickdraw_fs, rasterise
from trainkit.data_root import MissingDataError

BITMAP_CATEGORIES = ("apple", "bicycle", "cat", "diamond", "eye", "fish")


def _strokes(data_root, category):
  return quickdraw_fs.read_strokes(data_root / "quickdraw" / "simplified" / f"{category}.ndjson", 25)


def test_rasteriser_matches_the_shipped_bitmaps(data_root):
  """Row i of numpy_bitmap/<c>.npy is drawing i of simplified/<c>.ndjson rendered at 28x28."""
  errors, mismatched = [], []
  for category in BITMAP_CATEGORIES:
    bitmaps = quickdraw_fs.read_bitmaps(data_root / "quickdraw" / "numpy_bitmap" / f"{category}.npy", 25)
    rendered = np.stack([rasterise.rasterise(d, 28) for d in _strokes(data_root, category)]).astype(float)
    errors.append(np.abs(rendered - bitmaps).mean(axis=(1, 2)))
    mismatched.append(np.abs(rendered - np.roll(bitmaps, 1, axis=0)).mean(axis=(1, 2)))
  errors, mismatched = np.concatenate(errors), np.concatenate(mismatched)
  assert errors.mean() < 3.0 and errors.max() < 8.0  # grey levels out of 255
  assert mismatched.mean() > 5 * errors.mean()


def test_rasteriser_invariants():
  line = [[[0, 255], [100, 100]]]
  image = rasterise.rasterise(line, 48).astype(float) / 255
  rows = image.sum(axis=1)
  assert abs(np.argmax(rows) - 23.5) <= 0.5  # centred vertically
  units_per_pixel = (256 + 2 * rasterise.MARGIN + rasterise.LINE_WIDTH) / 48
  expected_area = (255 + rasterise.LINE_WIDTH) * rasterise.LINE_WIDTH / units_per_pixel ** 2
  assert abs(image.sum() - expected_area) / expected_area < 0.1
  shape = [[[10, 80, 150, 10], [20, 200, 40, 20]], [[60], [90]]]
  shifted = [[[x + 50 for x in s[0]], [y + 30 for y in s[1]]] for s in shape]
  mirrored = [[[255 - x for x in s[0]], s[1]] for s in shape]
  np.testing.assert_array_equal(rasterise.rasterise(shape, 40), rasterise.rasterise(shifted, 40))
  np.testing.assert_array_equal(rasterise.rasterise(shape, 40)[:, ::-1], rasterise.rasterise(mirrored, 40))
  dot = rasterise.rasterise([[[128], [128]]], 48)
  assert dot.max() == 255 and dot[0].max() == 0  # a one-point stroke is a round dot
  thick = rasterise.rasterise(shape, 40, line_width=24).astype(int).sum()
  assert thick > rasterise.rasterise(shape, 40).astype(int).sum()
  with pytest.raises(ValueError, match="no points"):
    rasterise.rasterise([], 48)


def _write_tiny_files(root, categories=5, drawings=4):
  strokes, bitmaps = root / "quickdraw" / "simplified", root / "quickdraw" / "numpy_bitmap"
  strokes.mkdir(parents=True)
  bitmaps.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for c in range(categories):
    with open(strokes / f"shape {c}.ndjson", "w") as f:
      for _ in range(drawings):
        points = rng.integers(0, 256, (2, 3 + c)).tolist()
        f.write(json.dumps({"word": f"shape {c}", "recognized": True, "drawing": [points]}) + "\n")
    np.save(bitmaps / f"shape {c}.npy", rng.integers(0, 256, (drawings, 1, 784), dtype=np.uint8))
  return root


def test_builder_on_tiny_files(tmp_path):
  root = _write_tiny_files(tmp_path / "data")
  names = [f"shape {c}" for c in range(5)]
  test_names = quickdraw_fs.test_categories(names, 0.4)
  assert len(test_names) == 2 and test_names == quickdraw_fs.test_categories(names[::-1], 0.4)
  for source in ("strokes", "bitmap"):
    splits = {split: quickdraw_fs.load_quickdraw_fs(root, split, source, 48, 3, 0.4, tfds_dir=tmp_path / "tfds")
              for split in ("train", "test")}
    assert set(splits["test"].category_names) == test_names
    assert set(splits["train"].category_names) == set(names) - test_names
    for data in splits.values():
      assert data.images.shape == (3 * data.num_categories, 48, 48) and data.max_value == 255
      np.testing.assert_array_equal(data.exemplar_index, 3 * np.arange(data.num_categories))
    name = splits["train"].category_names[1]
    if source == "strokes":
      first = quickdraw_fs.read_strokes(root / "quickdraw" / "simplified" / f"{name}.ndjson", 1)[0]
      expected = rasterise.rasterise(first, 48)
    else:
      first = np.load(root / "quickdraw" / "numpy_bitmap" / f"{name}.npy")[0].reshape(28, 28)
      expected = np.asarray(Image.fromarray(first).resize((48, 48), Image.LANCZOS))
    np.testing.assert_array_equal(splits["train"].exemplars()[1], expected)
  with pytest.raises(ValueError, match="drawings_per_category=5"):
    quickdraw_fs.load_quickdraw_fs(root, "train", "strokes", 48, 5, 0.4, tfds_dir=tmp_path / "tfds")


def test_missing_files_and_bad_arguments(tmp_path):
  with pytest.raises(MissingDataError, match="quickdraw/simplified"):
    quickdraw_fs.builder(tmp_path, "strokes", tfds_dir=tmp_path / "tfds")
  with pytest.raises(ValueError, match="source must be one of"):
    quickdraw_fs.builder(tmp_path, "svg")
  with pytest.raises(ValueError, match="test_fraction"):
    quickdraw_fs.test_categories(["a", "b"], 1.5)


def test_builder_on_real_files(data_root, tmp_path_factory):
  tfds_dir = tmp_path_factory.mktemp("tfds")
  strokes = {split: quickdraw_fs.load_quickdraw_fs(data_root, split, "strokes", tfds_dir=tfds_dir)
             for split in ("train", "test")}
  assert strokes["test"].num_categories == round(344 * quickdraw_fs.DEFAULT_TEST_FRACTION)
  assert strokes["train"].num_categories + strokes["test"].num_categories == 344
  for data in strokes.values():
    assert data.images.shape == (20 * data.num_categories, 48, 48)
    ink = data.images.mean(axis=(1, 2)) / 255
    assert ink.min() > 0.01 and ink.max() < 0.6
  bitmaps = {split: quickdraw_fs.load_quickdraw_fs(data_root, split, "bitmap", 48, 100, tfds_dir=tfds_dir)
             for split in ("train", "test")}
  assert bitmaps["train"].num_categories == 5 and bitmaps["test"].num_categories == 1
  assert set(bitmaps["train"].category_names) | set(bitmaps["test"].category_names) == set(BITMAP_CATEGORIES)
  assert bitmaps["train"].images.shape == (500, 48, 48)
