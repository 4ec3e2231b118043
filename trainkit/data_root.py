"""One data root for every data set: a flag, else $JAXDATA_ROOT, else a user cache folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ENV_VAR = "JAXDATA_ROOT"
DEFAULT_ROOT = Path(os.path.expanduser("~/.cache/jaxdata"))


class MissingDataError(FileNotFoundError):
  """A data file is missing or altered; the message says how to get it."""


def resolve(root: str | os.PathLike | None = None) -> Path:
  """Returns the data root: `root` if given, else $JAXDATA_ROOT, else ~/.cache/jaxdata."""
  if root:
    return Path(root).expanduser()
  env = os.environ.get(ENV_VAR)
  if env:
    return Path(env).expanduser()
  return DEFAULT_ROOT


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def require_file(path: Path, how_to_get: str, expected_sha256: str | None = None) -> Path:
  """Checks that `path` exists (and matches its checksum); raises MissingDataError saying how to get it."""
  if not path.is_file():
    raise MissingDataError(
        f"Missing data file {path}. {how_to_get} "
        f"(The data root is set by --data_root or ${ENV_VAR}; default {DEFAULT_ROOT}.)")
  if expected_sha256 is not None:
    actual = sha256(path)
    if actual != expected_sha256:
      raise MissingDataError(
          f"Data file {path} is altered or corrupt: sha256 {actual}, expected {expected_sha256}. "
          f"Delete it and fetch it again. {how_to_get}")
  return path


def download(url: str, dest: Path, expected_sha256: str | None) -> Path:
  """Downloads `url` to `dest` atomically and verifies its sha256; an existing verified file is kept."""
  import urllib.request

  dest.parent.mkdir(parents=True, exist_ok=True)
  if dest.is_file() and (expected_sha256 is None or sha256(dest) == expected_sha256):
    return dest
  tmp = dest.with_suffix(dest.suffix + ".part")
  with urllib.request.urlopen(url) as response, open(tmp, "wb") as out:
    while block := response.read(1 << 20):
      out.write(block)
  if expected_sha256 is not None and sha256(tmp) != expected_sha256:
    actual = sha256(tmp)
    tmp.unlink()
    raise MissingDataError(f"Download of {url} has sha256 {actual}, expected {expected_sha256}.")
  os.replace(tmp, dest)
  return dest
