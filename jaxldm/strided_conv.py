"""4x4 stride-2 convolutions and transposed convolutions as patch matmuls, for XLA's CPU backend.

XLA:CPU runs small-channel convolutions, and above all those with dilation (the backward pass of a strided
convolution, a transposed convolution in both directions), on a slow generic path: one stride-2 transposed
convolution of the autoencoder took ~170-270 ms fwd+bwd at batch 128, ~8x its forward. Here each output is a
matmul of gathered input patches with the flattened kernel, so forward and backward are one GEMM each plus
slicing:
- `down_conv`: the 16 taps of a 4x4 window, read with stride 2 from the padded input;
- `up_conv`: the four output phases (even/odd row x column) of the transposed convolution, each a 2x2 window
  with every other tap of the 4x4 kernel, interleaved by depth-to-space.
Both hold the usual (4, 4, in, out) kernel and equal `nnx.Conv(strides=2)` / `nnx.ConvTranspose(strides=2,
padding=2)` in values and gradients (tests/test_strided_conv.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _patch_matmul(x: jax.Array, kernel: jax.Array, rows: range, cols: range, out_h: int, out_w: int,
                  stride: int) -> jax.Array:
  """sum over taps (i, j) of x[:, rows[i] + stride*q, cols[j] + stride*r, :] @ kernel[i, j]."""
  patches = jnp.concatenate(
      [x[:, r:r + stride * (out_h - 1) + 1:stride, c:c + stride * (out_w - 1) + 1:stride, :]
       for r in rows for c in cols], axis=-1)
  return patches @ kernel.reshape(-1, kernel.shape[-1])


def down_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """`x` [B, H, W, C] * 4x4 `kernel`, stride 2, `padding` on every side: [B, (H + 2p - 4) // 2 + 1, ...]."""
  _, height, width, _ = x.shape
  out_h, out_w = (height + 2 * padding - 4) // 2 + 1, (width + 2 * padding - 4) // 2 + 1
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return _patch_matmul(x, kernel, range(4), range(4), out_h, out_w, stride=2)


def up_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed 4x4 convolution, stride 2, padding 2 (lax.conv_transpose convention): [B, 2H, 2W, out].

  Output row 2q + p reads input rows q - 1 + p and q + p through kernel rows p and p + 2: with the input padded
  by one, window offsets (p, p + 1) and taps (p, p + 2), likewise for columns.
  """
  batch, height, width, _ = x.shape
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  phases = [[_patch_matmul(x, kernel[ph::2, pw::2], range(ph, ph + 2), range(pw, pw + 2), height, width, 1)
             for pw in (0, 1)] for ph in (0, 1)]
  out = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, H, 2, W, 2, out]
  return out.reshape(batch, 2 * height, 2 * width, -1)


class DownConv(nnx.Module):
  """4x4 stride-2 convolution without bias, initialised like `nnx.Conv`."""

  def __init__(self, in_features: int, out_features: int, padding: int, *, rngs: nnx.Rngs):
    self.padding = padding
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (4, 4, in_features, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return down_conv(x, self.kernel[...], self.padding)


class UpConv(nnx.Module):
  """4x4 stride-2 transposed convolution (doubles the spatial size) without bias, initialised like
  `nnx.ConvTranspose`."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (4, 4, in_features, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return up_conv(x, self.kernel[...])
