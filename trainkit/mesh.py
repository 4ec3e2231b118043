"""Data-parallel mesh over all local devices: batches sharded on their leading axis, state replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run when the launcher set the coordinator variables (no-op on one host)."""
  import os
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and jax.process_count() == 1:
    jax.distributed.initialize()


def make_data_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (default: all).

  Axes are `Auto`: jit propagates the batch sharding through the step (GSPMD), so model code needs no
  sharding annotations.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available.")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) axis over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the data mesh; "
                     f"choose a multiple of {n}.")


def put_batch(batch, mesh: Mesh):
  """Places a host batch (pytree of arrays with a leading batch axis) on the mesh, sharded over 'data'."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), batch)


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))
