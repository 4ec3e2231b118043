"""Activity x weight sparsity trade-off on PTB: validation perplexity against effective MACs per token.

  python benchmarks/sparsity_tradeoff.py --workdir=runs/sparsity            # CPU scale (about an hour here)
  python benchmarks/sparsity_tradeoff.py --workdir=runs/sparsity_quick --quick   # minutes
  python benchmarks/sparsity_tradeoff.py --workdir=runs/sparsity_ref --variant=reference \
      --dense_epochs=1000 --finetune_epochs=100                                 # reference scale (GPU)

For each cell (LSTM, GRU, EGRU) it trains a dense model (or reuses the one in its workdir), then fine-tunes a
copy at each weight sparsity with gradual magnitude pruning (Zhu & Gupta schedule over the first half of the
fine-tuning, layer-wise ranking of the W and R matrices). Every run is an ordinary `train.py` run, so each
one resumes if interrupted. Writes `tradeoff.md` (table) and `tradeoff.png` (plot) into the workdir.

With `--egru_from_gru` (default) the dense EGRU starts from the dense GRU's checkpoint (same W, R and biases;
`--config.train.init_from`), as a deep EGRU trained from scratch stays on the unigram plateau for many epochs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import ml_collections
from absl import app, flags

from jaxsparse import corpora
from jaxsparse import train as lm_train
from jaxsparse.configs.common import get_lm_config

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for all runs and the outputs.", required=True)
_CELLS = flags.DEFINE_list("cells", ["egru", "gru", "lstm"], "Models to compare.")
_SPARSITIES = flags.DEFINE_list("sparsities", ["0", "50", "80", "90", "95"], "Weight sparsities in percent.")
_VARIANT = flags.DEFINE_enum("variant", "cpu", ["cpu", "reference"], "Config variant of every model.")
_DENSE_EPOCHS = flags.DEFINE_float("dense_epochs", 1.0, "Epochs of dense training.")
_FINETUNE_EPOCHS = flags.DEFINE_float("finetune_epochs", 0.1, "Epochs of fine-tuning at each sparsity.")
_QUICK = flags.DEFINE_bool("quick", False, "A tiny model and a few steps per run: checks the pipeline in minutes.")
_DATA_ROOT = flags.DEFINE_string("data_root", "", "Data root (default $JAXDATA_ROOT).")
_EGRU_FROM_GRU = flags.DEFINE_bool("egru_from_gru", True, "Start the dense EGRU from the dense GRU's checkpoint.")
_FROM_GRU_LEARNING_RATE = flags.DEFINE_float("from_gru_learning_rate", 1e-3,
                                              "Learning rate of the EGRU started from the GRU.")


def base_config(cell: str) -> ml_collections.ConfigDict:
  config = get_lm_config(cell, "ptb", _VARIANT.value)
  config.data.data_root = _DATA_ROOT.value
  config.train.progress_bar = False
  config.train.test_at_end = False
  if _QUICK.value:
    config.model.embedding_size = 32
    config.model.hidden_sizes = (64, 64, 32)
    config.data.bptt = 20
    config.optim.learning_rate = 1e-2
    config.train.log_every_steps = 20
  return config


def dense_config(cell: str, workdir: Path) -> ml_collections.ConfigDict:
  config = base_config(cell)
  config.optim.epochs = _DENSE_EPOCHS.value
  config.optim.cosine_start_epoch = _DENSE_EPOCHS.value / 2
  if cell == "egru" and _EGRU_FROM_GRU.value:
    config.train.init_from = str(workdir / "gru" / "dense")
    config.optim.learning_rate = _FROM_GRU_LEARNING_RATE.value
  if _QUICK.value:
    config.optim.max_steps = 60
  return config


@functools.cache
def windows_per_epoch(batch_size: int, bptt: int) -> int:
  """BPTT windows in one epoch of PTB's training split (read once for all fine-tuning runs)."""
  corpus = corpora.load_corpus("ptb", _DATA_ROOT.value or None)
  return len(corpus.train) // batch_size // bptt


def finetune_config(cell: str, sparsity: float, dense_workdir: Path) -> ml_collections.ConfigDict:
  config = base_config(cell)
  config.train.init_from = str(dense_workdir)
  config.optim.epochs = _FINETUNE_EPOCHS.value
  config.optim.cosine_start_epoch = 0.0
  if _QUICK.value:
    config.optim.max_steps = 30
    steps = 30
  else:
    steps = int(_FINETUNE_EPOCHS.value * windows_per_epoch(config.data.batch_size, config.data.bptt))
  frequency = max(1, steps // 20)
  config.pruning.method = "gradual"
  config.pruning.target_sparsity = sparsity
  config.pruning.start_step = 0
  config.pruning.end_step = frequency * max(1, (steps // 2) // frequency)
  config.pruning.frequency = frequency
  return config


def run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """Trains (or resumes, or reuses a finished run) and returns its results.json."""
  results_path = workdir / "results.json"
  if results_path.exists():
    return json.loads(results_path.read_text())
  return lm_train.train_and_evaluate(config, str(workdir))


def summarise(cell: str, sparsity: float, results: dict) -> dict:
  """One table row. MACs are split into the recurrent layers (W and R, where both sparsities act) and the
  tied decoder (dense weights, reading the last layer's events)."""
  valid = results["valid"]
  macs = valid["macs"]
  recurrent = {kind: sum(m[kind] for name, m in macs["matrices"].items() if name != "decoder")
               for kind in ("dense", "exact", "approx")}
  return {
      "model": cell.upper(), "target_sparsity": sparsity, "weight_sparsity": results["weight_sparsity"]["overall"],
      "ppl": valid["ppl"], "activity": macs["activity"]["pooled"],
      "dense_macs": recurrent["dense"], "effective_macs": recurrent["exact"], "approx_macs": recurrent["approx"],
      "reduction": recurrent["dense"] / recurrent["exact"],
      "total_dense_macs": macs["macs_per_token"]["dense"], "total_effective_macs": macs["macs_per_token"]["exact"],
  }


def write_table(rows: list[dict], path: Path) -> str:
  lines = ["| model | weight sparsity | valid ppl | activity | recurrent MACs/token: dense | effective (exact) | "
           "product approx. | reduction (activity x weight) | with decoder: dense | effective |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['weight_sparsity']:.0%} | {r['ppl']:.1f} | {r['activity']:.3f} | "
                 f"{r['dense_macs'] / 1e6:.2f} M | {r['effective_macs'] / 1e6:.3f} M | "
                 f"{r['approx_macs'] / 1e6:.3f} M | {r['reduction']:.1f}x | {r['total_dense_macs'] / 1e6:.2f} M | "
                 f"{r['total_effective_macs'] / 1e6:.3f} M |")
  table = "\n".join(lines) + "\n"
  path.write_text(table)
  return table


def write_plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for model in dict.fromkeys(r["model"] for r in rows):
    points = sorted((r["effective_macs"], r["ppl"], r["weight_sparsity"]) for r in rows if r["model"] == model)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    for macs, ppl, sparsity in points:
      ax.annotate(f"{sparsity:.0%}", (macs, ppl), textcoords="offset points", xytext=(3, 3), fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("recurrent-layer MACs per token (event-driven, exact)")
  ax.set_ylabel("PTB validation perplexity")
  ax.set_title("Weight sparsity x activity sparsity")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  workdir = Path(_WORKDIR.value)
  rows = []
  cells = list(_CELLS.value)
  if _EGRU_FROM_GRU.value and "egru" in cells:
    if "gru" not in cells:
      raise app.UsageError("--egru_from_gru needs the gru in --cells (or pass --noegru_from_gru).")
    cells.remove("egru")
    cells.insert(cells.index("gru") + 1, "egru")  # the EGRU starts from the GRU's dense run
  for cell in cells:
    dense_dir = workdir / cell / "dense"
    dense = run(dense_config(cell, workdir), dense_dir)
    for percent in _SPARSITIES.value:
      sparsity = float(percent) / 100
      if sparsity == 0:
        results = dense
      else:
        results = run(finetune_config(cell, sparsity, dense_dir), workdir / cell / f"sparsity{percent}")
      rows.append(summarise(cell, sparsity, results))
      print(json.dumps(rows[-1]), flush=True)
      write_table(rows, workdir / "tradeoff.md")
      write_plot(rows, workdir / "tradeoff.png")
  print(write_table(rows, workdir / "tradeoff.md"))
  print(f"wrote {workdir / 'tradeoff.md'} and {workdir / 'tradeoff.png'}")


if __name__ == "__main__":
  app.run(main)
