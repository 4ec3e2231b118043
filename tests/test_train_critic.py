"""The critic trainer end to end on a tiny synthetic split: learning, exact resume, reloading, bad configs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from jaxldm import critics, train_critic
from jaxldm.configs import critic_protonet, critic_simclr
from jaxldm.datasets.episodes import FewShotSplit

CATEGORIES, DRAWINGS = 6, 4


def _split(seed: int) -> FewShotSplit:
  """Each category is a random blob pattern; its drawings flip a few pixels of it."""
  rng = np.random.default_rng(seed)
  prototypes = rng.random((CATEGORIES, 50, 50)) < 0.2
  flips = rng.random((CATEGORIES, DRAWINGS, 50, 50)) < 0.03
  images = np.logical_xor(prototypes[:, None], flips).reshape(-1, 50, 50).astype(np.uint8)
  return FewShotSplit(images=images, labels=np.repeat(np.arange(CATEGORIES), DRAWINGS),
                      category_names=tuple(map(str, range(CATEGORIES))),
                      exemplar_index=np.arange(CATEGORIES) * DRAWINGS, max_value=1)


@pytest.fixture(autouse=True)
def synthetic_omniglot(monkeypatch):
  monkeypatch.setattr(train_critic.loop, "load_split", lambda data, split: _split(0 if split == "train" else 1))


def _protonet_config(max_steps: int):
  c = critic_protonet.get_config("cpu")
  c.protonet.way, c.protonet.queries, c.protonet.episodes_per_epoch = 4, 2, 5
  c.optim.max_steps = max_steps
  c.train.log_every_steps, c.train.checkpoint_every_steps = 4, 4
  c.train.num_devices, c.train.progress_bar = 1, False
  c.eval.way, c.eval.episodes = 4, 10
  return c


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("protonet")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_critic.loop, "load_split", lambda data, split: _split(0 if split == "train" else 1))
    results = train_critic.train_and_evaluate(_protonet_config(16), str(workdir))
  return workdir, results


def test_protonet_learns_the_synthetic_categories(straight_run):
  _, results = straight_run
  losses = [entry["loss"] for entry in results["history"]]
  assert results["step"] == 16 and len(losses) == 4
  assert losses[-1] < 0.5 * losses[0]
  assert results["test"]["4way_1shot_accuracy"] > 0.9


def test_resume_reproduces_the_straight_run_and_reload(straight_run, tmp_path):
  """Drop the final checkpoint of the straight run, resume from step 12: the same critic at step 16."""
  workdir, _ = straight_run
  shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / "checkpoints" / "16")
  resumed = train_critic.train_and_evaluate(_protonet_config(16), str(tmp_path))
  assert resumed["step"] == 16 and [e["step"] for e in resumed["history"]] == [4, 8, 12, 16]
  straight_model = train_critic.load_trained_critic(workdir)
  resumed_model = train_critic.load_trained_critic(tmp_path)
  images = _split(1).as_float(_split(1).images[:8])
  np.testing.assert_allclose(resumed_model(images)[1], straight_model(images)[1], rtol=1e-5, atol=1e-5)
  assert json.loads((tmp_path / train_critic.MODEL_FILE).read_text())["kind"] == "protonet"
  assert isinstance(resumed_model, critics.ProtoNetCritic)


def test_simclr_trains_and_checkpoints(tmp_path):
  c = critic_simclr.get_config("cpu")
  c.data.batch_size, c.optim.max_steps = 8, 2
  c.train.log_every_steps, c.train.checkpoint_every_steps = 1, 2
  c.train.num_devices, c.train.progress_bar = 1, False
  c.eval.way, c.eval.episodes = 4, 5
  results = train_critic.train_and_evaluate(c, str(tmp_path))
  assert results["step"] == 2 and all(np.isfinite(e["loss"]) for e in results["history"])
  model = train_critic.load_trained_critic(tmp_path)
  assert isinstance(model, critics.SimCLRCritic)
  before = critics.SimCLRCritic(rngs=nnx.Rngs(c.seed))
  assert not np.allclose(model.projection.kernel[...], before.projection.kernel[...])


def test_bad_configs_raise_clear_errors(tmp_path):
  c = critic_simclr.get_config("cpu")
  c.kind = "vae"
  with pytest.raises(ValueError, match="config.kind='vae'"):
    train_critic.train_and_evaluate(c, str(tmp_path))
  c = critic_protonet.get_config("cpu")
  c.data.image_size = 48
  with pytest.raises(ValueError, match="50x50"):
    train_critic.train_and_evaluate(c, str(tmp_path))
  with pytest.raises(ValueError, match="way=9"):
    train_critic.episode_indices(_split(0), np.random.default_rng(0), 9, 2)
  with pytest.raises(FileNotFoundError, match="not a critic workdir"):
    train_critic.load_trained_critic(tmp_path / "nothing")
