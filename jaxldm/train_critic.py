"""Training the evaluation critics (task 'critic'): the SimCLR feature network or the prototypical network.

`train_and_evaluate(config, workdir)` trains `config.kind` on the Omniglot training categories at 50x50 with
the pure jitted steps of `jaxldm.critics`, through the shared loop of `jaxldm.train` (data-parallel mesh,
orbax checkpoints with the data position, TensorBoard metrics), then measures 20-way 1-shot accuracy on
the test categories with the critic's features (SimCLR: the 256-d embedding; prototypical: the metric
layer), and writes results.json. `load_trained_critic(workdir)` gives the trained critic in eval mode.

Batches are deterministic functions of (seed, epoch): SimCLR sees every training drawing once per epoch
in a seeded order; the prototypical net sees `episodes_per_epoch` episodes of `way` distinct categories,
each with `shot` support and `queries` query drawings, all distinct.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxldm import critics, metrics
from jaxldm import train as loop
from jaxldm.datasets.episodes import FewShotSplit
from trainkit import mesh as mesh_lib
from trainkit.checkpoint import Checkpointer

KINDS = ("simclr", "protonet")
OPTIMIZERS = ("adam", "rmsprop")
MODEL_FILE = "critic.json"


def check_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors for a bad critic kind, optimiser, image size or episode shape."""
  if config.kind not in KINDS:
    raise ValueError(f"config.kind={config.kind!r}; valid: {KINDS}.")
  if config.optim.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.optim.optimizer={config.optim.optimizer!r}; valid: {OPTIMIZERS}.")
  if config.data.image_size != critics.IMAGE_SIZE:
    raise ValueError(f"config.data.image_size={config.data.image_size}: the critics take {critics.IMAGE_SIZE}x"
                     f"{critics.IMAGE_SIZE} drawings.")
  if config.kind == "protonet":
    p = config.protonet
    if p.way < 2 or p.shot < 1 or p.queries < 1:
      raise ValueError(f"config.protonet needs way >= 2, shot >= 1, queries >= 1; got way={p.way}, "
                       f"shot={p.shot}, queries={p.queries}.")
    if p.episodes_per_epoch < 1:
      raise ValueError(f"config.protonet.episodes_per_epoch={p.episodes_per_epoch} must be positive.")


def build_critic(kind: str, embedding_size: int, seed: int) -> critics.SimCLRCritic | critics.ProtoNetCritic:
  cls = critics.SimCLRCritic if kind == "simclr" else critics.ProtoNetCritic
  return cls(embedding_size, rngs=nnx.Rngs(seed))


def make_optimizer(optim: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam or RMSprop (PyTorch's: alpha 0.99, eps outside the square root) with optional StepLR halving."""
  lr: float | optax.Schedule = optim.learning_rate
  if optim.lr_halving_epochs > 0:
    lr = optax.exponential_decay(optim.learning_rate, optim.lr_halving_epochs * steps_per_epoch, 0.5,
                                 staircase=True)
  if optim.optimizer == "adam":
    return optax.adam(lr)
  return optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)


def _as_state(state: critics.CriticTrainState) -> dict[str, Any]:
  return state._asdict()


def make_step(kind: str, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
              config: ml_collections.ConfigDict) -> Callable:
  """step(state dict, batch, key) -> (state dict, metrics) around the critic's pure jitted step."""
  if kind == "simclr":
    inner = critics.make_simclr_train_step(graphdef, tx, config.simclr.temperature)
    call = lambda state, batch, key: inner(state, batch["images"], key)
  else:
    p = config.protonet
    inner = critics.make_protonet_train_step(graphdef, tx, p.way, p.shot)
    call = lambda state, batch, key: inner(state, batch["support"], batch["queries"])

  def step(state, batch, key):
    new_state, step_metrics = call(critics.CriticTrainState(**state), batch, key)
    return _as_state(new_state), step_metrics

  return jax.jit(step, donate_argnums=0)


def simclr_batches(split: FewShotSplit, batch_size: int, seed: int, epoch: int) -> Iterator[dict[str, np.ndarray]]:
  """Every drawing once in a seeded order, as float [B, 50, 50, 1] batches (the last partial one dropped)."""
  order = np.random.default_rng([seed, epoch]).permutation(len(split.images))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    yield {"images": split.as_float(split.images[order[start:start + batch_size]])}


def episode_indices(split: FewShotSplit, rng: np.random.Generator, way: int, per_class: int) -> np.ndarray:
  """Indices [way, per_class] of distinct drawings of `way` distinct random categories of `split`."""
  starts = np.searchsorted(split.labels, np.arange(split.num_categories))
  counts = np.bincount(split.labels, minlength=split.num_categories)
  if way > split.num_categories or np.any(counts < per_class):
    raise ValueError(f"episodes of way={way} with {per_class} drawings per class do not fit a split of "
                     f"{split.num_categories} categories with at least {counts.min()} drawings each")
  categories = rng.choice(split.num_categories, way, replace=False)
  return np.stack([starts[c] + rng.choice(counts[c], per_class, replace=False) for c in categories])


def protonet_episode(split: FewShotSplit, rng: np.random.Generator, way: int, shot: int, queries: int
                     ) -> dict[str, np.ndarray]:
  """One training episode: `shot` support and `queries` query drawings of `way` categories (class-major)."""
  picks = episode_indices(split, rng, way, shot + queries)
  return {"support": split.as_float(split.images[picks[:, :shot].ravel()]),
          "queries": split.as_float(split.images[picks[:, shot:].ravel()])}


def protonet_batches(split: FewShotSplit, p: ml_collections.ConfigDict, seed: int, epoch: int
                     ) -> Iterator[dict[str, np.ndarray]]:
  rng = np.random.default_rng([seed, epoch])
  for _ in range(p.episodes_per_epoch):
    yield protonet_episode(split, rng, p.way, p.shot, p.queries)


def one_shot_accuracy(features: np.ndarray, split: FewShotSplit, way: int, episodes: int, seed: int) -> float:
  """Mean accuracy of nearest-prototype classification on `way`-way 1-shot, 1-query episodes of `split`.

  `features` [N, D] are the critic's features of every drawing of the split, in the split's order.
  """
  rng = np.random.default_rng(seed)
  pairs = np.stack([episode_indices(split, rng, way, 2) for _ in range(episodes)])  # [E, way, 2]
  support, queries = features[pairs[..., 0]], features[pairs[..., 1]]
  logits = jax.vmap(lambda s, q: critics.prototype_logits(s, q, way, 1))(jnp.asarray(support),
                                                                          jnp.asarray(queries))
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.arange(way)))


def critic_features(model: nnx.Module, kind: str, images: np.ndarray) -> np.ndarray:
  """SimCLR: the 256-d embedding; prototypical: the metric-layer output; images float [N, 50, 50, 1]."""
  embedding, head = metrics.critic_apply(model)(images)
  return embedding if kind == "simclr" else head


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check_config(config)
  workdir_path = Path(workdir)
  mesh = mesh_lib.make_data_mesh(config.train.num_devices or None)
  train_split = loop.load_split(config.data, "train")
  test_split = loop.load_split(config.data, "test")
  loop.write_config(config, workdir_path)
  model_info = {"kind": config.kind, "embedding_size": config.model.embedding_size, "seed": config.seed}
  (workdir_path / MODEL_FILE).write_text(json.dumps(model_info, indent=2))

  if config.kind == "simclr":
    mesh_lib.check_divisible(config.data.batch_size, mesh)
    steps_per_epoch = len(train_split.images) // config.data.batch_size
    epoch_batches = lambda epoch: simclr_batches(train_split, config.data.batch_size, config.seed, epoch)
  else:
    mesh_lib.check_divisible(config.protonet.way, mesh)
    steps_per_epoch = config.protonet.episodes_per_epoch
    epoch_batches = lambda epoch: protonet_batches(train_split, config.protonet, config.seed, epoch)

  model = build_critic(config.kind, config.model.embedding_size, config.seed)
  tx = make_optimizer(config.optim, steps_per_epoch)
  graphdef, state = critics.init_train_state(model, tx)
  step_fn = make_step(config.kind, graphdef, tx, config)
  result = loop.run_loop(config, workdir_path, _as_state(state), step_fn, epoch_batches, steps_per_epoch, mesh)

  trained = critics.to_model(graphdef, critics.CriticTrainState(**jax.device_get(result.state)))
  features = critic_features(trained, config.kind, test_split.as_float(test_split.images))
  test = {f"{config.eval.way}way_1shot_accuracy": one_shot_accuracy(
      features, test_split, config.eval.way, config.eval.episodes, config.seed)}
  result.writer.write(result.step, test, prefix="test/")
  results = {"step": result.step, "history": result.history, "test": test, **model_info}
  loop.write_results(workdir_path, results)
  result.writer.close()
  return results


def load_trained_critic(workdir: str | Path) -> critics.SimCLRCritic | critics.ProtoNetCritic:
  """The critic of a finished `critic` run in `workdir`, in eval mode (its newest checkpoint)."""
  workdir = Path(workdir)
  info_path = workdir / MODEL_FILE
  if not info_path.is_file():
    raise FileNotFoundError(f"{workdir} is not a critic workdir: {MODEL_FILE} is missing (train one with "
                            f"train.py --config=jaxldm/configs/critic_simclr.py --workdir={workdir}).")
  info = json.loads(info_path.read_text())
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  model = build_critic(info["kind"], info["embedding_size"], info["seed"])
  graphdef, state = critics.init_train_state(model, make_optimizer(config.optim, 1))
  restored = Checkpointer(workdir / "checkpoints").restore_latest(_as_state(state))
  if restored is None:
    raise FileNotFoundError(f"{workdir / 'checkpoints'} holds no checkpoint of the {info['kind']} critic.")
  return critics.to_model(graphdef, critics.CriticTrainState(**restored[0]))
