"""End-to-end training of the jaxldm tasks on real Omniglot at toy scale: outputs, exact resume, 4 devices = 1
device, and the errors a user meets first."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jaxldm import train
from jaxldm.configs import autoencoder as ae_configs
from jaxldm.configs import latent_diffusion as ldm_configs
from jaxldm.configs import pixel_diffusion as pixel_configs
from jaxldm.train_autoencoder import load_autoencoder
from trainkit.data_root import MissingDataError

STEPS = 4


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Runs of one config recompile the same step; a persistent cache turns the repeats into lookups."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  saved = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def tiny(config, data_root, steps=STEPS):
  config.data.data_root = str(data_root)
  config.data.batch_size = 8
  config.data.train_categories = 12
  config.optim.max_steps = steps
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 2
  config.train.progress_bar = False
  return config


def ae_config(data_root, spec="none", steps=STEPS):
  config = tiny(ae_configs.get_config("cpu"), data_root, steps)
  config.latent_losses = spec
  config.model.latent_dim = 16
  config.grid_categories = 3
  config.eval_categories = 2
  return config


@pytest.fixture(scope="module")
def ae_run(data_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ae")
  return workdir, train.train_and_evaluate(ae_config(data_root), str(workdir))


def test_autoencoder_run_writes_results_grid_and_learns(ae_run):
  workdir, results = ae_run
  assert json.loads((workdir / "results.json").read_text())["step"] == STEPS
  losses = [h["reconstruction_loss"] for h in results["history"]]
  assert [h["step"] for h in results["history"]] == list(range(1, STEPS + 1))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert np.isfinite(results["test"]["reconstruction_loss"])
  grid = Image.open(workdir / "reconstructions.png")
  assert grid.width > 3 * 48 and grid.height > 8 * 48


def test_autoencoder_logs_each_latent_loss(data_root, tmp_path):
  results = train.train_and_evaluate(ae_config(data_root, "barlow:30,prototype:1", steps=1), str(tmp_path))
  first = results["history"][0]
  for name in ("barlow_loss", "prototype_loss", "reconstruction_loss"):
    assert np.isfinite(first[name]), name
  assert first["total_loss"] == pytest.approx(
      first["reconstruction_loss"] + 30 * first["barlow_loss"] + first["prototype_loss"], rel=1e-5)


def test_interrupted_run_resumes_to_identical_parameters(ae_run, data_root, tmp_path):
  reference_dir, reference = ae_run
  train.train_and_evaluate(ae_config(data_root, steps=STEPS // 2), str(tmp_path))
  resumed = train.train_and_evaluate(ae_config(data_root), str(tmp_path))
  assert [h["reconstruction_loss"] for h in resumed["history"]] == [
      h["reconstruction_loss"] for h in reference["history"]]
  expected = nnx.state(load_autoencoder(reference_dir)[0])
  actual = nnx.state(load_autoencoder(tmp_path)[0])
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_device_matches_four_devices(ae_run, data_root, tmp_path):
  assert jax.device_count() == 4
  config = ae_config(data_root, steps=2)
  config.train.num_devices = 1
  single = train.train_and_evaluate(config, str(tmp_path))
  four = ae_run[1]["history"][:2]
  for one, many in zip(single["history"], four, strict=True):
    assert one["reconstruction_loss"] == pytest.approx(many["reconstruction_loss"], rel=1e-4)


def test_latent_diffusion_samples_test_categories(ae_run, data_root, tmp_path):
  config = tiny(ldm_configs.get_config("cpu"), data_root)
  config.autoencoder_workdir = str(ae_run[0])
  config.model.update(dim=16, time_dim=16, groups=4, heads=1, head_dim=8)
  config.diffusion.num_timesteps = 20
  config.sample.update(sampler="ddim", ddim_steps=5, num_per_category=3, num_categories=4, grid_categories=4)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert len(results["history"]) == STEPS
  assert all(np.isfinite(h["diffusion_loss"]) for h in results["history"])
  samples = np.load(tmp_path / "samples.npz")
  assert samples["exemplars"].shape == (4, 48, 48)
  assert samples["samples"].shape == (4, 3, 48, 48)
  assert samples["samples"].min() >= 0.0 and samples["samples"].max() <= 1.0
  assert list(samples["category_names"]) == ["Alphabet_of_the_Magi/character01", "Alphabet_of_the_Magi/character02",
                                             "Alphabet_of_the_Magi/character03", "Angelic/character01"]
  assert Image.open(tmp_path / "samples.png").height > 4 * 48
  assert results["latent_stats"]["std"] > 0


def test_pixel_diffusion_runs_and_samples(data_root, tmp_path):
  config = tiny(pixel_configs.get_config("cpu"), data_root, steps=1)
  config.model.update(features=8, dim_mults=(1, 2), heads=1, head_dim=8)
  config.diffusion.num_timesteps = 4
  config.sample.update(sampler="ddpm", num_per_category=2, num_categories=2, batch_size=4)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert all(np.isfinite(h["diffusion_loss"]) for h in results["history"])
  assert np.load(tmp_path / "samples.npz")["samples"].shape == (2, 2, 48, 48)


@pytest.mark.parametrize("spec, message", [
    ("barlw:30", "unknown latent loss 'barlw'"),
    ("barlow:-1", "must be finite and >= 0"),
    ("barlow:x", "is not a number"),
])
def test_bad_latent_loss_specs_are_named(data_root, tmp_path, spec, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(ae_config(data_root, spec), str(tmp_path))


def test_missing_data_raises_missing_data_error(tmp_path):
  config = ae_config(tmp_path / "empty_root")
  config.data.tfds_dir = str(tmp_path / "tfds")
  with pytest.raises(MissingDataError, match="images_background.zip"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_latent_diffusion_needs_an_autoencoder_run(data_root, tmp_path):
  config = tiny(ldm_configs.get_config("cpu"), data_root)
  with pytest.raises(ValueError, match="autoencoder_workdir is empty"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config.autoencoder_workdir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="is not an autoencoder run"):
    train.train_and_evaluate(config, str(tmp_path / "b"))


def test_unknown_task_and_dataset_are_named(data_root, tmp_path):
  config = ae_config(data_root)
  config.data.dataset = "mnist"
  with pytest.raises(ValueError, match="'mnist'.*omniglot"):
    train.train_and_evaluate(config, str(tmp_path))
  config.task = "gan"
  with pytest.raises(ValueError, match="'gan'"):
    train.train_and_evaluate(config, str(tmp_path))
