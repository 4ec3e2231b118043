"""One entry point for every model of the repository: the config's `task` picks the trainer.

  python train.py --config=jaxsparse/configs/egru_ptb.py:cpu --workdir=runs/egru_ptb_cpu
  python train.py --config=jaxldm/configs/autoencoder.py:cpu --config.latent_losses='barlow:30' --workdir=runs/ae

Any config field is a flag (`--config.model.hidden_sizes='(512,512,256)'`); `--data_root` (or $JAXDATA_ROOT)
points at the data sets. A run resumes from the newest checkpoint in its workdir.
"""

from __future__ import annotations

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from trainkit import data_root as data_root_lib
from trainkit import mesh as mesh_lib

# task name -> module with `train_and_evaluate(config, workdir)`.
TASKS = {
    "lm": "jaxsparse.train",
    "autoencoder": "jaxldm.train",
    "latent_diffusion": "jaxldm.train",
    "pixel_diffusion": "jaxldm.train",
    "critic": "jaxldm.train_critic",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
_DATA_ROOT = flags.DEFINE_string("data_root", None, f"Data root (default ${data_root_lib.ENV_VAR}, "
                                 f"else {data_root_lib.DEFAULT_ROOT}).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  mesh_lib.maybe_initialize_distributed()
  config = _CONFIG.value
  task = config.get("task")
  if task not in TASKS:
    raise app.UsageError(f"Config has task={task!r}; valid tasks: {sorted(TASKS)}.")
  if _DATA_ROOT.value:
    with config.unlocked():
      config.data.data_root = _DATA_ROOT.value
  logging.info("Config:\n%s", config)
  importlib.import_module(TASKS[task]).train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
