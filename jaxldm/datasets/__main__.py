"""Fetch and build the drawing data sets: `python -m jaxldm.datasets --dataset=omniglot [--download]`.

Omniglot: the canonical archives (sha256 pinned) into `<data root>/omniglot/`, then the TFDS build.
QuickDraw: `--download` fetches the named categories' Google files into `<data root>/quickdraw/`; Google
publishes no checksums for them, so their sha256 is printed for the user to pin. Then the TFDS build.
"""

from __future__ import annotations

from absl import app, flags

from jaxldm.datasets import omniglot, quickdraw_fs
from trainkit import data_root as data_root_lib

QUICKDRAW_URL = "https://storage.googleapis.com/quickdraw_dataset/full/{folder}/{category}{suffix}"

_DATASET = flags.DEFINE_enum("dataset", "omniglot", ["omniglot", "quickdraw_fs"], "Data set to prepare.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Fetch missing files from their canonical source.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Data root (default $JAXDATA_ROOT, else ~/.cache/jaxdata).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 48, "Image side of the build.")
_SOURCE = flags.DEFINE_enum("source", "strokes", list(quickdraw_fs.SOURCES), "QuickDraw file format.")
_CATEGORIES = flags.DEFINE_list("categories", [], "QuickDraw categories to download (e.g. cat,dog,apple).")


def download_quickdraw(categories: list[str], source: str) -> None:
  folder, suffix = quickdraw_fs.SOURCES[source]
  target = data_root_lib.resolve(_DATA_ROOT.value) / "quickdraw" / folder
  for category in categories:
    path = data_root_lib.download(QUICKDRAW_URL.format(folder=folder, category=category, suffix=suffix),
                                  target / f"{category}{suffix}", None)
    print(f"{path}  sha256 {data_root_lib.sha256(path)}")


def main(argv):
  del argv
  if _DATASET.value == "omniglot":
    for split in omniglot.SPLITS:
      data = omniglot.load_omniglot(_DATA_ROOT.value, split, _IMAGE_SIZE.value, download=_DOWNLOAD.value)
      print(f"omniglot {split}: {data.num_categories} categories, {len(data.images)} images "
            f"{_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}")
    return
  if _DOWNLOAD.value:
    if not _CATEGORIES.value:
      raise app.UsageError("--download for quickdraw_fs needs --categories=name,name,...")
    download_quickdraw(_CATEGORIES.value, _SOURCE.value)
  for split in quickdraw_fs.SPLITS:
    data = quickdraw_fs.load_quickdraw_fs(_DATA_ROOT.value, split, _SOURCE.value, _IMAGE_SIZE.value)
    print(f"quickdraw_fs ({_SOURCE.value}) {split}: {data.num_categories} categories, {len(data.images)} images")


if __name__ == "__main__":
  app.run(main)
