"""Where TFDS builds live, and building them once even when several processes ask at the same time."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import tensorflow_datasets as tfds

CACHE_ENV_VAR = "JAXDATA_TFDS_DIR"


def default_tfds_dir() -> Path:
  """$JAXDATA_TFDS_DIR, else ~/.cache/jaxdata/tfds. Never the data root: it may be shared and read-only."""
  return Path(os.environ.get(CACHE_ENV_VAR) or os.path.expanduser("~/.cache/jaxdata/tfds"))


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """`download_and_prepare` under an exclusive file lock, so concurrent processes (test workers, data-parallel
  hosts sharing a disk) build a data set once and the others then read it."""
  data_dir = Path(builder.data_dir_root)
  data_dir.mkdir(parents=True, exist_ok=True)
  with open(data_dir / f".{builder.name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder.download_and_prepare()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder
