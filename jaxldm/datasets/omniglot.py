"""Omniglot with the few-shot ("weak") split of the reference, as a TFDS builder read without TensorFlow.

Source: the canonical archives `images_background.zip` and `images_evaluation.zip` of
github.com/brendenlake/omniglot (`python/`), checked by sha256. Split (diversity_vs_recognizability
`weak_background` / `weak_evaluation`, which LatentMatters uses): in every one of the 50 alphabets of both
archives, characters 01-03 are test categories (150) and the others train categories (1473), 20 drawings
each. Labels index the categories of a split sorted by "Alphabet/characterNN".

Preprocessing as the reference's torchvision pipeline on the PIL image: grey scale, PIL bilinear resize to
S x S (PIL widens the filter when shrinking, so it is anti-aliased), min-max scaling to [0, 1], inversion
(ink = 1) rescaled by its maximum, then ink where the value exceeds 0.5. Stored as uint8 {0, 1}.

Exemplar: the reference's `'first'` takes the first file its directory walk returns, which depends on the
file system; here it is the drawing by the lowest drawer id (`NNNN_01.png`), the first in sorted order.

One record per category (its 20 drawings sorted by drawer, its label, name and exemplar position): building
is then bound by decoding the PNGs rather than by TFDS's per-record overhead.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxldm.datasets.episodes import FewShotSplit
from jaxldm.datasets import tfds_cache
from trainkit import data_root as data_root_lib

ARCHIVES = {
    "images_background.zip": "2b0f189ba6d62aaa905fdbaf01f1a6c222d0455ab855c31ff56fb36395e20466",
    "images_evaluation.zip": "5d68423668c5da6356825f39d508f63f8400d7cfc29922c089399604388453c4",
}
ARCHIVE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{name}"
TEST_CHARACTERS = ("character01", "character02", "character03")
SPLITS = ("train", "test")
DRAWINGS = 20
EXEMPLAR_RANK = 0
IMAGE_SIZES = (28, 48, 50, 105)
BINARY_THRESHOLD = 0.5
_PNG_PATH = re.compile(r"^images_(?:background|evaluation)/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


def how_to_get(name: str) -> str:
  return (f"Get {name} from {ARCHIVE_URL.format(name=name)} into the data root's omniglot/ folder, "
          f"or call with download=True.")


def archive_paths(archive_dir: Path, download: bool = False) -> dict[str, Path]:
  """The verified Omniglot archives in `archive_dir`; downloads missing ones when `download` is set."""
  paths = {}
  for name, digest in ARCHIVES.items():
    path = Path(archive_dir) / name
    if download and not path.is_file():
      data_root_lib.download(ARCHIVE_URL.format(name=name), path, digest)
    paths[name] = data_root_lib.require_file(path, how_to_get(name), digest)
  return paths


def preprocess(png: bytes, image_size: int) -> np.ndarray:
  """One Omniglot PNG -> uint8 [S, S] in {0, 1}, ink = 1 (see the module docstring)."""
  grey = Image.open(io.BytesIO(png)).convert("L").resize((image_size, image_size), Image.BILINEAR)
  value = np.asarray(grey, np.float32) / 255.0
  value = (value - value.min()) / max(float(value.max() - value.min()), 1e-12)
  ink = np.where(value != 1.0, 1.0 - value, 0.0)
  ink = ink / max(float(ink.max()), 1e-12)
  return (ink > BINARY_THRESHOLD).astype(np.uint8)


def split_of(character: str) -> str:
  return "test" if character in TEST_CHARACTERS else "train"


class OmniglotConfig(tfds.core.BuilderConfig):
  """Images resized to `image_size` square (48 for the models, 50 for the critics)."""

  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=f"{image_size}px", **kwargs)
    self.image_size = image_size


class OmniglotFewShot(tfds.core.GeneratorBasedBuilder):
  """Omniglot, few-shot split: 1473 train and 150 test categories x 20 drawings."""

  name = "omniglot_few_shot"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Weak split of diversity_vs_recognizability; lowest-drawer exemplar."}
  BUILDER_CONFIGS = [OmniglotConfig(image_size=s) for s in IMAGE_SIZES]
  # TFDS finds its checksum file from the package path, which fails for a namespace package (an editable
  # install made before jaxldm had an __init__.py); archives are verified by `archive_paths` instead.
  code_path = epath.Path(__file__)

  def __init__(self, *, archive_dir: str | os.PathLike | None = None, download: bool = False, **kwargs):
    super().__init__(**kwargs)
    self._archive_dir = Path(archive_dir) if archive_dir else data_root_lib.resolve() / "omniglot"
    self._download = download

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "images": tfds.features.Tensor(shape=(DRAWINGS, size, size), dtype=np.uint8),
            "drawers": tfds.features.Tensor(shape=(DRAWINGS,), dtype=np.int64),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
            "category": tfds.features.Tensor(shape=(), dtype=np.str_),
            "exemplar": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        homepage="https://github.com/brendenlake/omniglot",
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    paths = archive_paths(self._archive_dir, self._download)
    drawings = {split: {} for split in SPLITS}
    for path in paths.values():
      with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
          match = _PNG_PATH.match(member)
          if match:
            alphabet, character, _, drawer = match.groups()
            category = f"{alphabet}/{character}"
            drawings[split_of(character)].setdefault(category, []).append((int(drawer), path, member))
    return {split: self._generate_examples(drawings[split]) for split in SPLITS}

  def _generate_examples(self, drawings: dict[str, list[tuple[int, Path, str]]]):
    """One record per category: its drawings sorted by drawer; the exemplar is the first."""
    size = self.builder_config.image_size
    archives = {}
    try:
      for label, category in enumerate(sorted(drawings)):
        entries = sorted(drawings[category])
        if len(entries) != DRAWINGS:
          raise ValueError(f"Category {category} has {len(entries)} drawings, expected {DRAWINGS}.")
        images = []
        for _, path, member in entries:
          if path not in archives:
            archives[path] = zipfile.ZipFile(path)
          images.append(preprocess(archives[path].read(member), size))
        yield category, {
            "images": np.stack(images),
            "drawers": np.array([drawer for drawer, _, _ in entries], np.int64),
            "label": label,
            "category": category,
            "exemplar": EXEMPLAR_RANK,
        }
    finally:
      for archive in archives.values():
        archive.close()


def config_for(image_size: int) -> OmniglotConfig:
  for config in OmniglotFewShot.BUILDER_CONFIGS:
    if config.image_size == image_size:
      return config
  raise ValueError(f"image_size must be one of {IMAGE_SIZES}; got {image_size}.")


def builder(data_root: str | os.PathLike | None = None, image_size: int = 48,
            tfds_dir: str | os.PathLike | None = None, download: bool = False) -> OmniglotFewShot:
  """The builder reading `<data root>/omniglot/`, its TFDS files under `tfds_dir` (default:
  `tfds_cache.default_tfds_dir()`)."""
  root = data_root_lib.resolve(data_root)
  return OmniglotFewShot(config=config_for(image_size), data_dir=str(tfds_dir or tfds_cache.default_tfds_dir()),
                         file_format="array_record", archive_dir=root / "omniglot", download=download)


def load_omniglot(data_root: str | os.PathLike | None = None, split: str = "train", image_size: int = 48,
                  tfds_dir: str | os.PathLike | None = None, download: bool = False) -> FewShotSplit:
  """Builds once (cached under `tfds_dir`) and returns one split in memory, images uint8 {0, 1}."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
  omniglot = builder(data_root, image_size, tfds_dir, download)
  tfds_cache.prepare(omniglot)
  source = omniglot.as_data_source(split=split)
  return FewShotSplit.from_categories(source.__getitems__(range(len(source))), max_value=1)
