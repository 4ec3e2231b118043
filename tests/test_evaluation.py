"""The evaluation glue: human drawings, truncation to whole bins, summary rows, and humans vs noise."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxldm import critics, evaluation, metrics
from jaxldm.datasets.episodes import FewShotSplit


def _split(num_categories: int, per_category: int, size: int = 6) -> FewShotSplit:
  """Drawing j of category c carries the value c * 10 + j in its top-left pixel."""
  images = np.zeros((num_categories * per_category, size, size), np.uint8)
  images[:, 0, 0] = [(c * 10 + j) for c in range(num_categories) for j in range(per_category)]
  return FewShotSplit(images=images, labels=np.repeat(np.arange(num_categories), per_category),
                      category_names=tuple(f"c{c}" for c in range(num_categories)),
                      exemplar_index=np.arange(num_categories) * per_category + np.array([0, 2, 4])[:num_categories],
                      max_value=255)


def test_human_drawings_split_exemplar_from_the_others():
  exemplars, others = evaluation.human_drawings(_split(3, 5))
  codes = lambda a: np.rint(a[..., 0, 0] * 255).astype(int)
  np.testing.assert_array_equal(codes(exemplars), [0, 12, 24])
  np.testing.assert_array_equal(codes(others), [[1, 2, 3, 4], [10, 11, 13, 14], [20, 21, 22, 23]])
  assert exemplars.dtype == np.float32 and others.max() <= 1.0
  first, _ = evaluation.human_drawings(_split(3, 5), num_categories=2)
  assert first.shape == (2, 6, 6)
  with pytest.raises(ValueError, match="num_categories"):
    evaluation.human_drawings(_split(3, 5), num_categories=4)


@pytest.fixture(scope="module")
def random_critics():
  return evaluation.Critics(critics.SimCLRCritic(rngs=nnx.Rngs(0)), critics.ProtoNetCritic(rngs=nnx.Rngs(1)))


def _drawings(seed: int, categories: int = 20, per_category: int = 7):
  rng = np.random.default_rng(seed)
  exemplars = (rng.random((categories, 48, 48)) < 0.15).astype(np.float32)
  flips = rng.random((categories, per_category, 48, 48)) < 0.1
  return exemplars, np.where(flips, 1.0 - exemplars[:, None], exemplars[:, None]).astype(np.float32)


def test_evaluate_drawings_is_metrics_evaluate_on_whole_bins(random_critics):
  exemplars, drawings = _drawings(0)
  result = evaluation.evaluate_drawings(random_critics, "m", exemplars, drawings, num_bins=3, rounds=2)
  assert result.num_drawings == 6
  direct = metrics.evaluate(random_critics.simclr, random_critics.protonet, exemplars, drawings[:, :6],
                            rounds=2, num_bins=3)
  for key, value in direct.items():
    np.testing.assert_allclose(result.metrics[key], value, rtol=1e-6, err_msg=key)
  assert result.point == (pytest.approx(direct["diversity"].mean()), pytest.approx(direct["recognizability"].mean()))
  with pytest.raises(ValueError, match="too few"):
    evaluation.evaluate_drawings(random_critics, "m", exemplars, drawings, num_bins=10)


def test_summary_rows_against_humans(random_critics):
  humans = evaluation.evaluate_drawings(random_critics, "humans", *_drawings(0), num_bins=3, rounds=2)
  model = evaluation.evaluate_drawings(random_critics, "model", *_drawings(1), num_bins=3, rounds=2)
  human_row = evaluation.summary_row(humans, humans)
  assert human_row["human_distance"] == 0.0 and human_row["curve_gap"] == 0.0
  row = evaluation.summary_row(model, humans)
  (d_m, r_m), (d_h, r_h) = model.point, humans.point
  assert row["human_distance"] == pytest.approx(np.hypot(d_m - d_h, r_m - r_h))
  assert row["originality"] == pytest.approx(model.metrics["originality"].mean())
  assert row["curve_gap"] == pytest.approx(metrics.curve_gap(model.curve, humans.curve))
  table = evaluation.markdown_table([human_row, row]).splitlines()
  assert table[0].startswith("| model | diversity | recognizability | mean originality")
  assert len(table) == 4 and table[3].startswith("| model | ")
  assert table[3].count("|") == len(evaluation.SUMMARY_COLUMNS) + 1


def test_human_drawings_recognizable_and_noise_at_chance(data_root):
  from jaxldm.datasets.omniglot import load_omniglot
  judges = evaluation.published_critics(data_root)
  exemplars, others = evaluation.human_drawings(load_omniglot(data_root, "test", 48), num_categories=40)
  humans = evaluation.evaluate_drawings(judges, "humans", exemplars, others, num_bins=5, rounds=20)
  assert humans.num_drawings == 15
  noise = (np.random.default_rng(0).random(others[:, :10].shape) < 0.2).astype(np.float32)
  random = evaluation.evaluate_drawings(judges, "noise", exemplars, noise, num_bins=5, rounds=20)
  assert humans.point[1] > 0.8
  assert abs(random.point[1] - 1 / 20) < 0.05
  assert evaluation.summary_row(random, humans)["human_distance"] > 0.7
