"""Omniglot few-shot builder on the real archives (built once into a temporary TFDS folder)."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from jaxldm.datasets import omniglot
from trainkit.data_root import MissingDataError


@pytest.fixture(scope="module")
def splits(data_root, tmp_path_factory):
  tfds_dir = tmp_path_factory.mktemp("tfds")
  start = time.perf_counter()
  test = omniglot.load_omniglot(data_root, "test", 48, tfds_dir=tfds_dir)
  print(f"omniglot 48px build + test load: {time.perf_counter() - start:.1f} s")
  train = omniglot.load_omniglot(data_root, "train", 48, tfds_dir=tfds_dir)
  return {"train": train, "test": test}


def _png(data_root, category: str, drawer: int) -> bytes:
  for name in omniglot.ARCHIVES:
    with zipfile.ZipFile(data_root / "omniglot" / name) as archive:
      for member in archive.namelist():
        if f"/{category}/" in member and member.endswith(f"_{drawer:02d}.png"):
          return archive.read(member)
  raise KeyError(category)


@pytest.mark.parametrize("split, categories", [("test", 150), ("train", 1473)])
def test_counts_shapes_and_values(splits, split, categories):
  data = splits[split]
  assert data.num_categories == categories
  assert data.images.shape == (categories * 20, 48, 48) and data.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(data.labels), np.full(categories, 20))
  assert set(np.unique(data.images)) == {0, 1}
  ink = data.images.mean(axis=(1, 2))
  assert ink.min() > 0 and ink.max() < 0.5 and 0.03 < ink.mean() < 0.2
  border = np.concatenate([data.images[:, 0], data.images[:, -1], data.images[:, :, 0], data.images[:, :, -1]], 1)
  assert border.mean() < 0.01  # ink = 1 sits inside a background frame


def test_split_rule(splits):
  test_names, train_names = splits["test"].category_names, splits["train"].category_names
  assert all(name.split("/")[1] in omniglot.TEST_CHARACTERS for name in test_names)
  assert not any(name.split("/")[1] in omniglot.TEST_CHARACTERS for name in train_names)
  alphabets = {name.split("/")[0] for name in test_names}
  assert len(alphabets) == 50 and alphabets == {name.split("/")[0] for name in train_names}
  assert list(test_names) == sorted(test_names)


def test_exemplar_is_the_lowest_drawer(data_root, splits):
  for split, category_index in [("test", 0), ("test", 149), ("train", 700)]:
    data = splits[split]
    name = data.category_names[category_index]
    expected = omniglot.preprocess(_png(data_root, name, 1), 48)
    np.testing.assert_array_equal(data.exemplars()[category_index], expected)
    assert data.exemplar_index[category_index] == 20 * category_index


def test_preprocess_inverts_without_resizing_and_matches_pil_bilinear(data_root):
  png = _png(data_root, "Korean/character05", 3)
  raw = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
  np.testing.assert_array_equal(omniglot.preprocess(png, 105), (raw < 128).astype(np.uint8))
  small = np.asarray(Image.fromarray(raw).resize((48, 48), Image.BILINEAR), np.float64) / 255
  ink = 1 - (small - small.min()) / (small.max() - small.min())
  np.testing.assert_array_equal(omniglot.preprocess(png, 48), (ink / ink.max() > 0.5).astype(np.uint8))


def test_missing_and_altered_archives(tmp_path):
  with pytest.raises(MissingDataError, match="images_background.zip.*github.com/brendenlake/omniglot"):
    omniglot.archive_paths(tmp_path)
  (tmp_path / "images_background.zip").write_bytes(b"not the archive")
  with pytest.raises(MissingDataError, match="altered or corrupt"):
    omniglot.archive_paths(tmp_path)


def test_bad_arguments():
  with pytest.raises(ValueError, match="image_size must be one of"):
    omniglot.config_for(47)
  with pytest.raises(ValueError, match="split must be one of"):
    omniglot.load_omniglot(split="validation")
