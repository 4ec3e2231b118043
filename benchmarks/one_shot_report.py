"""One-shot drawing report: every given model and the humans, judged by the published Omniglot critics.

  python benchmarks/one_shot_report.py --out=runs/one_shot_report \
      --models=runs/ldm_none,runs/ldm_kl,runs/ldm_barlow,runs/ldm_prototype,runs/pixel@0.5,runs/pixel@1,runs/pixel@2
  python benchmarks/one_shot_report.py --out=runs/one_shot_report_quick --models=runs/ldm_none --quick

`--models` lists workdirs of finished `latent_diffusion` or `pixel_diffusion` runs; `WORKDIR@W` asks for
guidance scale W. A model's `samples.npz` (written at the end of training) is used when it matches the
request; otherwise samples are drawn from the newest checkpoint with DDIM (`--ddim_steps`). Humans are the
real held-out drawings: each test category's exemplar and its other drawings.

Writes into `--out`: `report.md` (table: diversity, recognizability, mean originality, distance to humans,
area between generalization curves; and the Spearman correlation of the importance maps between models),
`diversity_recognizability.png`, `generalization_curves.png`, `importance_maps.png`, `metrics.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from jaxldm import diffusion, evaluation, importance, sampling, train_autoencoder, train_diffusion  # noqa: E402
from jaxldm.datasets.omniglot import load_omniglot  # noqa: E402
from jaxldm.denoisers import LatentUNet, PixelUNet  # noqa: E402
from trainkit.checkpoint import Checkpointer  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_MODELS = flags.DEFINE_list("models", [], "Diffusion workdirs, each optionally WORKDIR@GUIDANCE.")
_QUICK = flags.DEFINE_bool("quick", False, "Few categories, samples, rounds and importance maps (minutes).")
_CATEGORIES = flags.DEFINE_integer("categories", 150, "Test categories to evaluate (--quick: 20).")
_SAMPLES = flags.DEFINE_integer("samples", 10, "Drawings per category for every model and the humans.")
_NUM_BINS = flags.DEFINE_integer("num_bins", 10, "Originality bins of the generalization curves (--quick: 5).")
_ROUNDS = flags.DEFINE_integer("rounds", 100, "Times each category is a query class (--quick: 20).")
_DDIM_STEPS = flags.DEFINE_integer("ddim_steps", 50, "DDIM steps when samples are drawn here.")
_MAP_CATEGORIES = flags.DEFINE_integer("map_categories", 8, "Categories in the importance-map panel (--quick: 4).")
_MAP_SAMPLES = flags.DEFINE_integer("map_samples", 4, "Guided DDPM runs averaged per importance map (--quick: 2).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the samples and importance maps drawn here.")
_DATA_ROOT = flags.DEFINE_string("data_root", "", "Data root (default $JAXDATA_ROOT).")


class Model:
  """A trained diffusion model of a workdir: its denoiser, schedule and (latent models) autoencoder."""

  def __init__(self, workdir: Path):
    config_path = workdir / "config.json"
    if not config_path.is_file():
      raise FileNotFoundError(f"{workdir} holds no trained model: {config_path} is missing (train one with "
                              "train.py --config=jaxldm/configs/latent_diffusion.py or pixel_diffusion.py).")
    self.config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    self.task = self.config.task
    if self.task not in ("latent_diffusion", "pixel_diffusion"):
      raise ValueError(f"{workdir} is a {self.task!r} run; the report takes latent_diffusion or pixel_diffusion runs.")
    self.workdir = workdir
    c = self.config
    self.schedule = diffusion.make_schedule(c.diffusion.schedule, c.diffusion.num_timesteps)
    rngs = nnx.Rngs(jax.random.key(c.seed, impl="rbg"))
    if self.task == "latent_diffusion":
      results_path = workdir / "results.json"
      if not results_path.is_file():
        raise FileNotFoundError(f"{workdir} has not finished training: {results_path} (latent statistics) is missing.")
      results = json.loads(results_path.read_text())
      self.stats = diffusion.LatentStats(jnp.asarray(results["latent_stats"]["mean"]),
                                         jnp.asarray(results["latent_stats"]["std"]))
      self.autoencoder, info = train_autoencoder.load_autoencoder(results["autoencoder_workdir"])
      self.latent_losses = info["latent_losses"]
      m = c.model
      denoiser = LatentUNet(info["latent_dim"], dim=m.dim, dim_mults=tuple(m.dim_mults), time_dim=m.time_dim,
                            groups=m.groups, heads=m.heads, head_dim=m.head_dim, rngs=rngs)
    else:
      m = c.model
      denoiser = PixelUNet(channels=1, features=m.features, dim_mults=tuple(m.dim_mults),
                           convnext_mult=m.convnext_mult, heads=m.heads, head_dim=m.head_dim, rngs=rngs)
    template, _ = train_diffusion.make_train_step(denoiser, train_diffusion.make_optimizer(c.optim, 1, 1),
                                                  self.schedule, c.diffusion.cond_drop_prob)
    checkpointer = Checkpointer(workdir / "checkpoints")
    restored = checkpointer.restore_latest(template)
    checkpointer.close()
    if restored is None:
      raise FileNotFoundError(f"{workdir} holds no trained model: no checkpoint in {workdir / 'checkpoints'}.")
    self.graphdef = nnx.graphdef(denoiser)
    self.params = restored[0]["params"]

  @property
  def default_guidance(self) -> float:
    return float(self.config.sample.guidance)

  def conditions(self, exemplars: np.ndarray) -> np.ndarray:
    """Exemplars float [C, 48, 48] -> the conditions the denoiser takes."""
    if self.task == "pixel_diffusion":
      return exemplars[..., None] * 2.0 - 1.0
    codes = train_autoencoder.encode_images(self.autoencoder, exemplars[..., None])
    return np.asarray(diffusion.standardize(codes, self.stats))

  def decode(self):
    """Diffusion space -> images in [0, 1], differentiable (None: pixels, mapped from [-1, 1] afterwards)."""
    if self.task == "pixel_diffusion":
      return None
    graphdef, state = nnx.split(self.autoencoder)
    return lambda z: nnx.merge(graphdef, state).decode(diffusion.unstandardize(z, self.stats))

  def to_images(self, x: jax.Array) -> jax.Array:
    if self.task == "pixel_diffusion":
      return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
    return self.decode()(x)

  def draw(self, exemplars: np.ndarray, per_category: int, guidance: float, seed: int) -> np.ndarray:
    """DDIM samples float [C, per_category, 48, 48] for exemplars [C, 48, 48]."""
    graphdef, schedule, steps = self.graphdef, self.schedule, _DDIM_STEPS.value
    w = float(guidance) or None

    @jax.jit
    def run(params, conds, key):
      x = diffusion.ddim_sample(nnx.merge(graphdef, params), schedule, conds, key, conds.shape, steps, guidance=w)
      return self.to_images(x)

    conds = np.repeat(self.conditions(exemplars), per_category, axis=0)
    images = sampling.in_chunks(lambda chunk, key: run(self.params, chunk, key), conds, min(len(conds), 200),
                                jax.random.key(seed))
    return images[..., 0].reshape(len(exemplars), per_category, *images.shape[1:3])

  def importance(self, exemplars: np.ndarray, per_category: int, guidance: float, seed: int) -> np.ndarray:
    """Importance maps [C, 48, 48], averaged over `per_category` guided DDPM runs per exemplar."""
    graphdef, schedule, decode = self.graphdef, self.schedule, self.decode()
    variance = self.config.sample.variance
    conds = np.repeat(self.conditions(exemplars), per_category, axis=0)

    @jax.jit
    def run(params, cond, key):
      maps, _ = importance.importance_maps(nnx.merge(graphdef, params), schedule, cond, key, cond.shape, decode,
                                           guidance=guidance, variance=variance)
      return maps if decode is not None else maps / 2.0  # pixel scores are in [-1, 1] units

    maps = np.asarray(run(self.params, jnp.asarray(conds), jax.random.key(seed)))
    return maps[..., 0].reshape(len(exemplars), per_category, *maps.shape[1:3]).mean(axis=1)


def parse_model(entry: str) -> tuple[Path, float | None]:
  path, _, guidance = entry.partition("@")
  try:
    return Path(path), float(guidance) if guidance else None
  except ValueError:
    raise app.UsageError(f"--models entry {entry!r}: the guidance after '@' must be a number") from None


def model_samples(model: Model, guidance: float | None, exemplars: np.ndarray, names: tuple[str, ...],
                  per_category: int) -> np.ndarray:
  """The run's samples.npz when it covers the request, else drawn here."""
  npz_path = model.workdir / "samples.npz"
  if (guidance is None or guidance == model.default_guidance) and npz_path.is_file():
    saved = np.load(npz_path)
    saved_names = tuple(str(n) for n in saved["category_names"])
    if saved_names[:len(names)] == names and saved["samples"].shape[1] >= per_category:
      return saved["samples"][:, :per_category]
  w = model.default_guidance if guidance is None else guidance
  print(f"drawing {per_category} samples x {len(names)} categories from {model.workdir} (w={w}, DDIM "
        f"{_DDIM_STEPS.value} steps)")
  return model.draw(exemplars, per_category, w, _SEED.value)


def model_name(model: Model, guidance: float | None) -> str:
  w = model.default_guidance if guidance is None else guidance
  if model.task == "latent_diffusion":
    return f"LDM {model.latent_losses} ({model.workdir.name}, w={w:g})"
  return f"pixel DDPM ({model.workdir.name}, w={w:g})"


def scatter_plot(path: Path, evaluations: list[evaluation.Evaluation]) -> None:
  fig, ax = plt.subplots(figsize=(6, 5))
  for e in evaluations:
    marker = "*" if e.name == evaluation.HUMANS else "o"
    ax.scatter(*e.point, s=160 if marker == "*" else 60, marker=marker, label=e.name)
  ax.set_xlabel("diversity (SimCLR feature std)")
  ax.set_ylabel("recognizability (20-way 1-shot accuracy)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def curves_plot(path: Path, evaluations: list[evaluation.Evaluation]) -> None:
  fig, ax = plt.subplots(figsize=(6, 5))
  for e in evaluations:
    style = dict(color="black", linewidth=2.5) if e.name == evaluation.HUMANS else {}
    ax.plot(*e.curve, marker="o", label=e.name, **style)
  ax.set_xlabel("originality (distance to the exemplar, SimCLR features)")
  ax.set_ylabel("recognizability per originality bin")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def importance_panel(path: Path, exemplars: np.ndarray, maps: dict[str, np.ndarray]) -> None:
  """Top row: exemplars; one row per model: its importance maps over the faint exemplar."""
  columns = len(exemplars)
  fig, axes = plt.subplots(len(maps) + 1, columns, figsize=(1.6 * columns, 1.7 * (len(maps) + 1)), squeeze=False)
  for j in range(columns):
    axes[0, j].imshow(1.0 - exemplars[j], cmap="gray", vmin=0, vmax=1)
    for i, (name, model_maps) in enumerate(maps.items(), start=1):
      axes[i, j].imshow(1.0 - exemplars[j], cmap="gray", vmin=0, vmax=1, alpha=0.35)
      axes[i, j].imshow(model_maps[j], cmap="inferno", alpha=0.75)
      if j == 0:
        axes[i, j].set_ylabel(name, fontsize=6)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, 0].set_ylabel("exemplar", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  categories = 20 if quick and _CATEGORIES.value == 150 else _CATEGORIES.value
  num_bins = 5 if quick and _NUM_BINS.value == 10 else _NUM_BINS.value
  rounds = 20 if quick and _ROUNDS.value == 100 else _ROUNDS.value
  map_categories = 4 if quick and _MAP_CATEGORIES.value == 8 else _MAP_CATEGORIES.value
  map_samples = 2 if quick and _MAP_SAMPLES.value == 4 else _MAP_SAMPLES.value
  out = Path(_OUT.value)
  requests = [parse_model(entry) for entry in _MODELS.value]
  models: dict[Path, Model] = {}
  for workdir, _ in requests:  # load all first: a missing model fails before any long evaluation
    if workdir not in models:
      models[workdir] = Model(workdir)
  out.mkdir(parents=True, exist_ok=True)

  data_root = _DATA_ROOT.value or None
  split = load_omniglot(data_root, "test", 48)
  exemplars, human = evaluation.human_drawings(split, categories)
  names = split.category_names[:categories]
  judges = evaluation.published_critics(data_root)
  kwargs = dict(num_bins=num_bins, rounds=rounds, seed=44)
  humans = evaluation.evaluate_drawings(judges, evaluation.HUMANS, exemplars, human[:, :_SAMPLES.value], **kwargs)
  evaluations = [humans]
  maps: dict[str, np.ndarray] = {}
  for workdir, guidance in requests:
    model = models[workdir]
    name = model_name(model, guidance)
    samples = model_samples(model, guidance, exemplars, names, _SAMPLES.value)
    evaluations.append(evaluation.evaluate_drawings(judges, name, exemplars, samples, **kwargs))
    w = model.default_guidance if guidance is None else guidance
    print(f"importance maps of {name}")
    maps[name] = model.importance(exemplars[:map_categories], map_samples, w, _SEED.value)

  rows = [evaluation.summary_row(e, humans) for e in evaluations]
  table = evaluation.markdown_table(rows)
  scatter_plot(out / "diversity_recognizability.png", evaluations)
  curves_plot(out / "generalization_curves.png", evaluations)
  lines = [f"# One-shot drawing report ({categories} Omniglot test categories, {humans.num_drawings} drawings "
           f"each, {num_bins} originality bins, {rounds} rounds of 20-way 1-shot episodes, published critics)",
           "", table, ""]
  if maps:
    importance_panel(out / "importance_maps.png", exemplars[:map_categories], maps)
    lines += [f"Importance maps: {map_categories} categories x {map_samples} guided DDPM runs; mean Spearman "
              "rank correlation over categories between models:", "",
              "| | " + " | ".join(maps) + " |", "|---" * (len(maps) + 1) + "|"]
    for a, maps_a in maps.items():
      cells = [f"{np.nanmean(importance.rank_correlation(maps_a, maps_b)):.3f}" for maps_b in maps.values()]
      lines.append(f"| {a} | " + " | ".join(cells) + " |")
  (out / "report.md").write_text("\n".join(lines) + "\n")
  serialisable: dict[str, Any] = {e.name: {k: np.asarray(v).tolist() for k, v in e.metrics.items()}
                                  for e in evaluations}
  (out / "metrics.json").write_text(json.dumps({"rows": rows, "metrics": serialisable}))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
