"""Training entry point of the jaxldm tasks and the loop they share.

`train_and_evaluate(config, workdir)` dispatches on `config.task` (autoencoder -> `train_autoencoder`,
latent_diffusion and pixel_diffusion -> `train_diffusion`). Each task supplies a pure pytree train state, a
jitted step `step(state, batch, key) -> (state, metrics)` that donates the state, and the batches of one
epoch; `run_loop` places the state on the data mesh, restores the newest orbax checkpoint (state and data
position), steps, logs and checkpoints. The step key is `fold_in(key(seed), step)`, so a resumed run draws
the same randomness as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxldm.configs import DATASETS
from jaxldm.datasets.episodes import EXEMPLAR_MODES, FewShotSplit
from trainkit import mesh as mesh_lib
from trainkit.checkpoint import Checkpointer
from trainkit.metrics import MetricWriter

TASK_MODULES = {
    "autoencoder": "jaxldm.train_autoencoder",
    "latent_diffusion": "jaxldm.train_diffusion",
    "pixel_diffusion": "jaxldm.train_diffusion",
}
LATENT_DIMS = {"omniglot": 64, "quickdraw_fs": 128}

State = dict[str, Any]
Step = Callable[[State, dict[str, jax.Array], jax.Array], tuple[State, dict[str, jax.Array]]]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the task of `config` in `workdir` (resuming from its newest checkpoint); returns results.json."""
  task = config.get("task")
  if task not in TASK_MODULES:
    raise ValueError(f"config.task={task!r} is not a jaxldm task; valid: {sorted(TASK_MODULES)}.")
  return importlib.import_module(TASK_MODULES[task]).train_and_evaluate(config, workdir)


def check_data_config(data: ml_collections.ConfigDict) -> None:
  """Raises a clear error for a bad dataset name, exemplar mode or batch size before anything is loaded."""
  if data.dataset not in DATASETS:
    raise ValueError(f"config.data.dataset={data.dataset!r}; valid: {DATASETS}.")
  if data.exemplar not in EXEMPLAR_MODES:
    raise ValueError(f"config.data.exemplar={data.exemplar!r}; valid: {EXEMPLAR_MODES}.")
  if data.batch_size < 1:
    raise ValueError(f"config.data.batch_size={data.batch_size} must be positive.")


def load_split(data: ml_collections.ConfigDict, split: str) -> FewShotSplit:
  """One split of the configured few-shot set (raises MissingDataError when its files are absent)."""
  check_data_config(data)
  root, tfds_dir = data.data_root or None, data.tfds_dir or None
  if data.dataset == "omniglot":
    from jaxldm.datasets.omniglot import load_omniglot
    loaded = load_omniglot(root, split, data.image_size, tfds_dir)
  else:
    from jaxldm.datasets.quickdraw_fs import load_quickdraw_fs
    loaded = load_quickdraw_fs(root, split, data.quickdraw_source, data.image_size, data.drawings_per_category,
                               tfds_dir=tfds_dir)
  if split == "train" and data.train_categories > 0:
    return first_categories(loaded, data.train_categories)
  return loaded


def first_categories(split: FewShotSplit, count: int) -> FewShotSplit:
  """The split restricted to its first `count` categories (quick runs and tests)."""
  keep = split.labels < count
  return FewShotSplit(images=split.images[keep], labels=split.labels[keep],
                      category_names=split.category_names[:count],
                      exemplar_index=split.exemplar_index[:count], max_value=split.max_value)


def latent_dim(config: ml_collections.ConfigDict) -> int:
  """`config.model.latent_dim`, or the paper's size for the dataset when it is 0."""
  dim = config.model.latent_dim or LATENT_DIMS[config.data.dataset]
  if dim < 1:
    raise ValueError(f"config.model.latent_dim={config.model.latent_dim} must be positive (or 0 for the default).")
  return dim


def total_steps(optim: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if optim.max_steps > 0:
    return optim.max_steps
  if optim.epochs < 1:
    raise ValueError(f"config.optim.epochs={optim.epochs} must be positive (or set config.optim.max_steps).")
  return optim.epochs * steps_per_epoch


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  mesh = mesh_lib.make_data_mesh(config.train.num_devices or None)
  mesh_lib.check_divisible(config.data.batch_size, mesh)
  return mesh


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


@dataclasses.dataclass
class LoopResult:
  state: State
  step: int
  history: list[dict[str, float]]
  writer: MetricWriter


def run_loop(config: ml_collections.ConfigDict, workdir: Path, state: State, step_fn: Step,
             epoch_batches: Callable[[int], Iterator[dict[str, np.ndarray]]], steps_per_epoch: int,
             mesh: jax.sharding.Mesh) -> LoopResult:
  """Trains from the newest checkpoint in `workdir/checkpoints` (or `state`) to `total_steps`.

  `epoch_batches(epoch)` yields the host batches of one epoch, a deterministic function of the epoch; a
  resumed run regenerates the interrupted epoch and skips the batches already seen. The checkpoint meta holds
  the data position and the metric history. Per-step metrics are averaged over `log_every_steps` steps.
  """
  if steps_per_epoch < 1:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} exceeds the training set: no full batch.")
  state = mesh_lib.put_replicated(state, mesh)
  checkpointer = Checkpointer(workdir / "checkpoints")
  meta: dict[str, Any] = {"history": [], "position": {"epoch": 0, "batch": 0}}
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, meta = restored
    logging.info("Resumed from step %d (epoch %d, batch %d).", int(state["step"]),
                 meta["position"]["epoch"], meta["position"]["batch"])
  step = int(state["step"])
  last_step = total_steps(config.optim, steps_per_epoch)
  writer = MetricWriter(workdir, last_step, step, progress=config.train.progress_bar)
  base_key = jax.random.key(config.seed)
  epoch, offset = meta["position"]["epoch"], meta["position"]["batch"]
  pending: list[dict[str, jax.Array]] = []
  images_since, tic = 0, time.perf_counter()
  while step < last_step:
    for batch in itertools.islice(epoch_batches(epoch), offset, None):
      batch = mesh_lib.put_batch(batch, mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
      step += 1
      offset += 1
      pending.append(metrics)
      images_since += len(next(iter(batch.values())))
      writer.advance()
      finished = step >= last_step
      if step % config.train.log_every_steps == 0 or finished:
        summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
        summary["images_per_s"] = images_since / (time.perf_counter() - tic)
        summary["epoch"] = epoch + offset / steps_per_epoch
        writer.write(step, summary, prefix="train/")
        meta["history"].append({"step": step, **summary})
        pending, images_since, tic = [], 0, time.perf_counter()
      if step % config.train.checkpoint_every_steps == 0 or finished:
        if offset == steps_per_epoch:
          meta["position"] = {"epoch": epoch + 1, "batch": 0}
        else:
          meta["position"] = {"epoch": epoch, "batch": offset}
        checkpointer.save(step, state, meta)
        tic = time.perf_counter()
      if finished:
        break
    else:
      epoch, offset = epoch + 1, 0
  checkpointer.close()
  return LoopResult(state=state, step=step, history=meta["history"], writer=writer)


def write_results(workdir: Path, results: dict[str, Any]) -> None:
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
