"""SimCLR feature critic (diversity_vs_recognizability `2_train_simclr.py`), the diversity/originality judge.

  python train.py --config=jaxldm/configs/critic_simclr.py:cpu --workdir=runs/critic_simclr

Reference: 256-d embedding, projection to 128, NT-Xent with tau 0.5 between two 'normal'-strength
augmented views, RMSprop 1e-3 (PyTorch defaults: alpha 0.99, eps 1e-8), batch 128, 100 epochs over the
drawings of the Omniglot training categories at 50x50.
"""

from __future__ import annotations

import ml_collections

from jaxldm.configs import base_config, check_variant

CRITIC_IMAGE_SIZE = 50


def critic_base(kind: str, variant: str) -> ml_collections.ConfigDict:
  """Fields shared by both critics: task 'critic', 50x50 Omniglot, test-time 20-way 1-shot accuracy."""
  c = base_config("critic")
  c.kind = kind  # 'simclr' or 'protonet'
  c.data.image_size = CRITIC_IMAGE_SIZE
  c.model = ml_collections.ConfigDict()
  c.model.embedding_size = 256
  c.optim.optimizer = "adam"  # 'adam' or 'rmsprop'
  c.optim.learning_rate = 1e-3
  c.optim.lr_halving_epochs = 0  # > 0 halves the learning rate every that many epochs (PyTorch StepLR)
  c.eval = ml_collections.ConfigDict()
  c.eval.way = 20
  c.eval.episodes = 1000
  c.train.checkpoint_every_steps = 500
  if variant == "cpu":
    c.eval.episodes = 300
    c.train.log_every_steps = 25
    c.train.checkpoint_every_steps = 100
  return c


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = check_variant(variant)
  c = critic_base("simclr", variant)
  c.simclr = ml_collections.ConfigDict()
  c.simclr.temperature = 0.5
  c.optim.optimizer = "rmsprop"
  c.optim.epochs = 100
  if variant == "cpu":
    c.data.batch_size = 64
    c.optim.epochs = 1
  return c
