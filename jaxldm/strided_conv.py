"""The autoencoder's convolutions rewritten as stride-1, dilation-free ones, for XLA's CPU backend.

XLA:CPU runs stride-1 convolutions on its fast path (~90 GFLOP/s on one core here) but strided and transposed
convolutions, whose gradients need dilation, and convolutions to a single output channel, on slow generic
code. So:
- `down_conv` (4x4, stride 2): space-to-depth of the padded input (2x2 blocks -> channels), then a 2x2 stride-1
  convolution with the regrouped kernel; the same FLOPs.
- `up_conv` (4x4 transposed, stride 2, padding 2): output pixel (2q + p, 2r + s) reads a 3x3 window of the input
  padded by one, through kernel taps chosen by the phase (p, s); one 3x3 stride-1 convolution produces all four
  phases as channels (a kernel with zero taps, 2.25x the FLOPs, but one fast convolution), then depth-to-space.
- `single_channel_conv` (4x4 stride-1 to one channel): each pixel's 16 tap responses in one matmul, then the sum
  of the 16 shifted tap planes.
At batch 128 on one core (fwd+bwd) the decoder's three transposed convolutions take 344 ms instead of 645 ms as
patch matmuls, the encoder's four 99 ms instead of 117 ms, and the output convolution 33 ms instead of 57 ms as
an `nnx.Conv`.
All hold the usual (4, 4, in, out) kernel and equal `nnx.Conv` / `nnx.ConvTranspose(strides=2, padding=2)` in
values and gradients (tests/test_strided_conv.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _phase_taps() -> np.ndarray:
  """[u, p, i] = 1 when row u of the 3x3 window reaches output phase p through kernel row i."""
  taps = np.zeros((3, 2, 4), np.float32)
  for phase in (0, 1):
    for offset in (0, 1):
      taps[phase + offset, phase, phase + 2 * offset] = 1.0
  return taps


PHASE_TAPS = _phase_taps()


def _stride1_conv(x: jax.Array, kernel: jax.Array, padding: str | tuple[tuple[int, int], ...]) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=DIMENSIONS)


def down_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """`x` [B, H, W, C] * 4x4 `kernel`, stride 2, `padding` on every side: [B, (H + 2p - 4) // 2 + 1, ...]."""
  batch, height, width, channels = x.shape
  out_h, out_w = (height + 2 * padding - 4) // 2 + 1, (width + 2 * padding - 4) // 2 + 1
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))[:, :2 * out_h + 2, :2 * out_w + 2]
  blocks = x.reshape(batch, out_h + 1, 2, out_w + 1, 2, channels).transpose(0, 1, 3, 2, 4, 5)
  blocks = blocks.reshape(batch, out_h + 1, out_w + 1, 4 * channels)
  block_kernel = kernel.reshape(2, 2, 2, 2, channels, -1).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * channels, -1)
  return _stride1_conv(blocks, block_kernel, "VALID")


def up_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Transposed 4x4 convolution, stride 2, padding 2 (lax.conv_transpose convention): [B, 2H, 2W, out].

  Output row 2q + p reads input rows q - 1 + p and q + p through kernel rows p and p + 2, i.e. rows p and p + 1
  of the 3x3 window centred on q (`PHASE_TAPS`); likewise for columns.
  """
  batch, height, width, channels = x.shape
  phase_kernel = jnp.einsum("upi,vsj,ijco->uvcpso", PHASE_TAPS, PHASE_TAPS, kernel).reshape(3, 3, channels, -1)
  phases = _stride1_conv(x, phase_kernel, ((1, 1), (1, 1)))
  phases = phases.reshape(batch, height, width, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5)
  return phases.reshape(batch, 2 * height, 2 * width, -1)


def single_channel_conv(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
  """`x` [B, H, W, C] * `kernel` [k, k, C, 1], stride 1, (before, after) `padding` on both spatial axes."""
  batch, height, width, channels = x.shape
  size = kernel.shape[0]
  taps = x.reshape(-1, channels) @ kernel.transpose(2, 0, 1, 3).reshape(channels, size * size)
  taps = jnp.pad(taps.reshape(batch, height, width, size * size), ((0, 0), padding, padding, (0, 0)))
  out_h, out_w = height + sum(padding) - size + 1, width + sum(padding) - size + 1
  return sum(taps[:, i:i + out_h, j:j + out_w, size * i + j] for i in range(size) for j in range(size))[..., None]


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


class SingleChannelConv(nnx.Module):
  """4x4 stride-1 convolution to one channel with bias, `padding` = (before, after) on both spatial axes;
  initialised and named (kernel, bias) like `nnx.Conv`."""

  def __init__(self, in_features: int, padding: tuple[int, int], *, rngs: nnx.Rngs):
    self.padding = padding
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (4, 4, in_features, 1)))
    self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (1,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return single_channel_conv(x, self.kernel[...], self.padding) + self.bias[...]
