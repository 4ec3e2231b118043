"""Anti-aliased rendering of Quick, Draw! stroke drawings in NumPy.

A drawing is a list of strokes `[[x0, x1, ...], [y0, y1, ...]]` in the 0-255 box of Google's simplified
format. It is drawn the way Google's `numpy_bitmap` files were made: round-capped lines of a fixed width in
the 256-unit box, the drawing's bounding box centred, a margin around it, and each pixel's ink the fraction
of its area the thick line covers (the coverage is the clipped signed distance to the line's edge, which is
exact for straight edges and a good approximation at caps and joins). With a 16-unit line and a 16-unit
margin, 28x28 renders differ from the shipped bitmaps of the same drawings by about 2/255 per pixel on
average. Rendering straight at the target size avoids upsampling 28x28 bitmaps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STROKE_BOX = 256.0
LINE_WIDTH = 16.0
MARGIN = 16.0

Drawing = Sequence[Sequence[Sequence[float]]]


def segments(drawing: Drawing) -> np.ndarray:
  """Line segments [M, 2, 2] (start/end, x/y) of the drawing; a one-point stroke is a zero-length segment."""
  pieces = []
  for stroke in drawing:
    if len(stroke) < 2:
      raise ValueError(f"A stroke must be [[x...], [y...]]; got {stroke!r}.")
    points = np.stack([np.asarray(stroke[0], np.float64), np.asarray(stroke[1], np.float64)], axis=-1)
    if points.shape[0] == 0:
      continue
    if points.shape[0] == 1:
      points = np.concatenate([points, points])
    pieces.append(np.stack([points[:-1], points[1:]], axis=1))
  if not pieces:
    raise ValueError("The drawing has no points.")
  return np.concatenate(pieces)


def _pixel_segment_pairs(segs: np.ndarray, reach: float, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Every (segment, pixel) pair where the pixel lies in the segment's box widened by `reach` pixels.

  `segs` are in pixel units. Returns the segment index and flat pixel index of each pair; restricting the
  distance computation to these pairs makes rendering cost scale with the ink, not with pixels x segments.
  """
  low = np.clip(np.floor(segs.min(1) - reach), 0, size - 1).astype(np.int64)
  high = np.clip(np.ceil(segs.max(1) + reach), 0, size - 1).astype(np.int64)
  width, height = high[:, 0] - low[:, 0] + 1, high[:, 1] - low[:, 1] + 1
  area = width * height
  segment = np.repeat(np.arange(len(segs)), area)
  offset = np.arange(area.sum()) - np.repeat(np.cumsum(area) - area, area)
  x = low[segment, 0] + offset % width[segment]
  y = low[segment, 1] + offset // width[segment]
  return segment, y * size + x


def rasterise(drawing: Drawing, size: int, line_width: float = LINE_WIDTH, margin: float = MARGIN) -> np.ndarray:
  """Renders one drawing as a uint8 [size, size] image, 0 = background, 255 = full ink.

  The 256-unit box plus `margin` on each side plus the line width maps onto `size` pixels; the drawing's
  bounding box is centred in the 256-unit box first, so the result does not depend on where it was drawn.
  """
  if size < 1:
    raise ValueError(f"size must be a positive number of pixels; got {size}.")
  if line_width <= 0:
    raise ValueError(f"line_width must be positive; got {line_width}.")
  segs = segments(drawing)
  flat = segs.reshape(-1, 2)
  low, high = flat.min(0), flat.max(0)
  segs = segs + (STROKE_BOX - (high - low)) / 2.0 - low
  units_per_pixel = (STROKE_BOX + 2.0 * margin + line_width) / size
  segs = (segs + margin + line_width / 2.0) / units_per_pixel - 0.5
  radius = line_width / 2.0 / units_per_pixel
  segment, pixel = _pixel_segment_pairs(segs, radius + 1.0, size)
  points = np.stack([pixel % size, pixel // size], axis=-1).astype(np.float64)
  start, direction = segs[segment, 0], segs[segment, 1] - segs[segment, 0]
  length_sq = np.maximum((direction ** 2).sum(-1), 1e-12)
  t = np.clip(((points - start) * direction).sum(-1) / length_sq, 0.0, 1.0)
  distance = np.sqrt(((points - start - t[:, None] * direction) ** 2).sum(-1))
  coverage = np.zeros(size * size)
  np.maximum.at(coverage, pixel, np.clip(radius - distance + 0.5, 0.0, 1.0))
  return np.round(coverage * 255.0).astype(np.uint8).reshape(size, size)
