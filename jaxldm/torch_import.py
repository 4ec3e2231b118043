"""Reads PyTorch state dicts (the zip-pickle `torch.save` format) into NumPy arrays without PyTorch.

A `.pt` file is a zip archive holding `<prefix>/data.pkl` (a pickle whose tensors refer to storages by
key) and one raw little-endian file per storage, `<prefix>/data/<key>`. The unpickler below allows only
the few globals a state dict needs, so loading a file cannot run arbitrary code.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands for a `torch.<X>Storage` class: only its element type matters here."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage: np.ndarray, storage_offset: int, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> np.ndarray:
  """Views `storage` (a flat array) with PyTorch's offset, shape and element strides; returns a copy."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])
  needed = storage_offset + 1 + sum((n - 1) * s for n, s in zip(size, stride) if n > 0)
  if min(size) > 0 and needed > storage.size:
    raise ValueError(f"tensor of shape {size}, strides {stride}, offset {storage_offset} reads past its "
                     f"storage of {storage.size} elements")
  base = storage[storage_offset:]
  view = np.lib.stride_tricks.as_strided(
      base, shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad=False, backward_hooks=None) -> np.ndarray:
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickler that resolves storages from the zip archive and refuses every other global."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = "<" if byteorder == "little" else ">"
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f"refusing global {module}.{name}: a state dict holds only tensors in (ordered) dicts; "
        f"allowed: {sorted('.'.join(k) for k in _ALLOWED_GLOBALS)} and torch.<X>Storage for X in "
        f"{sorted(_STORAGE_DTYPES)}")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    if key not in self._storages:
      raw = self._archive.read(f"{self._prefix}/data/{key}")
      dtype = storage_type.dtype.newbyteorder(self._byteorder)
      array = np.frombuffer(raw, dtype=dtype)
      if array.size != numel:
        raise pickle.UnpicklingError(f"storage {key} has {array.size} elements, the pickle says {numel}")
      self._storages[key] = array.astype(storage_type.dtype.newbyteorder("="), copy=False)
    return self._storages[key]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Returns the tensors of a `torch.save`d state dict as {name: np.ndarray}, in file order."""
  path = Path(path)
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path} is not a zip-format torch file: expected one '<prefix>/data.pkl', "
                       f"found {pickles or 'none'} (legacy non-zip torch files are not supported)")
    prefix = pickles[0].split("/")[0]
    byteorder_name = f"{prefix}/byteorder"
    byteorder = (archive.read(byteorder_name).decode().strip()
                 if byteorder_name in archive.namelist() else "little")
    with archive.open(pickles[0]) as f:
      loaded = _StateDictUnpickler(f, archive, prefix, byteorder).load()
  if not isinstance(loaded, dict):
    raise ValueError(f"{path} holds a {type(loaded).__name__}, expected a state dict")
  bad = [k for k, v in loaded.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: entries {bad} are not tensors")
  return dict(loaded)
