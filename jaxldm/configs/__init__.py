"""Configs of the jaxldm tasks (autoencoder, latent_diffusion, pixel_diffusion); the pieces they share.

Every config has variants 'reference' (the papers' scale) and 'cpu' (trains in minutes on 2 cores).
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("reference", "cpu")
DATASETS = ("omniglot", "quickdraw_fs")


def check_variant(variant: str | None) -> str:
  variant = variant or "reference"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; valid: {VARIANTS} (e.g. --config=...py:cpu).")
  return variant


def base_config(task: str) -> ml_collections.ConfigDict:
  """Task, seed, data, optimiser and loop fields common to every jaxldm trainer (reference values)."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "omniglot"  # one of DATASETS
  c.data.data_root = ""  # "" = --data_root, else $JAXDATA_ROOT, else ~/.cache/jaxdata
  c.data.tfds_dir = ""  # "" = $JAXDATA_TFDS_DIR, else ~/.cache/jaxdata/tfds
  c.data.image_size = 48
  c.data.quickdraw_source = "strokes"  # quickdraw_fs only: 'strokes' (.ndjson) or 'bitmap' (.npy)
  c.data.drawings_per_category = 20  # quickdraw_fs only
  c.data.exemplar = "first"  # 'first' (fixed exemplar per category) or 'shuffle'
  c.data.augment = False  # the reference's augment_class
  c.data.batch_size = 128
  c.data.train_categories = 0  # > 0 keeps only the first N training categories (quick runs, tests)

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.epochs = 100
  c.optim.max_steps = -1  # > 0 stops early (tests, benchmarks)

  c.train = ml_collections.ConfigDict()
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 2000
  c.train.num_devices = 0  # 0 = all local devices
  c.train.progress_bar = True
  return c


def sample_config(guidance: float, num_per_category: int, variance: str) -> ml_collections.ConfigDict:
  """How the end-of-training samples for the test categories are drawn."""
  s = ml_collections.ConfigDict()
  s.sampler = "ddpm"  # 'ddpm' (ancestral, all T steps) or 'ddim'
  s.ddim_steps = 50
  s.variance = variance  # DDPM step variance: 'posterior' (LatentMatters) or 'beta' (diffusion_as_artist)
  s.ddim_eta = 0.0
  s.guidance = guidance  # w in eps = (1 + w) eps_c - w eps_u
  s.num_per_category = num_per_category
  s.num_categories = 0  # 0 = every test category
  s.batch_size = 500  # conditions per sampler call
  s.grid_categories = 10  # columns of the PNG grid
  s.grid_rows = 10  # sample rows under the exemplar row
  return s
