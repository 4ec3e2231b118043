"""Pixel-space guided DDPM with the exemplar as a second channel (diffusion_as_artist `train_guided_diffusion.py`).

  python train.py --config=jaxldm/configs/pixel_diffusion.py:cpu --workdir=runs/pixel

Reference: `Unet_V2_Omniglot` (48 features, mults (1, 2, 4)), T = 500 linear betas 1e-4-0.02, condition
dropout 0.1, Adam 1e-4 decayed linearly to 0 over 300 epochs, batch 128. Images are mapped to [-1, 1].
"""

from __future__ import annotations

import ml_collections

from jaxldm.configs import base_config, check_variant, sample_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = check_variant(variant)
  c = base_config("pixel_diffusion")
  c.model = ml_collections.ConfigDict()
  c.model.features = 48
  c.model.dim_mults = (1, 2, 4)
  c.model.convnext_mult = 2
  c.model.heads = 4
  c.model.head_dim = 32
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"
  c.diffusion.num_timesteps = 500
  c.diffusion.cond_drop_prob = 0.1
  c.optim.epochs = 300
  c.optim.weight_decay = 0.0
  c.optim.adam_eps = 1e-8
  c.optim.linear_decay = True
  c.sample = sample_config(guidance=1.0, num_per_category=20, variance="beta")
  if variant == "cpu":
    c.model.features = 16
    c.model.dim_mults = (1, 2)
    c.model.heads = 2
    c.model.head_dim = 16
    c.data.batch_size = 64
    c.optim.epochs = 1
    c.optim.learning_rate = 5e-4
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 200
    c.sample.sampler = "ddim"
    c.sample.num_per_category = 4
    c.sample.num_categories = 10
  return c
