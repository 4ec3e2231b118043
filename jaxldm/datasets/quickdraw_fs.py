"""QuickDraw-FS-style few-shot set from Quick, Draw! files, as a TFDS builder read without TensorFlow.

Boutin et al.'s QuickDraw-FS (665 categories x 500 drawings at 48x48, 550 train / 115 test categories, the
first drawing of each category its exemplar) ships no construction script, so this builder makes one of the
same shape from Google's public files in either format:
- `simplified/<category>.ndjson` (strokes): rendered at the target size by `rasterise` (no upsampling);
- `numpy_bitmap/<category>.npy` (uint8 [N, 784] or [N, 1, 784], 28x28): resized with PIL Lanczos, as the
  reference's QuickDraw loader resizes.
Each category keeps its first `drawings_per_category` drawings in file order; its exemplar is the first.
Categories go to the test split by a rule that depends only on their names: the `test_fraction` of them
(at least one) with the smallest sha256 of the name. Images are stored grey, uint8 0-255, ink = 255.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxldm.datasets.episodes import FewShotSplit
from jaxldm.datasets import tfds_cache
from jaxldm.datasets.rasterise import rasterise
from trainkit import data_root as data_root_lib

SOURCES = {"strokes": ("simplified", ".ndjson"), "bitmap": ("numpy_bitmap", ".npy")}
SPLITS = ("train", "test")
BITMAP_SIZE = 28
EXEMPLAR_RANK = 0
DEFAULT_TEST_FRACTION = 115 / 665
HOW_TO_GET = ("Get Quick, Draw! files from Google's public bucket quickdraw_dataset/full/simplified/"
              "<category>.ndjson or quickdraw_dataset/full/numpy_bitmap/<category>.npy into the data root's "
              "quickdraw/simplified/ or quickdraw/numpy_bitmap/ folder.")


def category_files(source_dir: Path, source: str) -> dict[str, Path]:
  """Category name -> file for one source format; raises MissingDataError when there are none."""
  if source not in SOURCES:
    raise ValueError(f"source must be one of {tuple(SOURCES)}; got {source!r}.")
  suffix = SOURCES[source][1]
  files = sorted(Path(source_dir).glob(f"*{suffix}")) if Path(source_dir).is_dir() else []
  if not files:
    raise data_root_lib.MissingDataError(f"No {suffix} files in {source_dir}. {HOW_TO_GET}")
  return {f.name[:-len(suffix)]: f for f in files}


def test_categories(names: list[str], test_fraction: float) -> set[str]:
  """The `test_fraction` of `names` (at least one) with the smallest sha256 of the name."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must lie in (0, 1); got {test_fraction}.")
  if len(names) < 2:
    raise ValueError(f"A train/test split needs at least 2 categories; got {names}.")
  count = min(max(1, round(len(names) * test_fraction)), len(names) - 1)
  return set(sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())[:count])


def read_strokes(path: Path, count: int) -> list:
  """The first `count` drawings (lists of strokes) of a simplified .ndjson file."""
  drawings = []
  with open(path) as f:
    for line in f:
      if line.strip():
        drawings.append(json.loads(line)["drawing"])
        if len(drawings) == count:
          break
  return drawings


def read_bitmaps(path: Path, count: int) -> np.ndarray:
  """The first `count` 28x28 bitmaps of a numpy_bitmap .npy file, uint8 [count, 28, 28]."""
  data = np.load(path, mmap_mode="r")
  if data.dtype != np.uint8 or data.shape[-1] != BITMAP_SIZE * BITMAP_SIZE:
    raise ValueError(f"{path} holds {data.dtype} {data.shape}; expected uint8 [N, 784].")
  return np.asarray(data[:count]).reshape(-1, BITMAP_SIZE, BITMAP_SIZE)


def resize_bitmap(bitmap: np.ndarray, size: int) -> np.ndarray:
  if size == BITMAP_SIZE:
    return bitmap
  return np.asarray(Image.fromarray(bitmap).resize((size, size), Image.LANCZOS))


class QuickDrawConfig(tfds.core.BuilderConfig):
  """Source format, image size, drawings per category, test fraction, and the category files used."""

  def __init__(self, *, source: str, image_size: int, drawings_per_category: int, test_fraction: float,
               files: dict[str, Path]):
    fingerprint = hashlib.sha256(
        "\n".join(f"{n}:{f.stat().st_size}" for n, f in sorted(files.items())).encode()).hexdigest()[:10]
    super().__init__(
        name=f"{source}-{image_size}px-{drawings_per_category}per-test{test_fraction:.4f}-{fingerprint}")
    self.source = source
    self.image_size = image_size
    self.drawings_per_category = drawings_per_category
    self.test_fraction = test_fraction
    self.files = files


class QuickDrawFewShot(tfds.core.GeneratorBasedBuilder):
  """Few-shot Quick, Draw!: one record per category with its drawings, label, name and exemplar."""

  name = "quick_draw_few_shot"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Strokes rendered at the target size or Lanczos-resized bitmaps."}
  # See OmniglotFewShot.code_path: TFDS's package lookup fails for namespace packages.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    count, size = config.drawings_per_category, config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "images": tfds.features.Tensor(shape=(count, size, size), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            "category": tfds.features.Tensor(shape=(), dtype=np.str_),
            "exemplar": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        homepage="https://github.com/googlecreativelab/quickdraw-dataset",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    names = sorted(config.files)
    test = test_categories(names, config.test_fraction)
    return {
        "train": self._generate_examples([n for n in names if n not in test]),
        "test": self._generate_examples([n for n in names if n in test]),
    }

  def _images(self, name: str) -> np.ndarray:
    config = self.builder_config
    path, count, size = config.files[name], config.drawings_per_category, config.image_size
    drawings = read_strokes(path, count) if config.source == "strokes" else read_bitmaps(path, count)
    if len(drawings) < count:
      raise ValueError(f"{path} has {len(drawings)} drawings; drawings_per_category={count} needs that many. "
                       f"Lower drawings_per_category or remove the category.")
    render = rasterise if config.source == "strokes" else resize_bitmap
    return np.stack([render(d, size) for d in drawings]).astype(np.uint8)

  def _generate_examples(self, names: list[str]):
    for label, name in enumerate(names):
      yield name, {"images": self._images(name), "label": label, "category": name, "exemplar": EXEMPLAR_RANK}


def builder(data_root: str | os.PathLike | None = None, source: str = "strokes", image_size: int = 48,
            drawings_per_category: int = 20, test_fraction: float = DEFAULT_TEST_FRACTION,
            tfds_dir: str | os.PathLike | None = None) -> QuickDrawFewShot:
  """The builder over `<data root>/quickdraw/{simplified,numpy_bitmap}/`, TFDS files under `tfds_dir`."""
  if image_size < 1:
    raise ValueError(f"image_size must be positive; got {image_size}.")
  if drawings_per_category < 1:
    raise ValueError(f"drawings_per_category must be positive; got {drawings_per_category}.")
  root = data_root_lib.resolve(data_root)
  if source not in SOURCES:
    raise ValueError(f"source must be one of {tuple(SOURCES)}; got {source!r}.")
  files = category_files(root / "quickdraw" / SOURCES[source][0], source)
  config = QuickDrawConfig(source=source, image_size=image_size, drawings_per_category=drawings_per_category,
                           test_fraction=test_fraction, files=files)
  return QuickDrawFewShot(config=config, data_dir=str(tfds_dir or tfds_cache.default_tfds_dir()),
                          file_format="array_record")


def load_quickdraw_fs(data_root: str | os.PathLike | None = None, split: str = "train", source: str = "strokes",
                      image_size: int = 48, drawings_per_category: int = 20,
                      test_fraction: float = DEFAULT_TEST_FRACTION,
                      tfds_dir: str | os.PathLike | None = None) -> FewShotSplit:
  """Builds once (cached under `tfds_dir`) and returns one split in memory, images uint8 0-255."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
  quickdraw = builder(data_root, source, image_size, drawings_per_category, test_fraction, tfds_dir)
  tfds_cache.prepare(quickdraw)
  data_source = quickdraw.as_data_source(split=split)
  return FewShotSplit.from_categories(data_source.__getitems__(range(len(data_source))), max_value=255)
