"""Autoencoder with pluggable latent losses (LatentMatters `train_RAE.py`).

  python train.py --config=jaxldm/configs/autoencoder.py:cpu --config.latent_losses='barlow:30,prototype:1' \
      --workdir=runs/ae_barlow_proto

Reference: Adam 1e-4 with L2 weight decay 1e-5, batch 128, 100 epochs on the episodes of the training
categories. `model.latent_dim` 0 picks the paper's size: 64 for Omniglot, 128 for QuickDraw-FS.
"""

from __future__ import annotations

import ml_collections

from jaxldm.configs import base_config, check_variant


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = check_variant(variant)
  c = base_config("autoencoder")
  c.latent_losses = "none"  # NAME:WEIGHT[,NAME:WEIGHT...], names in jaxldm.latent_losses.LATENT_LOSSES
  c.model = ml_collections.ConfigDict()
  c.model.latent_dim = 0  # 0 = 64 (omniglot) / 128 (quickdraw_fs)
  c.optim.weight_decay = 1e-5
  c.grid_categories = 12  # test categories in the reconstruction grid
  c.eval_categories = 0  # test categories of the final reconstruction loss; 0 = all 150
  if variant == "cpu":
    c.optim.epochs = 1
    c.optim.learning_rate = 1e-3
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 200
  return c
