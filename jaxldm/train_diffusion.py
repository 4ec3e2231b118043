"""Exemplar-conditioned diffusion training: in the latent space of a trained autoencoder, or in pixel space.

latent_diffusion (LatentMatters): the training set is encoded once by the autoencoder of
`config.autoencoder_workdir` (deterministic encoder), latents are standardised by statistics fitted on it, and a
`LatentUNet` learns epsilon for (variation latent, exemplar latent) pairs with condition dropout.
pixel_diffusion (diffusion_as_artist): a `PixelUNet` on images in [-1, 1] with the exemplar as second channel.

Both end by sampling `sample.num_per_category` drawings for each test-category exemplar with classifier-free
guidance (DDPM over all T steps or DDIM), saved as `samples.npz` (exemplars [C, S, S], samples [C, N, S, S],
category_names) and `samples.png` (exemplar row above the samples).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxldm import diffusion, sampling
from jaxldm import train as loop
from jaxldm import train_autoencoder
from jaxldm.datasets import episodes
from jaxldm.denoisers import LatentUNet, PixelUNet
from trainkit import mesh as mesh_lib

SAMPLERS = ("ddpm", "ddim")


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                   num_steps: int) -> optax.GradientTransformation:
  """AdamW; with `linear_decay` the rate falls linearly per epoch towards 0 (diffusion_as_artist)."""
  learning_rate: float | optax.Schedule = optim.learning_rate
  if optim.linear_decay:
    epochs = max(math.ceil(num_steps / steps_per_epoch), 1)
    learning_rate = lambda count: optim.learning_rate * (1.0 - (count // steps_per_epoch) / epochs)
  return optax.adamw(learning_rate, eps=optim.adam_eps, weight_decay=optim.weight_decay)


def make_train_step(denoiser: nnx.Module, optimizer: optax.GradientTransformation, schedule: diffusion.Schedule,
                    cond_drop_prob: float):
  """(initial state {params, opt_state, step}, jitted step(state, {x0, cond}, key) -> (state, metrics))."""
  graphdef, params = nnx.split(denoiser, nnx.Param)
  state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

  def step(state, batch, key):
    def loss_fn(params):
      return diffusion.diffusion_loss(nnx.merge(graphdef, params), schedule, batch["x0"], batch["cond"], key,
                                      cond_drop_prob)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1}
    return new_state, {"diffusion_loss": loss, "grad_norm": optax.global_norm(grads)}

  return state, jax.jit(step, donate_argnums=0)


def check_sample_config(sample: ml_collections.ConfigDict, num_timesteps: int) -> None:
  if sample.sampler not in SAMPLERS:
    raise ValueError(f"config.sample.sampler={sample.sampler!r}; valid: {SAMPLERS}.")
  if sample.variance not in diffusion.VARIANCES:
    raise ValueError(f"config.sample.variance={sample.variance!r}; valid: {diffusion.VARIANCES}.")
  if sample.sampler == "ddim" and not 1 <= sample.ddim_steps <= num_timesteps:
    raise ValueError(f"config.sample.ddim_steps={sample.ddim_steps} must lie in [1, {num_timesteps}].")
  if sample.num_per_category < 1 or sample.batch_size < 1:
    raise ValueError(f"config.sample.num_per_category={sample.num_per_category} and "
                     f"config.sample.batch_size={sample.batch_size} must be positive.")


def make_sampler(graphdef: Any, schedule: diffusion.Schedule, sample: ml_collections.ConfigDict):
  """A jitted sample(params, cond, key) -> x_0 of cond's shape, with guidance w (w = 0: conditional only)."""
  guidance = float(sample.guidance) or None

  def run(params, cond, key):
    denoiser = nnx.merge(graphdef, params)
    if sample.sampler == "ddpm":
      return diffusion.ddpm_sample(denoiser, schedule, cond, key, cond.shape, guidance=guidance,
                                   variance=sample.variance)
    return diffusion.ddim_sample(denoiser, schedule, cond, key, cond.shape, sample.ddim_steps,
                                 eta=sample.ddim_eta, guidance=guidance)

  return jax.jit(run)


def sample_test_categories(config: ml_collections.ConfigDict, workdir: Path, test_split: episodes.FewShotSplit,
                           conds: np.ndarray, draw: Callable[[np.ndarray, jax.Array], np.ndarray]) -> dict[str, Any]:
  """Draws `num_per_category` images for each test exemplar condition (`conds` [C, ...], `draw(conds, key) ->
  images [B, S, S, 1]` in [0, 1]); writes samples.npz and samples.png; returns their paths and timing."""
  s = config.sample
  count = min(s.num_categories or test_split.num_categories, test_split.num_categories)
  repeated = np.repeat(conds[:count], s.num_per_category, axis=0)
  tic = time.perf_counter()
  images = sampling.in_chunks(draw, repeated, min(s.batch_size, len(repeated)),
                              jax.random.key(config.seed + 1))
  seconds = time.perf_counter() - tic
  size = test_split.image_size
  samples = images[..., 0].reshape(count, s.num_per_category, size, size)
  exemplars = test_split.as_float(test_split.exemplars()[:count])[..., 0]
  npz = sampling.save_samples(workdir / "samples.npz", exemplars, samples, test_split.category_names[:count])
  columns = min(s.grid_categories, count)
  grid = sampling.save_grid(workdir / "samples.png", exemplars[:columns], samples[:columns, :s.grid_rows])
  return {"samples": str(npz), "sample_grid": str(grid), "sampler": s.sampler, "guidance": s.guidance,
          "sampling_seconds_per_image": seconds / len(repeated)}


def _sharded_draw(mesh: jax.sharding.Mesh, fn: Callable[[jax.Array, jax.Array], jax.Array]):
  """Runs `fn` on chunks sharded over the mesh when they divide evenly (else on replicated chunks)."""
  def draw(chunk: np.ndarray, key: jax.Array) -> np.ndarray:
    even = len(chunk) % mesh.shape[mesh_lib.DATA_AXIS] == 0
    sharding = mesh_lib.batch_sharded(mesh) if even else mesh_lib.replicated(mesh)
    return np.asarray(fn(jax.device_put(chunk, sharding), key))
  return draw


def latent_epoch_batches(latents: np.ndarray, split: episodes.FewShotSplit, batch_size: int, seed: int,
                         epoch: int, exemplar: str) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of {x0: variation latents, cond: exemplar latents}, paired as `episodes.epoch_batches` pairs."""
  for index, exemplar_index, _ in episodes.epoch_pairs(split, batch_size, seed, epoch, exemplar=exemplar):
    yield {"x0": latents[index], "cond": latents[exemplar_index]}


def train_latent_diffusion(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  if not config.autoencoder_workdir:
    raise ValueError("config.autoencoder_workdir is empty: latent diffusion needs a trained autoencoder; pass "
                     "--config.autoencoder_workdir=<workdir of an autoencoder run>.")
  if config.data.augment:
    raise ValueError("config.data.augment=True is not supported for latent diffusion: latents are encoded once.")
  loop.check_data_config(config.data)
  check_sample_config(config.sample, config.diffusion.num_timesteps)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  autoencoder, ae_info = train_autoencoder.load_autoencoder(config.autoencoder_workdir)
  if ae_info["dataset"] != config.data.dataset:
    raise ValueError(f"the autoencoder in {config.autoencoder_workdir} was trained on {ae_info['dataset']!r}, "
                     f"but config.data.dataset={config.data.dataset!r}.")
  mesh = loop.make_mesh(config)
  nnx.update(autoencoder, mesh_lib.put_replicated(nnx.state(autoencoder), mesh))
  train_split = loop.load_split(config.data, "train")
  test_split = loop.load_split(config.data, "test")
  loop.write_config(config, workdir)

  latents = train_autoencoder.encode_images(autoencoder, train_split.as_float(train_split.images))
  stats = diffusion.fit_latent_stats(latents, per_dimension=config.diffusion.per_dimension_stats)
  standardized = np.asarray(diffusion.standardize(latents, stats))
  m = config.model
  denoiser = LatentUNet(ae_info["latent_dim"], dim=m.dim, dim_mults=tuple(m.dim_mults), time_dim=m.time_dim,
                        groups=m.groups, heads=m.heads, head_dim=m.head_dim,
                        rngs=nnx.Rngs(jax.random.key(config.seed, impl="rbg")))
  batch_size = config.data.batch_size
  steps_per_epoch = episodes.num_batches(train_split, batch_size)
  optimizer = make_optimizer(config.optim, steps_per_epoch, loop.total_steps(config.optim, max(steps_per_epoch, 1)))
  state, step_fn = make_train_step(denoiser, optimizer, schedule, config.diffusion.cond_drop_prob)
  result = loop.run_loop(
      config, workdir, state, step_fn,
      lambda epoch: latent_epoch_batches(standardized, train_split, batch_size, config.seed, epoch,
                                         config.data.exemplar),
      steps_per_epoch, mesh)

  sampler = make_sampler(nnx.graphdef(denoiser), schedule, config.sample)
  decode = train_autoencoder.decoder_fn(autoencoder)
  params = result.state["params"]

  def draw(conds: jax.Array, key: jax.Array) -> jax.Array:
    return decode(diffusion.unstandardize(sampler(params, conds, key), stats))

  test_latents = train_autoencoder.encode_images(autoencoder, test_split.as_float(test_split.exemplars()))
  conds = np.asarray(diffusion.standardize(test_latents, stats))
  samples = sample_test_categories(config, workdir, test_split, conds, _sharded_draw(mesh, draw))
  results = {"step": result.step, "history": result.history, "autoencoder_workdir": str(config.autoencoder_workdir),
             "latent_stats": {"mean": np.asarray(stats.mean).tolist(), "std": np.asarray(stats.std).tolist()},
             **samples}
  loop.write_results(workdir, results)
  result.writer.close()
  return results


def to_signed(images: np.ndarray) -> np.ndarray:
  return images * 2.0 - 1.0


def train_pixel_diffusion(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  loop.check_data_config(config.data)
  check_sample_config(config.sample, config.diffusion.num_timesteps)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  mesh = loop.make_mesh(config)
  train_split = loop.load_split(config.data, "train")
  test_split = loop.load_split(config.data, "test")
  loop.write_config(config, workdir)
  m = config.model
  denoiser = PixelUNet(channels=1, features=m.features, dim_mults=tuple(m.dim_mults), convnext_mult=m.convnext_mult,
                       heads=m.heads, head_dim=m.head_dim, rngs=nnx.Rngs(jax.random.key(config.seed, impl="rbg")))
  batch_size = config.data.batch_size
  steps_per_epoch = episodes.num_batches(train_split, batch_size)
  optimizer = make_optimizer(config.optim, steps_per_epoch, loop.total_steps(config.optim, max(steps_per_epoch, 1)))
  state, step_fn = make_train_step(denoiser, optimizer, schedule, config.diffusion.cond_drop_prob)

  def epoch_batches(epoch: int) -> Iterator[dict[str, np.ndarray]]:
    for batch in episodes.epoch_batches(train_split, batch_size, config.seed, epoch, exemplar=config.data.exemplar,
                                        augment=config.data.augment):
      yield {"x0": to_signed(batch["variation"]), "cond": to_signed(batch["exemplar"])}

  result = loop.run_loop(config, workdir, state, step_fn, epoch_batches, steps_per_epoch, mesh)
  sampler = make_sampler(nnx.graphdef(denoiser), schedule, config.sample)
  params = result.state["params"]

  def draw(conds: jax.Array, key: jax.Array) -> jax.Array:
    return jnp.clip((sampler(params, conds, key) + 1.0) / 2.0, 0.0, 1.0)

  conds = to_signed(test_split.as_float(test_split.exemplars()))
  samples = sample_test_categories(config, workdir, test_split, conds, _sharded_draw(mesh, draw))
  results = {"step": result.step, "history": result.history, **samples}
  loop.write_results(workdir, results)
  result.writer.close()
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the latent or pixel diffusion model of `config.task` in `workdir`."""
  if config.task == "latent_diffusion":
    return train_latent_diffusion(config, Path(workdir))
  if config.task == "pixel_diffusion":
    return train_pixel_diffusion(config, Path(workdir))
  raise ValueError(f"config.task={config.task!r}; this trainer handles 'latent_diffusion' and 'pixel_diffusion'.")
