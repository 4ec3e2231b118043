"""Evaluation metrics: NumPy restatements of diversity, originality and episode classification; episode
sampling; and the published critics on held-out Omniglot drawings (high) against noise (chance)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from jaxldm import critics, metrics


def test_diversity_and_originality_match_numpy_restatements():
  rng = np.random.default_rng(0)
  samples, exemplars = rng.normal(size=(3, 5, 7)), rng.normal(size=(3, 7))
  normalizer = np.mean([np.std(row, ddof=1) for row in samples.reshape(-1, 7)])
  assert metrics.feature_normalizer(samples) == pytest.approx(normalizer)
  for c in range(3):
    spread = np.mean([np.sqrt(np.sum((samples[c, :, f] - samples[c, :, f].mean()) ** 2) / 4) for f in range(7)])
    assert metrics.diversity(samples, normalizer)[c] == pytest.approx(spread / normalizer)
    for n in range(5):
      rms = np.sqrt(np.mean(((samples[c, n] - exemplars[c]) / normalizer) ** 2))
      assert metrics.originality(samples, exemplars, normalizer)[c, n] == pytest.approx(rms)


def test_originality_bins_rank_samples_within_each_category():
  rng = np.random.default_rng(1)
  scores = rng.random((4, 12))
  bins = metrics.originality_bins(scores, 3)
  assert bins.shape == (4, 3, 4)
  for c in range(4):
    assert sorted(bins[c].ravel()) == list(range(12))
    binned = scores[c][bins[c]]
    assert binned[0].max() <= binned[1].min() and binned[1].max() <= binned[2].min()
  with pytest.raises(ValueError, match="num_bins=5"):
    metrics.originality_bins(scores, 5)


def test_balanced_episodes_are_seeded_distinct_and_balanced():
  episodes = metrics.balanced_episodes(30, rounds=7, way=20, seed=3)
  np.testing.assert_array_equal(episodes, metrics.balanced_episodes(30, rounds=7, way=20, seed=3))
  assert not np.array_equal(episodes, metrics.balanced_episodes(30, rounds=7, way=20, seed=4))
  assert episodes.shape[1] == 20
  assert all(len(set(row)) == 20 for row in episodes)
  counts = np.bincount(episodes.ravel(), minlength=30)
  assert counts.max() - counts.min() <= 1 and counts.min() >= 6
  with pytest.raises(ValueError, match="way=20"):
    metrics.balanced_episodes(10, rounds=1)


def test_recognizability_matches_numpy_episode_loop():
  rng = np.random.default_rng(2)
  exemplar_metric, sample_metric = rng.normal(size=(25, 6)), rng.normal(size=(25, 4, 6))
  sample_metric[:10] = exemplar_metric[:10, None] + 0.01 * sample_metric[:10]
  episodes = metrics.balanced_episodes(25, rounds=8, way=5, seed=0)
  accuracy = metrics.recognizability_from_embeddings(exemplar_metric, sample_metric, episodes, seed=9)
  picks = np.random.default_rng(9).integers(4, size=episodes.shape)
  hits, seen = np.zeros(25), np.zeros(25)
  for episode, pick in zip(episodes, picks):
    for slot, (category, sample) in enumerate(zip(episode, pick)):
      distances = [np.sum((sample_metric[category, sample] - exemplar_metric[other]) ** 2) for other in episode]
      hits[category] += int(np.argmin(distances) == slot)
      seen[category] += 1
  np.testing.assert_allclose(accuracy, hits / seen)
  np.testing.assert_array_equal(accuracy[:10], 1.0)


def test_prepare_images_resizes_48_to_50_and_keeps_polarity():
  drawing = np.zeros((2, 48, 48), np.float32)
  drawing[0, 10:38, 20:26] = 0.8
  prepared = np.asarray(metrics.prepare_images(drawing))
  assert prepared.shape == (2, 50, 50, 1)
  assert set(np.unique(prepared)) <= {0.0, 1.0}
  assert prepared[0, 25, 24, 0] == 1.0 and prepared[0, 2, 2, 0] == 0.0
  assert prepared[1].sum() == 0
  with pytest.raises(ValueError, match="square"):
    metrics.prepare_images(np.zeros((2, 48, 40)))


def test_curve_gap_and_human_gap():
  x = np.linspace(0.2, 0.8, 10)
  human = (x, 1.0 - x)
  assert metrics.curve_gap(human, human) == pytest.approx(0.0)
  assert metrics.curve_gap((x, 0.9 - x), human) == pytest.approx(0.1 * 0.6)
  assert metrics.human_gap((0.3, 0.8), (0.6, 0.4)) == pytest.approx(0.5)
  assert metrics.human_gap((0.3, 0.8), (0.6, 0.4), axis_scale=(0.3, 0.4)) == pytest.approx(np.sqrt(2.0))


# ---------------------------------------------------------------------------------------------------
# Real held-out Omniglot drawings with the published critics.


def _omniglot_test_categories(data_root, drawings_per_category: int) -> np.ndarray:
  """Characters 01-03 of every alphabet (150 categories) as [150, drawings, 50, 50], ink = 1, binary.

  Preprocessed as the critics' training data: 105x105 -> bilinear 50x50, invert, min-max, > 0.5.
  """
  categories: dict[str, list[np.ndarray]] = {}
  for archive_name in ("images_background", "images_evaluation"):
    with zipfile.ZipFile(data_root / "omniglot" / f"{archive_name}.zip") as archive:
      for name in sorted(archive.namelist()):
        parts = name.split("/")
        if len(parts) != 4 or parts[2] not in ("character01", "character02", "character03"):
          continue
        drawings = categories.setdefault(f"{parts[1]}/{parts[2]}", [])
        if not name.endswith(".png") or len(drawings) == drawings_per_category:
          continue
        grey = Image.open(io.BytesIO(archive.read(name))).convert("L").resize((50, 50), Image.BILINEAR)
        ink = 1.0 - np.asarray(grey, np.float32) / 255.0
        drawings.append(((ink - ink.min()) / (ink.max() - ink.min()) > 0.5).astype(np.float32))
  return np.stack([np.stack(categories[key]) for key in sorted(categories)])


@pytest.fixture(scope="module")
def published(data_root):
  return critics.load_published_critic("simclr", data_root), critics.load_published_critic("protonet", data_root)


@pytest.fixture(scope="module")
def omniglot_test(data_root):
  return _omniglot_test_categories(data_root, drawings_per_category=7)


def test_human_drawings_are_recognizable_and_noise_is_at_chance(published, omniglot_test):
  simclr, protonet = published
  assert omniglot_test.shape == (150, 7, 50, 50)
  exemplars, humans = omniglot_test[:, 0], omniglot_test[:, 1:]
  result = metrics.evaluate(simclr, protonet, exemplars, humans, rounds=20, num_bins=3, seed=5)
  assert result["recognizability"].mean() > 0.85
  assert result["recognizability_per_bin"].shape == (150, 3)
  assert np.all(np.diff(result["curve_originality"]) >= 0)
  assert result["curve_recognizability"][0] >= result["curve_recognizability"][-1]
  assert result["originality"].shape == (150, 6) and np.all(result["diversity"] > 0)

  noise = (np.random.default_rng(0).random(humans.shape) < 0.1).astype(np.float32)
  noise_result = metrics.evaluate(simclr, protonet, exemplars, noise, rounds=20, num_bins=3, seed=5)
  assert 0.02 < noise_result["recognizability"].mean() < 0.09
  assert noise_result["originality"].mean() > result["originality"].mean()
