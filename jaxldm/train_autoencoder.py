"""Autoencoder training with any combination of latent losses (`config.latent_losses`, e.g. 'barlow:30,prototype:1').

Episodes of (exemplar, variation) pairs of the training categories; the step is `latent_losses.make_train_step`
(reconstruction + weighted latent losses, Adam with L2 weight decay, EMA target encoder when a loss needs one).
At the end: the reconstruction loss on the test split's first `eval_categories` categories (0 = all), with the
deterministic encoder and batch-norm running statistics, and `reconstructions.png` (test drawings above their
reconstructions). `load_autoencoder(workdir)` gives a finished run's model to the latent diffusion trainer.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxldm import latent_losses as losses_lib
from jaxldm import sampling
from jaxldm import train as loop
from jaxldm.autoencoder import Autoencoder, reconstruction_loss
from jaxldm.datasets import episodes
from trainkit.checkpoint import Checkpointer

MODEL_FILE = "autoencoder.json"
ENCODE_CHUNK = 128


def build(latent_losses: str, latent_dim: int, num_classes: int, seed: int):
  """The autoencoder with the bottleneck the spec needs and its latent losses, initialised from `seed`."""
  rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
  return losses_lib.build_autoencoder_and_losses(latent_losses, latent_dim, num_classes, rngs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir_path = Path(workdir)
  losses_lib.parse_latent_spec(config.latent_losses)
  loop.check_data_config(config.data)
  dim = loop.latent_dim(config)
  mesh = loop.make_mesh(config)
  train_split = loop.load_split(config.data, "train")
  test_split = loop.load_split(config.data, "test")
  loop.write_config(config, workdir_path)
  model_info = {"latent_losses": config.latent_losses, "latent_dim": dim, "num_classes": train_split.num_categories,
                "dataset": config.data.dataset, "seed": config.seed}
  (workdir_path / MODEL_FILE).write_text(json.dumps(model_info, indent=2))

  autoencoder, latent_losses = build(config.latent_losses, dim, train_split.num_categories, config.seed)
  optimizer = losses_lib.make_optimizer(config.optim.learning_rate, config.optim.weight_decay)
  state, step_fn = losses_lib.make_train_step(autoencoder, latent_losses, optimizer)
  batch_size = config.data.batch_size

  def epoch_batches(epoch: int):
    return episodes.epoch_batches(train_split, batch_size, config.seed, epoch, exemplar=config.data.exemplar,
                                  augment=config.data.augment)

  result = loop.run_loop(config, workdir_path, state, step_fn, epoch_batches,
                         episodes.num_batches(train_split, batch_size), mesh)
  nnx.update((autoencoder, latent_losses), result.state["params"], result.state["batch_stats"])
  autoencoder.eval()
  test = {"reconstruction_loss": evaluate_reconstruction(autoencoder, test_split, config.eval_categories)}
  result.writer.write(result.step, test, prefix="test/")
  grid = save_reconstruction_grid(workdir_path / "reconstructions.png", autoencoder, test_split,
                                  config.grid_categories)
  results = {"step": result.step, "history": result.history, "test": test, "reconstruction_grid": str(grid),
             **model_info}
  loop.write_results(workdir_path, results)
  result.writer.close()
  return results


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, model_state: nnx.State, images: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, model_state).encode(images).code


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, model_state: nnx.State, codes: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, model_state).decode(codes)


def encoder_fn(autoencoder: Autoencoder) -> Callable[[jax.Array], jax.Array]:
  """A jitted deterministic encoder images [B, S, S, 1] -> codes [B, d] (evaluation mode: running statistics)."""
  autoencoder.eval()
  graphdef, model_state = nnx.split(autoencoder)
  return lambda images: _encode(graphdef, model_state, images)


def decoder_fn(autoencoder: Autoencoder) -> Callable[[jax.Array], jax.Array]:
  """A jitted decoder codes [B, d] -> images [B, S, S, 1] (evaluation mode)."""
  autoencoder.eval()
  graphdef, model_state = nnx.split(autoencoder)
  return lambda codes: _decode(graphdef, model_state, codes)


def encode_images(autoencoder: Autoencoder, images: np.ndarray) -> np.ndarray:
  """Codes [N, d] of float images [N, S, S, 1], in fixed-size chunks (one compilation)."""
  encode = encoder_fn(autoencoder)
  return sampling.in_chunks(lambda chunk, _: encode(chunk), images, ENCODE_CHUNK, jax.random.key(0))


def reconstruct_images(autoencoder: Autoencoder, images: np.ndarray) -> np.ndarray:
  """Deterministic reconstructions of float images [N, S, S, 1], in fixed-size chunks."""
  encode, decode = encoder_fn(autoencoder), decoder_fn(autoencoder)
  return sampling.in_chunks(lambda chunk, _: decode(encode(chunk)), images, ENCODE_CHUNK, jax.random.key(0))


def evaluate_reconstruction(autoencoder: Autoencoder, split: episodes.FewShotSplit, num_categories: int) -> float:
  """Summed squared error per image over the drawings of the first `num_categories` categories (0 = all)."""
  if num_categories > 0:
    split = loop.first_categories(split, num_categories)
  images = split.as_float(split.images)
  return float(reconstruction_loss(jnp.asarray(images), jnp.asarray(reconstruct_images(autoencoder, images))))


def save_reconstruction_grid(path: Path, autoencoder: Autoencoder, split: episodes.FewShotSplit,
                             num_categories: int, per_category: int = 4) -> Path:
  """One column per test category: its first drawings on top, their reconstructions below."""
  categories = np.arange(min(num_categories, split.num_categories))
  starts = np.searchsorted(split.labels, categories)
  index = np.stack([starts + k for k in range(per_category)], axis=0)
  images = split.as_float(split.images[index.ravel()])
  reconstructions = reconstruct_images(autoencoder, images)
  shape = index.shape + images.shape[1:3]
  return sampling.save_sections(path, [images[..., 0].reshape(shape), reconstructions[..., 0].reshape(shape)])


def load_autoencoder(workdir: str | Path) -> tuple[Autoencoder, dict[str, Any]]:
  """The trained autoencoder of a finished `autoencoder` run (newest checkpoint), in evaluation mode, and its
  model description (latent_losses, latent_dim, num_classes, dataset)."""
  workdir = Path(workdir)
  info_path = workdir / MODEL_FILE
  if not info_path.is_file():
    raise FileNotFoundError(f"config.autoencoder_workdir={str(workdir)!r} is not an autoencoder run: {info_path} is "
                            "missing. Train one first with --config=jaxldm/configs/autoencoder.py and point "
                            "--config.autoencoder_workdir at its workdir.")
  info = json.loads(info_path.read_text())
  autoencoder, latent_losses = build(info["latent_losses"], info["latent_dim"], info["num_classes"], info["seed"])
  template, _ = losses_lib.make_train_step(autoencoder, latent_losses, losses_lib.make_optimizer())
  checkpointer = Checkpointer(workdir / "checkpoints")
  restored = checkpointer.restore_latest(template)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"config.autoencoder_workdir={str(workdir)!r} holds no checkpoint in "
                            f"{workdir / 'checkpoints'}; its training has not saved yet.")
  nnx.update((autoencoder, latent_losses), restored[0]["params"], restored[0]["batch_stats"])
  autoencoder.eval()
  return autoencoder, info
