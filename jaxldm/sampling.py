"""Drawing samples for exemplars in fixed-size sampler calls, and saving them: PNG grids and a samples.npz.

Grids show ink (1) as black on white: one column per category, the exemplar on top, then a gap, then its
samples (or reconstructions) one per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

GAP = 2
SECTION_GAP = 6


def in_chunks(fn: Callable[[jax.Array, jax.Array], jax.Array], conds: np.ndarray, chunk: int,
              key: jax.Array) -> np.ndarray:
  """Applies `fn(cond_chunk, key)` to `conds` in chunks of exactly `chunk` rows (the last one padded by
  repeating its final row), so a jitted `fn` compiles once; returns the stacked outputs for the real rows."""
  outputs = []
  for index, start in enumerate(range(0, len(conds), chunk)):
    part = conds[start:start + chunk]
    padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)]) if len(part) < chunk else part
    outputs.append(np.asarray(fn(padded, jax.random.fold_in(key, index)))[:len(part)])
  return np.concatenate(outputs)


def _tile(rows: Sequence[np.ndarray]) -> np.ndarray:
  """Sections of image rows [n_rows, n_cols, S, S] in [0, 1] -> one uint8 canvas, ink dark."""
  size = rows[0].shape[-1]
  columns = rows[0].shape[1]
  heights = [len(r) for r in rows]
  height = sum(h * (size + GAP) for h in heights) + SECTION_GAP * (len(rows) - 1)
  width = columns * (size + GAP) - GAP
  canvas = np.ones((height, width), np.float32)
  y = 0
  for section in rows:
    for row in section:
      for col, image in enumerate(row):
        x = col * (size + GAP)
        canvas[y:y + size, x:x + size] = 1.0 - np.clip(image, 0.0, 1.0)
      y += size + GAP
    y += SECTION_GAP
  return (canvas * 255).round().astype(np.uint8)


def save_sections(path: Path, sections: Sequence[np.ndarray], scale: int = 2) -> Path:
  """PNG of image sections, each [rows, C, S, S] in [0, 1] (one column per category), stacked top to bottom."""
  canvas = _tile(list(sections))
  image = Image.fromarray(canvas, mode="L")
  image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path)
  return path


def save_grid(path: Path, exemplars: np.ndarray, samples: np.ndarray) -> Path:
  """PNG of exemplars [C, S, S] above their samples [C, N, S, S] (one column per category)."""
  if samples.shape[0] != exemplars.shape[0] or samples.shape[2:] != exemplars.shape[1:]:
    raise ValueError(f"samples {samples.shape} do not match exemplars {exemplars.shape}.")
  return save_sections(path, [exemplars[None], np.swapaxes(samples, 0, 1)])


def save_samples(path: Path, exemplars: np.ndarray, samples: np.ndarray, category_names: Sequence[str]) -> Path:
  """samples.npz: exemplars float32 [C, S, S], samples float32 [C, N, S, S] in [0, 1], category_names [C]."""
  if not len(exemplars) == len(samples) == len(category_names):
    raise ValueError(f"{len(exemplars)} exemplars, {len(samples)} sample sets, {len(category_names)} names.")
  np.savez_compressed(path, exemplars=exemplars.astype(np.float32), samples=samples.astype(np.float32),
                      category_names=np.array(category_names))
  return path
