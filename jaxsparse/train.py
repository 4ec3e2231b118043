"""Language-model training: one jitted, data-parallel step per BPTT window; resumable from orbax checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from jaxsparse import accounting, corpora, pruning
from jaxsparse.lm import LanguageModel
from jaxsparse.events import Threshold
from trainkit import mesh as mesh_lib
from trainkit.checkpoint import Checkpointer
from trainkit.metrics import MetricWriter

TrainState = dict[str, Any]


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int, seed: int) -> LanguageModel:
  """The language model of `config.model`; every field but `activity_regularization` is a constructor argument."""
  kwargs = {k: v for k, v in model_config.to_dict().items() if k != "activity_regularization"}
  kwargs["hidden_sizes"] = tuple(kwargs["hidden_sizes"])
  return LanguageModel(vocab_size=vocab_size, rngs=nnx.Rngs(seed), **kwargs)


def make_optimizer(config: ml_collections.ConfigDict, trainable: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW's direction without the learning rate (the step multiplies by -lr),
  inside the pruning wrapper that holds the masks and keeps pruned weights' updates at zero.

  Weight decay applies to parameters, never to thresholds.
  """
  o = config.optim
  decay_mask = {k: jax.tree.map(lambda _: k == "params", v) for k, v in trainable.items()}
  adamw = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=1e-8),
      optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
  )
  return pruning.masked_updates(adamw, pruning.PruningConfig.from_config(config.pruning))


def learning_rate(config: ml_collections.ConfigDict, epoch_progress: float, window_length: int) -> float:
  """Constant, then cosine to 0 from `cosine_start_epoch` to `epochs`; scaled by window length / bptt (AWD)."""
  o = config.optim
  lr = o.learning_rate
  if epoch_progress > o.cosine_start_epoch:
    span = max(o.epochs - o.cosine_start_epoch, 1e-9)
    frac = min((epoch_progress - o.cosine_start_epoch) / span, 1.0)
    lr *= 0.5 * (1.0 + math.cos(math.pi * frac))
  return lr * window_length / config.data.bptt


class Trainer:
  """Holds the static pieces (graph, optimizer, mesh, jitted steps) around a pure pytree train state."""

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    model = build_model(config.model, vocab_size, config.seed)
    self.graphdef, params, thresholds, rest = nnx.split(model, nnx.Param, Threshold, ...)
    self._rest = rest
    trainable = {"params": params}
    frozen = {}
    if config.model.trainable_thresholds:
      trainable["thresholds"] = thresholds
    else:
      frozen["thresholds"] = thresholds
    self.tx = make_optimizer(config, trainable)
    self._model = model
    self._initial = dict(trainable=trainable, frozen=frozen)
    self.train_step = jax.jit(self._train_step, donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step, donate_argnums=(1, 2))

  def init_state(self) -> TrainState:
    c = self.config
    trainable, frozen = self._initial["trainable"], self._initial["frozen"]
    state = dict(
        trainable=trainable, frozen=frozen, opt_state=self.tx.init(trainable),
        carry=self._model.initial_carry(c.data.batch_size), key=jax.random.key_data(jax.random.key(c.seed)),
        step=jnp.zeros((), jnp.int32))
    return self.place(state)

  def place(self, state: TrainState) -> TrainState:
    """Replicates everything but the recurrent carry, which is sharded over the batch like the data."""
    replicated, by_batch = mesh_lib.replicated(self.mesh), mesh_lib.batch_sharded(self.mesh)
    placed = jax.device_put({k: v for k, v in state.items() if k != "carry"}, replicated)
    placed["carry"] = jax.device_put(state["carry"], by_batch)
    return placed

  def start_from(self, state: TrainState, workdir: Path) -> TrainState:
    """Fresh optimizer, carry and step around the parameters of another run's latest checkpoint.

    The other run may use another cell of the same parameter shapes: a GRU checkpoint starts an EGRU (same
    W, R and biases; the EGRU keeps its own thresholds). Started so, the 3-layer EGRU learns at CPU scale,
    where from scratch it stays on the unigram plateau (README).
    """
    source = self._source_trainer(workdir)
    template = source.init_state() if source is not self else state
    restored = Checkpointer(workdir / "checkpoints").restore_latest(template)
    if restored is None:
      raise FileNotFoundError(f"--config.train.init_from={workdir} holds no checkpoint in {workdir / 'checkpoints'}.")
    if source is self:
      trainable, frozen = restored[0]["trainable"], restored[0]["frozen"]
    else:  # another cell: its parameters, this model's thresholds
      trainable = dict(state["trainable"], params=restored[0]["trainable"]["params"])
      frozen = state["frozen"]
    return dict(state, trainable=trainable, frozen=frozen, opt_state=self.tx.init(trainable))

  def _source_trainer(self, workdir: Path) -> "Trainer":
    """`self`, or a trainer of the checkpoint's own cell when `workdir/config.json` names another one."""
    config_path = workdir / "config.json"
    if not config_path.exists():
      return self
    source_model = json.loads(config_path.read_text())["model"]
    if source_model["cell"] == self.config.model.cell:
      return self
    source_config = ml_collections.ConfigDict(self.config.to_dict())
    source_config.model = ml_collections.ConfigDict({**self.config.model.to_dict(), **source_model})
    source = Trainer(source_config, self._model.vocab_size, self.mesh)
    ours = _param_shapes(self._initial["trainable"]["params"])
    if ours != _param_shapes(source._initial["trainable"]["params"]):
      raise ValueError(f"--config.train.init_from={workdir} holds a {source_model['cell']} model whose parameters "
                       f"do not fit a {self.config.model.cell} of this config: only cells with the same number of "
                       f"gates and the same sizes can start one another (a gru can start an egru).")
    return source

  def model(self, trainable: Any, frozen: Any) -> LanguageModel:
    thresholds = trainable.get("thresholds", frozen.get("thresholds"))
    return nnx.merge(self.graphdef, trainable["params"], thresholds, self._rest)

  def _train_step(self, state: TrainState, inputs: jax.Array, targets: jax.Array, lr: jax.Array):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["step"])

    def loss_fn(trainable):
      model = self.model(trainable, state["frozen"])
      logits, carry, aux = model(inputs, state["carry"], key=key, train=True)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
      loss = nll
      if self.config.model.activity_regularization:  # static: no backward pass through a zero-weight term
        loss = loss + self.config.model.activity_regularization * aux["activity_regularizer"]
      return loss, (carry, nll, aux)

    (_, (carry, nll, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["trainable"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["trainable"])
    trainable = jax.tree.map(lambda p, u: p - lr * u, state["trainable"], updates)
    trainable = pruning.apply_masks(trainable, pruning.masks_of(opt_state))
    new_state = dict(state, trainable=trainable, opt_state=opt_state, carry=jax.lax.stop_gradient(carry),
                     step=state["step"] + 1)
    metrics = dict(nll=nll, grad_norm=optax.global_norm(grads), **_layer_metrics(aux))
    return new_state, metrics

  def _eval_step(self, state: TrainState, carry: Any, tally: accounting.MacTally | None, inputs: jax.Array,
                 targets: jax.Array):
    model = self.model(state["trainable"], state["frozen"])
    logits, new_carry, aux = model(inputs, carry, train=False, return_events=tally is not None)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).sum()
    if tally is not None:
      tally = accounting.tally_lm_window(tally, model.embedding[...], inputs, aux["events"],
                                         accounting.carry_outputs(carry))
    return new_carry, tally, nll, _layer_metrics(aux)

  def evaluate(self, state: TrainState, ids: np.ndarray, batch_size: int, count_macs: bool = False
               ) -> dict[str, Any]:
    """Perplexity and activity over a whole split, the hidden state carried across windows; with
    `count_macs`, also the exact effective MACs per token of an event-driven engine (`accounting`)."""
    stream = corpora.batchify(ids, batch_size)
    shardable = batch_size % self.mesh.shape[mesh_lib.DATA_AXIS] == 0
    sharding = mesh_lib.batch_sharded(self.mesh) if shardable else mesh_lib.replicated(self.mesh)
    carry = jax.device_put(self._model.initial_carry(batch_size), sharding)
    matrices = accounting.lm_matrices(state["trainable"]["params"])
    tally = accounting.init_tally(matrices) if count_macs else None
    total_nll, total_tokens, sums = 0.0, 0, {}
    for inputs, targets in corpora.eval_windows(stream, self.config.data.bptt):
      inputs, targets = jax.device_put((inputs, targets), sharding)
      carry, tally, nll, layer = self.eval_step(state, carry, tally, inputs, targets)
      tokens = targets.size
      total_nll += nll
      total_tokens += tokens
      for k, v in layer.items():
        sums[k] = sums.get(k, 0.0) + v * tokens
    out: dict[str, Any] = {k: float(v) / total_tokens for k, v in sums.items()}
    out["nll"] = float(total_nll) / total_tokens
    out["ppl"] = math.exp(out["nll"])
    if count_macs:
      out["macs"] = accounting.mac_report(tally, matrices)
    return out


def _param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _layer_metrics(aux: dict) -> dict[str, jax.Array]:
  metrics = {"activity/mean": aux["mean_activity"]}
  for i in range(aux["activity"].shape[0]):
    metrics[f"activity/layer{i}"] = aux["activity"][i]
    metrics[f"backward_sparsity/layer{i}"] = aux["backward_sparsity"][i]
  return metrics


def _scalars(evaluation: dict[str, Any]) -> dict[str, float]:
  """The evaluation's scalars, with the MAC report flattened to its per-token counts and reduction."""
  out = {k: v for k, v in evaluation.items() if k != "macs"}
  if "macs" in evaluation:
    out.update({f"macs_per_token/{k}": v for k, v in evaluation["macs"]["macs_per_token"].items()})
    out["macs/reduction"] = evaluation["macs"]["reduction"]
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the language model described by `config` in `workdir`, resuming from its latest checkpoint."""
  workdir_path = Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  corpus = corpora.load_corpus(config.data.corpus, config.data.data_root or None)
  mesh = mesh_lib.make_data_mesh(config.train.num_devices or None)
  mesh_lib.check_divisible(config.data.batch_size, mesh)
  trainer = Trainer(config, corpus.vocab_size, mesh)
  windows = corpora.TrainWindows(corpora.batchify(corpus.train, config.data.batch_size), config.data.bptt,
                                 seed=config.seed, random_length=config.data.random_length,
                                 quantum=config.data.length_quantum)
  checkpointer = Checkpointer(workdir_path / "checkpoints")
  state = trainer.init_state()
  meta: dict[str, Any] = {"history": []}
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, meta = restored
    windows.restore(meta["windows"])
    logging.info("Resumed from step %d (epoch %.2f).", int(state["step"]), windows.epoch_progress)
  elif config.train.init_from:
    state = trainer.start_from(state, Path(config.train.init_from))
  (workdir_path / "config.json").write_text(config.to_json_best_effort(indent=2))

  max_steps = config.optim.max_steps if config.optim.max_steps > 0 else None
  estimated_total = max_steps or int(config.optim.epochs * windows.windows_per_epoch())
  step = int(state["step"])
  writer = MetricWriter(workdir_path, estimated_total, step, progress=config.train.progress_bar)
  batch_sharding = mesh_lib.batch_sharded(mesh)
  pending, tokens_since, tic = [], 0, time.perf_counter()

  def done() -> bool:
    return (max_steps is not None and step >= max_steps) or windows.epoch_progress >= config.optim.epochs

  while not done():
    progress = windows.epoch_progress
    inputs, targets, length, _ = windows.next()
    lr = learning_rate(config, progress, length)
    inputs, targets = jax.device_put((inputs, targets), batch_sharding)
    state, metrics = trainer.train_step(state, inputs, targets, jnp.float32(lr))
    step += 1
    tokens_since += inputs.size
    pending.append(metrics)
    writer.advance()
    if step % config.train.log_every_steps == 0 or done():
      summary = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
      elapsed = time.perf_counter() - tic
      summary.update(ppl=math.exp(summary["nll"]), tokens_per_s=tokens_since / elapsed, lr=lr,
                     epoch=windows.epoch_progress)
      writer.write(step, summary, prefix="train/")
      writer.advance(0, {"ppl": summary["ppl"], "tok/s": summary["tokens_per_s"]})
      pending, tokens_since, tic = [], 0, time.perf_counter()
    epoch_ended = windows.offset >= windows.stream.shape[1] - 1
    if epoch_ended and (windows.epoch + 1) % config.train.eval_every_epochs == 0:
      valid = trainer.evaluate(state, corpus.valid, config.data.eval_batch_size)
      writer.write(step, valid, prefix="valid/")
      meta["history"].append({"step": step, "epoch": windows.epoch + 1, **valid})
    if step % config.train.checkpoint_every_steps == 0 or done():
      meta["windows"] = windows.position()
      checkpointer.save(step, state, meta)
      tic = time.perf_counter()

  checkpointer.wait()
  results: dict[str, Any] = {"step": step, "history": meta["history"]}
  results["valid"] = trainer.evaluate(state, corpus.valid, config.data.eval_batch_size, count_macs=True)
  results["weight_sparsity"] = pruning.sparsity_report(state["trainable"]["params"], config.pruning.prunable)
  writer.write(step, _scalars(results["valid"]), prefix="final_valid/")
  if config.train.test_at_end:
    results["test"] = trainer.evaluate(state, corpus.test, config.data.test_batch_size, count_macs=True)
    writer.write(step, _scalars(results["test"]), prefix="test/")
  (workdir_path / "results.json").write_text(json.dumps(results, indent=2))
  writer.close()
  checkpointer.close()
  return results
