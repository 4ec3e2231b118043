"""Evaluating sets of one-shot drawings (a model's samples or the human drawings) with the critics.

`evaluate_drawings` turns exemplars [C, S, S] and drawings [C, N, S, S] into an `Evaluation` (the metrics
of `jaxldm.metrics.evaluate`); `summary_row` reduces one to the report's numbers, measured against the
human evaluation: mean diversity, mean recognizability, mean originality, the Euclidean distance to the
human point in the (diversity, recognizability) plane, and the area between the generalization curves.

Humans are the real held-out drawings: for each test category its exemplar and the other drawings of the
category (19 on Omniglot), in drawer order. Every set is cut to the largest multiple of the number of
originality bins (so humans and models are measured on the same number of drawings when that is chosen).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from flax import nnx

from jaxldm import critics, metrics
from jaxldm.datasets.episodes import FewShotSplit

HUMANS = "humans"
SUMMARY_COLUMNS = ("model", "diversity", "recognizability", "originality", "human_distance", "curve_gap")
_HEADERS = {"model": "model", "diversity": "diversity", "recognizability": "recognizability",
            "originality": "mean originality", "human_distance": "distance to humans",
            "curve_gap": "area between curves"}


@dataclasses.dataclass(frozen=True)
class Critics:
  """The SimCLR (diversity, originality) and prototypical (recognizability) critics."""
  simclr: nnx.Module
  protonet: nnx.Module


def published_critics(data_root: str | os.PathLike | None = None) -> Critics:
  """The published Omniglot critics of Boutin et al. (2022), checksum-verified."""
  return Critics(critics.load_published_critic("simclr", data_root),
                 critics.load_published_critic("protonet", data_root))


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The metrics of one set of drawings; `num_drawings` is the drawings per category that were used."""
  name: str
  num_drawings: int
  metrics: dict[str, np.ndarray]

  @property
  def point(self) -> tuple[float, float]:
    """(mean diversity, mean recognizability): the set's place in the diversity-recognizability plane."""
    return float(np.mean(self.metrics["diversity"])), float(np.mean(self.metrics["recognizability"]))

  @property
  def curve(self) -> tuple[np.ndarray, np.ndarray]:
    """The generalization curve (originality per bin, recognizability per bin)."""
    return self.metrics["curve_originality"], self.metrics["curve_recognizability"]


def human_drawings(split: FewShotSplit, num_categories: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(exemplars float32 [C, S, S], the other drawings of each category float32 [C, K - 1, S, S]).

  Needs the same number K of drawings in every category; `num_categories` keeps the first ones.
  """
  counts = np.bincount(split.labels, minlength=split.num_categories)
  if np.any(counts != counts[0]) or counts[0] < 3:
    raise ValueError(f"human drawings need the same number (>= 3) of drawings per category, got counts "
                     f"{sorted(set(counts.tolist()))}")
  count = split.num_categories if num_categories is None else num_categories
  if not 1 <= count <= split.num_categories:
    raise ValueError(f"num_categories={num_categories} must be in [1, {split.num_categories}]")
  per_category = counts[0]
  images = split.images.reshape(split.num_categories, per_category, *split.images.shape[1:])[:count]
  within = split.exemplar_index[:count] - np.arange(count) * per_category
  keep = np.arange(per_category)[None, :] != within[:, None]
  others = images[keep].reshape(count, per_category - 1, *images.shape[2:])
  scale = np.float32(split.max_value)
  return (images[np.arange(count), within].astype(np.float32) / scale, others.astype(np.float32) / scale)


def evaluate_drawings(judges: Critics, name: str, exemplars, drawings, *, num_bins: int = 10,
                      rounds: int = 100, seed: int = 44, threshold: float = 0.5) -> Evaluation:
  """Metrics of `drawings` [C, N, S, S] for their `exemplars` [C, S, S] (ink = 1, values in [0, 1]).

  Uses the first floor(N / num_bins) * num_bins drawings of each category.
  """
  drawings = np.asarray(drawings)
  exemplars = np.asarray(exemplars)
  if drawings.ndim != 4 or exemplars.ndim != 3 or drawings.shape[0] != exemplars.shape[0]:
    raise ValueError(f"{name}: need exemplars [C, S, S] and drawings [C, N, S, S], got {exemplars.shape} "
                     f"and {drawings.shape}")
  used = (drawings.shape[1] // num_bins) * num_bins
  if used < max(2, num_bins):
    raise ValueError(f"{name}: {drawings.shape[1]} drawings per category are too few for num_bins={num_bins}; "
                     f"draw at least {max(2, num_bins)} or lower num_bins")
  result = metrics.evaluate(judges.simclr, judges.protonet, exemplars, drawings[:, :used], rounds=rounds,
                            num_bins=num_bins, seed=seed, threshold=threshold)
  return Evaluation(name, used, result)


def summary_row(evaluation: Evaluation, humans: Evaluation) -> dict[str, float | str]:
  """The report's numbers for one evaluation, measured against `humans` (zero gaps for humans)."""
  diversity, recognizability = evaluation.point
  return {
      "model": evaluation.name,
      "diversity": diversity,
      "recognizability": recognizability,
      "originality": float(np.mean(evaluation.metrics["originality"])),
      "human_distance": metrics.human_gap(evaluation.point, humans.point),
      "curve_gap": metrics.curve_gap(evaluation.curve, humans.curve),
  }


def markdown_table(rows: Sequence[dict[str, float | str]], digits: int = 3) -> str:
  """A markdown table of summary rows, in the order of `SUMMARY_COLUMNS`."""
  lines = ["| " + " | ".join(_HEADERS[c] for c in SUMMARY_COLUMNS) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(SUMMARY_COLUMNS) - 1)) + "|"]
  for row in rows:
    cells = [str(row["model"])] + [f"{float(row[c]):.{digits}f}" for c in SUMMARY_COLUMNS[1:]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
