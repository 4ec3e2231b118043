"""The language-model trainer end to end on real PTB: learning, data parallelism, exact resume, config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse import corpora
from jaxsparse import train as lm_train
from jaxsparse.configs import egru_ptb, lstm_wt2
from trainkit import mesh as mesh_lib


def tiny_config(data_root, cell="egru", max_steps=6):
  config = egru_ptb.get_config("cpu")
  config.model.cell = cell
  config.model.embedding_size = 16
  config.model.hidden_sizes = (24, 24, 16)
  config.data.data_root = str(data_root)
  config.data.batch_size = 8
  config.data.eval_batch_size = 64
  config.data.bptt = 12
  config.data.length_quantum = 4
  config.optim.max_steps = max_steps
  config.train.log_every_steps = 3
  config.train.checkpoint_every_steps = 4
  config.train.test_at_end = False
  config.train.progress_bar = False
  config.train.num_devices = 1
  return config


@pytest.fixture(scope="module")
def ptb(data_root):
  return corpora.load_corpus("ptb", data_root)


def test_configs_select_the_reference_recipes():
  ptb_config, wt2_config = egru_ptb.get_config(), lstm_wt2.get_config()
  assert ptb_config.model.hidden_sizes == (1350, 1350, 750) and ptb_config.data.batch_size == 64
  assert (wt2_config.model.cell, wt2_config.data.corpus, wt2_config.optim.learning_rate) == ("lstm", "wikitext-2", 1e-3)
  assert wt2_config.model.embedding_dropout == 0.7 and wt2_config.optim.cosine_start_epoch == 400
  cpu = egru_ptb.get_config("cpu")
  assert (cpu.model.embedding_size, cpu.model.hidden_sizes) == (256, (512, 512, 256))
  with pytest.raises(ValueError, match="Unknown config variant 'gpu'"):
    egru_ptb.get_config("gpu")


def test_learning_rate_schedule():
  config = egru_ptb.get_config()
  base = config.optim.learning_rate
  assert lm_train.learning_rate(config, 10.0, 70) == pytest.approx(base)
  assert lm_train.learning_rate(config, 10.0, 35) == pytest.approx(base / 2)
  assert lm_train.learning_rate(config, 850.0, 70) == pytest.approx(base / 2)
  assert lm_train.learning_rate(config, 1000.0, 70) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_skips_thresholds(data_root, ptb):
  config = tiny_config(data_root)
  config.model.trainable_thresholds = True
  config.optim.weight_decay = 0.5
  trainer = lm_train.Trainer(config, ptb.vocab_size, mesh_lib.make_data_mesh(1))
  state = trainer.init_state()
  zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
  updates, _ = trainer.tx.update(zeros, state["opt_state"], state["trainable"])
  for p, u in zip(jax.tree.leaves(state["trainable"]["params"]), jax.tree.leaves(updates["params"])):
    np.testing.assert_allclose(u, 0.5 * p, rtol=1e-6)
  assert all(not np.any(u) for u in jax.tree.leaves(updates["thresholds"]))


@pytest.mark.parametrize("cell", ["egru", "lstm"])
def test_four_devices_give_the_same_loss_as_one(data_root, ptb, cell):
  assert len(jax.devices()) >= 4, "conftest sets 4 simulated CPU devices"
  config = tiny_config(data_root, cell)
  stream = corpora.batchify(ptb.train, config.data.batch_size)
  inputs, targets = stream[:, :12], stream[:, 1:13]
  results = []
  for devices in (1, 4):
    mesh = mesh_lib.make_data_mesh(devices)
    trainer = lm_train.Trainer(config, ptb.vocab_size, mesh)
    state = trainer.init_state()
    losses = []
    for _ in range(2):
      batch = mesh_lib.put_batch((inputs, targets), mesh)
      state, metrics = trainer.train_step(state, *batch, jnp.float32(1e-3))
      losses.append(float(metrics["nll"]))
    assert len(state["carry"][0][0].sharding.device_set) == devices
    results.append(losses)
  np.testing.assert_allclose(results[0], results[1], rtol=2e-5)


def _final_params(workdir, config, vocab_size):
  trainer = lm_train.Trainer(config, vocab_size, mesh_lib.make_data_mesh(1))
  from trainkit.checkpoint import Checkpointer
  state, meta = Checkpointer(workdir / "checkpoints").restore_latest(trainer.init_state())
  return state, meta


def test_training_learns_and_an_interrupted_run_resumes_exactly(data_root, ptb, tmp_path, monkeypatch):
  config = tiny_config(data_root, max_steps=10)
  config.optim.learning_rate = 0.03
  results = lm_train.train_and_evaluate(config, str(tmp_path / "straight"))
  assert results["step"] == 10
  assert results["valid"]["ppl"] < 0.5 * ptb.vocab_size, "10 steps must beat a uniform guess clearly"
  assert 0.0 < results["valid"]["activity/mean"] < 1.0
  macs = results["valid"]["macs"]
  assert macs["macs_per_token"]["exact"] < macs["macs_per_token"]["dense"]
  assert json.loads((tmp_path / "straight" / "results.json").read_text())["step"] == 10

  calls = {"n": 0}
  real_step = lm_train.Trainer.__init__

  def crashing_init(self, *args, **kwargs):
    real_step(self, *args, **kwargs)
    step = self.train_step

    def train_step(*a, **k):
      calls["n"] += 1
      if calls["n"] == 7:
        raise KeyboardInterrupt("killed")
      return step(*a, **k)
    self.train_step = train_step

  monkeypatch.setattr(lm_train.Trainer, "__init__", crashing_init)
  with pytest.raises(KeyboardInterrupt):
    lm_train.train_and_evaluate(config, str(tmp_path / "resumed"))
  monkeypatch.undo()
  resumed = lm_train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["step"] == 10
  straight_state, straight_meta = _final_params(tmp_path / "straight", config, ptb.vocab_size)
  resumed_state, resumed_meta = _final_params(tmp_path / "resumed", config, ptb.vocab_size)
  for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(resumed_state)):
    np.testing.assert_array_equal(a, b)
  assert straight_meta["windows"] == resumed_meta["windows"]
  assert resumed["valid"]["nll"] == results["valid"]["nll"]


def test_fine_tuning_a_checkpoint_with_pruning_keeps_the_target_sparsity(data_root, ptb, tmp_path):
  dense_config = tiny_config(data_root, max_steps=4)
  lm_train.train_and_evaluate(dense_config, str(tmp_path / "dense"))
  config = tiny_config(data_root, max_steps=5)
  config.train.init_from = str(tmp_path / "dense")
  config.pruning.method = "gradual"
  config.pruning.target_sparsity = 0.8
  config.pruning.end_step = 2
  config.pruning.frequency = 1
  results = lm_train.train_and_evaluate(config, str(tmp_path / "pruned"))
  assert results["step"] == 5
  for name, sparsity in results["weight_sparsity"]["per_matrix"].items():
    assert sparsity == pytest.approx(0.8, abs=0.01), name
  macs = results["valid"]["macs"]
  assert macs["weight_sparsity"]["layer1/R"] == pytest.approx(0.8, abs=0.01)
  assert macs["macs_per_token"]["exact"] < 0.5 * macs["macs_per_token"]["dense"]

  state, _ = _final_params(tmp_path / "pruned", config, ptb.vocab_size)
  dense_state, _ = _final_params(tmp_path / "dense", dense_config, ptb.vocab_size)
  layer = state["trainable"]["params"]["rnn"]["layers"][0]
  dense_layer = dense_state["trainable"]["params"]["rnn"]["layers"][0]
  kept = np.asarray(layer["W"]) != 0
  assert abs(kept.mean() - 0.2) < 0.01
  # Magnitude pruning keeps the large weights of the dense starting point.
  assert np.abs(np.asarray(dense_layer["W"]))[kept].mean() > np.abs(np.asarray(dense_layer["W"]))[~kept].mean()


def test_init_from_without_checkpoint_is_a_clear_error(data_root, tmp_path):
  config = tiny_config(data_root)
  config.train.init_from = str(tmp_path / "nothing")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    lm_train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_gru_checkpoint_starts_an_egru_with_its_own_thresholds(data_root, ptb, tmp_path):
  gru_config = tiny_config(data_root, cell="gru", max_steps=4)
  lm_train.train_and_evaluate(gru_config, str(tmp_path / "gru"))
  gru_state, _ = _final_params(tmp_path / "gru", gru_config, ptb.vocab_size)

  config = tiny_config(data_root, cell="egru")
  trainer = lm_train.Trainer(config, ptb.vocab_size, mesh_lib.make_data_mesh(1))
  fresh = trainer.init_state()
  started = trainer.start_from(fresh, tmp_path / "gru")
  for a, b in zip(jax.tree.leaves(started["trainable"]["params"]), jax.tree.leaves(gru_state["trainable"]["params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(started["frozen"]), jax.tree.leaves(fresh["frozen"])):
    np.testing.assert_array_equal(a, b)
  assert int(started["step"]) == 0

  lstm_config = tiny_config(data_root, cell="lstm", max_steps=1)
  lm_train.train_and_evaluate(lstm_config, str(tmp_path / "lstm"))
  with pytest.raises(ValueError, match="a gru can start an egru"):
    trainer.start_from(fresh, tmp_path / "lstm")
