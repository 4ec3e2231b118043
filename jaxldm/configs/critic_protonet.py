"""Prototypical-network critic (diversity_vs_recognizability `2_train_protonet.py`), the recognizability judge.

  python train.py --config=jaxldm/configs/critic_protonet.py:cpu --workdir=runs/critic_protonet

Reference: 256-d embedding, metric layer to 128, squared L2 to class prototypes; 60-way 1-shot episodes
with 5 queries per class, 100 episodes per epoch, 80 epochs, Adam 1e-3 halved every 20 epochs; tested
20-way 1-shot on the test categories. Support and queries are distinct random drawings of each class.
"""

from __future__ import annotations

import ml_collections

from jaxldm.configs import check_variant
from jaxldm.configs.critic_simclr import critic_base


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = check_variant(variant)
  c = critic_base("protonet", variant)
  c.protonet = ml_collections.ConfigDict()
  c.protonet.way = 60
  c.protonet.shot = 1
  c.protonet.queries = 5
  c.protonet.episodes_per_epoch = 100
  c.optim.epochs = 80
  c.optim.lr_halving_epochs = 20
  if variant == "cpu":
    c.protonet.way = 20
    c.optim.epochs = 3
    c.optim.lr_halving_epochs = 0
  return c
