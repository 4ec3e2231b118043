"""Orbax checkpoints of a whole train state (arrays) plus JSON metadata (data position, config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored; the message names the folder and what to do."""


class Checkpointer:
  """Saves `(state, meta)` every call to `save`; keeps the newest `max_to_keep`; writes atomically.

  `state` is any pytree of arrays (parameters, optimizer state, masks, RNG keys, step); `meta` is a
  JSON-serialisable dict (e.g. the data loader position), so a resumed run continues exactly.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, wait: bool = False) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if wait:
      self._manager.wait_until_finished()

  def restore_latest(self, template: Any) -> tuple[Any, dict] | None:
    """Restores the newest checkpoint into the structure, shapes and shardings of `template`."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for truncated or mismatched files
      raise CheckpointError(
          f"Could not restore checkpoint step {step} in {self.directory}: {type(e).__name__}: {e}. "
          "It is corrupt or was written by a different config; move it away to start afresh or pass the "
          "config it was trained with.") from e
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
