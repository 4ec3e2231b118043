"""Shared fixtures: the real data root (CI points $JAXDATA_ROOT at ../shared/data)."""

import os
from pathlib import Path

# Four simulated CPU devices, so data-parallel code is tested against one device in the same process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import pytest  # noqa: E402

from trainkit import data_root as data_root_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
  """The data root holding ptb/, wikitext-2/, omniglot/, quickdraw/, critics/; skips where absent."""
  candidates = [os.environ.get(data_root_lib.ENV_VAR), REPO.parent / "shared" / "data"]
  for candidate in candidates:
    if candidate and Path(candidate).is_dir():
      return Path(candidate)
  pytest.skip(f"real data not found: set ${data_root_lib.ENV_VAR} to a folder with the data sets")
