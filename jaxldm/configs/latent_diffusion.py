"""Exemplar-conditioned latent diffusion on a trained autoencoder (LatentMatters `train_difusion.py`).

  python train.py --config=jaxldm/configs/latent_diffusion.py:cpu --config.autoencoder_workdir=runs/ae_barlow \
      --workdir=runs/ldm_barlow

Reference: MLP U-Net (dim 64, mults (1, 2), 4 heads of 32), T = 1000 'scaled_linear' betas 0.0015-0.0195,
condition dropout 0.1 (classifier-free guidance), AdamW 1e-4 (eps 1e-5), batch 128. Latents come from the
autoencoder's deterministic encoder, standardised by one scalar mean and std fitted on the training set.
"""

from __future__ import annotations

import ml_collections

from jaxldm.configs import base_config, check_variant, sample_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = check_variant(variant)
  c = base_config("latent_diffusion")
  c.autoencoder_workdir = ""  # workdir of a finished `autoencoder` run (required)
  c.model = ml_collections.ConfigDict()
  c.model.dim = 64
  c.model.dim_mults = (1, 2)
  c.model.time_dim = 128
  c.model.groups = 8
  c.model.heads = 4
  c.model.head_dim = 32
  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "scaled_linear"
  c.diffusion.num_timesteps = 1000
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.per_dimension_stats = False
  c.optim.epochs = 300
  c.optim.weight_decay = 0.01  # PyTorch AdamW's default
  c.optim.adam_eps = 1e-5
  c.optim.linear_decay = False
  c.train.log_every_steps = 200
  c.sample = sample_config(guidance=1.0, num_per_category=20, variance="posterior")
  if variant == "cpu":
    c.optim.epochs = 10
    c.optim.learning_rate = 1e-3
    c.optim.linear_decay = True
    c.train.log_every_steps = 230
    c.train.checkpoint_every_steps = 2000
    c.sample.sampler = "ddim"
    c.sample.num_per_category = 10
  return c
