"""The language-model config shared by every cell and corpus: the reference recipe and its CPU variant."""

from __future__ import annotations

import ml_collections

from jaxsparse import pruning

# Per-corpus recipe of the EvNN reference (benchmarks/lm/README.md): batch, lr, weight decay, epochs, cosine start,
# and the AWD locked dropout on embeddings.
RECIPES = {
    "ptb": dict(batch_size=64, learning_rate=1.2e-3, weight_decay=0.1, epochs=1000, cosine_start_epoch=700,
                embedding_dropout=0.6),
    "wikitext-2": dict(batch_size=128, learning_rate=1e-3, weight_decay=0.12, epochs=800, cosine_start_epoch=400,
                       embedding_dropout=0.7),
}
VARIANTS = ("reference", "cpu")


def get_lm_config(cell: str, corpus: str, variant: str | None) -> ml_collections.ConfigDict:
  """Builds the config of `cell` on `corpus`; `variant` 'cpu' is the 3-layer 256-512-512-256 model."""
  variant = variant or "reference"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown config variant {variant!r}; valid: {VARIANTS} (e.g. --config=...py:cpu).")
  recipe = RECIPES[corpus]
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.corpus = corpus
  c.data.data_root = ""
  c.data.batch_size = recipe["batch_size"]
  c.data.eval_batch_size = recipe["batch_size"]
  c.data.test_batch_size = 1
  c.data.bptt = 70
  c.data.random_length = True
  c.data.length_quantum = 1

  c.model = ml_collections.ConfigDict()
  c.model.cell = cell
  c.model.embedding_size = 750
  c.model.hidden_sizes = (1350, 1350, 750)
  c.model.word_dropout = 0.1
  c.model.embedding_dropout = recipe["embedding_dropout"]
  c.model.between_dropout = 0.25
  c.model.output_dropout = 0.5
  c.model.dropconnect = 0.7
  c.model.threshold_mean = 0.01
  c.model.trainable_thresholds = False
  c.model.weight_init_gain = 1.0
  c.model.gamma = 3.6  # pseudo-derivative dampening
  c.model.eps = 3.6  # pseudo-derivative support: nonzero for |c~ - theta| < 1 / eps
  c.model.carry_internal_state = False
  c.model.activity_regularization = 0.0

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = recipe["learning_rate"]
  c.optim.b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.weight_decay = recipe["weight_decay"]
  c.optim.grad_clip = 0.1
  c.optim.epochs = float(recipe["epochs"])
  c.optim.cosine_start_epoch = float(recipe["cosine_start_epoch"])
  c.optim.max_steps = -1  # > 0 stops early (smoke tests, benchmarks)

  c.pruning = pruning.default_config()

  c.train = ml_collections.ConfigDict()
  c.train.log_every_steps = 50
  c.train.eval_every_epochs = 1
  c.train.checkpoint_every_steps = 500
  c.train.num_devices = 0  # 0 = all local devices
  c.train.test_at_end = True
  c.train.progress_bar = True
  c.train.init_from = ""  # a workdir whose latest checkpoint gives the starting parameters (fine-tuning)

  if variant == "cpu":
    c.model.embedding_size = 256
    c.model.hidden_sizes = (512, 512, 256)
    c.data.batch_size = c.data.eval_batch_size = 32
    c.data.length_quantum = 5
    # A few epochs of a small model: lighter AWD regularisation than the 1000-epoch recipe.
    c.model.word_dropout = 0.05
    c.model.embedding_dropout = 0.3
    c.model.between_dropout = 0.15
    c.model.output_dropout = 0.3
    c.model.dropconnect = 0.3
    c.optim.learning_rate = 2e-3
    c.optim.epochs = 1.0
    c.optim.cosine_start_epoch = 0.5
    c.train.checkpoint_every_steps = 200
  return c
