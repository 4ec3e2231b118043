"""Noise-prediction networks with the `eps_fn(x_t, t, cond, drop)` interface of `jaxldm.diffusion`.

`LatentUNet` is LatentMatters' exemplar-conditioned `Unet1D_MLP` (an MLP U-Net on latent vectors);
`PixelUNet` is the 48x48 conv U-Net of diffusion_as_artist's guided DDPM (`Unet_V2_Omniglot`) with the
exemplar stacked as a second input channel. Both receive the integer timestep through a sinusoidal embedding
and replace the exemplar by zeros on rows where `drop` is True (the classifier-free-guidance null condition).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxldm.diffusion import null_condition


def sinusoidal_embedding(t: jax.Array, dim: int, theta: float = 10000.0) -> jax.Array:
  """Transformer-style embedding `[sin(t f_k), cos(t f_k)]` of timesteps `(B,)` -> `(B, dim)`."""
  if dim < 4 or dim % 2:
    raise ValueError(f"embedding dim must be an even number >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(theta) / (half - 1) * jnp.arange(half))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TimeEmbedding(nnx.Module):
  """Sinusoidal features followed by a two-layer GELU MLP."""

  def __init__(self, sinusoid_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.sinusoid_dim = sinusoid_dim
    self.hidden = nnx.Linear(sinusoid_dim, out_dim, rngs=rngs)
    self.out = nnx.Linear(out_dim, out_dim, rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.out(nnx.gelu(self.hidden(sinusoidal_embedding(t, self.sinusoid_dim)), approximate=False))


def _drop_mask(drop: jax.Array | None, batch_size: int) -> jax.Array:
  return jnp.zeros((batch_size,), bool) if drop is None else drop


# ----- latent MLP U-Net -----


class MLPResBlock(nnx.Module):
  """Linear-GroupNorm-FiLM(t)-SiLU then Linear-GroupNorm-SiLU, plus a (projected) skip."""

  def __init__(self, in_dim: int, out_dim: int, time_dim: int, groups: int, *, rngs: nnx.Rngs):
    self.film = nnx.Linear(time_dim, 2 * out_dim, rngs=rngs)
    self.linear1 = nnx.Linear(in_dim, out_dim, rngs=rngs)
    self.norm1 = nnx.GroupNorm(out_dim, num_groups=groups, epsilon=1e-5, rngs=rngs)
    self.linear2 = nnx.Linear(out_dim, out_dim, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_dim, num_groups=groups, epsilon=1e-5, rngs=rngs)
    self.skip = nnx.Linear(in_dim, out_dim, rngs=rngs) if in_dim != out_dim else None

  def __call__(self, x: jax.Array, time_emb: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.film(nnx.silu(time_emb)), 2, axis=-1)
    h = nnx.silu(self.norm1(self.linear1(x)) * (1.0 + scale) + shift)
    h = nnx.silu(self.norm2(self.linear2(h)))
    return h + (x if self.skip is None else self.skip(x))


class VectorSelfAttention(nnx.Module):
  """Residual, RMS-pre-normed self-attention inside one feature vector.

  As in LatentMatters' `MyAttention`, each head's `head_dim` query/key/value entries are the tokens (of size 1),
  so attention mixes features of a single vector.
  """

  def __init__(self, dim: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
    self.heads, self.head_dim = heads, head_dim
    self.pre_norm = nnx.RMSNorm(dim, epsilon=1e-6, rngs=rngs)
    self.to_qkv = nnx.Linear(dim, 3 * heads * head_dim, use_bias=False, rngs=rngs)
    self.to_out = nnx.Linear(heads * head_dim, dim, rngs=rngs)
    self.out_norm = nnx.RMSNorm(dim, epsilon=1e-6, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch = x.shape[0]
    q, k, v = (a.reshape(batch, self.heads, self.head_dim)
               for a in jnp.split(self.to_qkv(self.pre_norm(x)), 3, axis=-1))
    weights = jax.nn.softmax(q[..., :, None] * k[..., None, :] * self.head_dim**-0.5, axis=-1)
    attended = jnp.einsum("bhij,bhj->bhi", weights, v).reshape(batch, -1)
    return x + self.out_norm(self.to_out(attended))


class LatentDownLevel(nnx.Module):
  """Two residual blocks and attention at one width, then a linear map to the next width."""

  def __init__(self, dim: int, next_dim: int, time_dim: int, groups: int, heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    self.block1 = MLPResBlock(dim, dim, time_dim, groups, rngs=rngs)
    self.block2 = MLPResBlock(dim, dim, time_dim, groups, rngs=rngs)
    self.attention = VectorSelfAttention(dim, heads, head_dim, rngs=rngs)
    self.down = nnx.Linear(dim, next_dim, rngs=rngs)


class LatentUpLevel(nnx.Module):
  """Two residual blocks that each consume one skip connection, attention, then a linear map back up."""

  def __init__(self, dim: int, skip_dim: int, time_dim: int, groups: int, heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    self.block1 = MLPResBlock(dim + skip_dim, dim, time_dim, groups, rngs=rngs)
    self.block2 = MLPResBlock(dim + skip_dim, dim, time_dim, groups, rngs=rngs)
    self.attention = VectorSelfAttention(dim, heads, head_dim, rngs=rngs)
    self.up = nnx.Linear(dim, skip_dim, rngs=rngs)


class LatentUNet(nnx.Module):
  """Exemplar-conditioned MLP U-Net on latent vectors (LatentMatters `Unet1D_MLP`, conditioning "stack").

  Widths are `[dim] + [dim // m for m in dim_mults]` (64/64/32 with the reference's dim=64, mults (1, 2)).
  The exemplar latent is concatenated with the noisy latent at the input.
  """

  def __init__(self, latent_size: int, *, dim: int = 64, dim_mults: Sequence[float] = (1, 2),
               time_dim: int = 128, groups: int = 8, heads: int = 4, head_dim: int = 32, rngs: nnx.Rngs):
    widths = [dim] + [int(dim // m) for m in dim_mults]
    bad = [w for w in widths if w < 1 or w % groups]
    if bad:
      raise ValueError(f"widths {widths} must be positive multiples of groups={groups}; bad: {bad}")
    self.latent_size = latent_size
    self.input = nnx.Linear(2 * latent_size, dim, rngs=rngs)
    self.time_embedding = TimeEmbedding(time_dim, time_dim, rngs=rngs)
    pairs = list(zip(widths[:-1], widths[1:]))
    self.downs = nnx.List([LatentDownLevel(d_in, d_out, time_dim, groups, heads, head_dim, rngs=rngs)
                           for d_in, d_out in pairs])
    mid = widths[-1]
    self.mid_block1 = MLPResBlock(mid, mid, time_dim, groups, rngs=rngs)
    self.mid_attention = VectorSelfAttention(mid, heads, head_dim, rngs=rngs)
    self.mid_block2 = MLPResBlock(mid, mid, time_dim, groups, rngs=rngs)
    self.ups = nnx.List([LatentUpLevel(d_out, d_in, time_dim, groups, heads, head_dim, rngs=rngs)
                         for d_in, d_out in reversed(pairs)])
    self.final_block = MLPResBlock(2 * dim, dim, time_dim, groups, rngs=rngs)
    self.output = nnx.Linear(dim, latent_size, rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: jax.Array,
               drop: jax.Array | None = None) -> jax.Array:
    """Predicts the noise in `x_t` `(B, latent_size)` at timesteps `t` `(B,)` given exemplar latents `cond`."""
    if x_t.shape[-1] != self.latent_size or cond.shape != x_t.shape:
      raise ValueError(f"x_t {x_t.shape} and cond {cond.shape} must both be (B, {self.latent_size})")
    cond = null_condition(cond, _drop_mask(drop, x_t.shape[0]))
    x = self.input(jnp.concatenate([cond, x_t], axis=-1))
    first = x
    time_emb = self.time_embedding(t)
    skips = []
    for level in self.downs:
      x = level.block1(x, time_emb)
      skips.append(x)
      x = level.attention(level.block2(x, time_emb))
      skips.append(x)
      x = level.down(x)
    x = self.mid_block2(self.mid_attention(self.mid_block1(x, time_emb)), time_emb)
    for level in self.ups:
      x = level.block1(jnp.concatenate([x, skips.pop()], axis=-1), time_emb)
      x = level.block2(jnp.concatenate([x, skips.pop()], axis=-1), time_emb)
      x = level.up(level.attention(x))
    x = self.final_block(jnp.concatenate([x, first], axis=-1), time_emb)
    return self.output(x)


# ----- pixel conv U-Net -----


class ConvNeXtBlock(nnx.Module):
  """Depthwise 7x7 conv plus a time bias, then LayerNorm-conv-GELU-LayerNorm-conv, plus a (1x1) skip."""

  def __init__(self, in_dim: int, out_dim: int, time_dim: int, mult: int, *, rngs: nnx.Rngs):
    self.time_bias = nnx.Linear(time_dim, in_dim, rngs=rngs)
    self.depthwise = nnx.Conv(in_dim, in_dim, (7, 7), padding=3, feature_group_count=in_dim, rngs=rngs)
    self.norm1 = nnx.GroupNorm(in_dim, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.conv1 = nnx.Conv(in_dim, out_dim * mult, (3, 3), padding=1, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_dim * mult, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.conv2 = nnx.Conv(out_dim * mult, out_dim, (3, 3), padding=1, rngs=rngs)
    self.skip = nnx.Conv(in_dim, out_dim, (1, 1), rngs=rngs) if in_dim != out_dim else None

  def __call__(self, x: jax.Array, time_emb: jax.Array) -> jax.Array:
    h = self.depthwise(x) + self.time_bias(nnx.gelu(time_emb, approximate=False))[:, None, None, :]
    h = self.conv1(self.norm1(h))
    h = self.conv2(self.norm2(nnx.gelu(h, approximate=False)))
    return h + (x if self.skip is None else self.skip(x))


class SpatialAttention(nnx.Module):
  """Residual, LayerNorm-pre-normed multi-head attention over pixels: softmax, or linear (Shen et al.)."""

  def __init__(self, dim: int, linear: bool, heads: int, head_dim: int, *, rngs: nnx.Rngs):
    self.heads, self.head_dim, self.linear = heads, head_dim, linear
    self.pre_norm = nnx.GroupNorm(dim, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.to_qkv = nnx.Conv(dim, 3 * heads * head_dim, (1, 1), use_bias=False, rngs=rngs)
    self.to_out = nnx.Conv(heads * head_dim, dim, (1, 1), rngs=rngs)
    self.out_norm = nnx.GroupNorm(dim, num_groups=1, epsilon=1e-5, rngs=rngs) if linear else None

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, _ = x.shape
    qkv = self.to_qkv(self.pre_norm(x)).reshape(batch, height * width, 3, self.heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = self.head_dim**-0.5
    if self.linear:
      q = jax.nn.softmax(q, axis=-1) * scale
      k = jax.nn.softmax(k, axis=1)
      context = jnp.einsum("bnhd,bnhe->bhde", k, v)
      out = jnp.einsum("bhde,bnhd->bnhe", context, q)
    else:
      weights = jax.nn.softmax(jnp.einsum("bihd,bjhd->bhij", q * scale, k), axis=-1)
      out = jnp.einsum("bhij,bjhd->bihd", weights, v)
    out = self.to_out(out.reshape(batch, height, width, -1))
    return x + (out if self.out_norm is None else self.out_norm(out))


class PixelDownLevel(nnx.Module):
  """Two ConvNeXt blocks and linear attention at one resolution, then an optional stride-2 conv."""

  def __init__(self, in_dim: int, out_dim: int, time_dim: int, mult: int, heads: int, head_dim: int,
               downsample: bool, *, rngs: nnx.Rngs):
    self.block1 = ConvNeXtBlock(in_dim, out_dim, time_dim, mult, rngs=rngs)
    self.block2 = ConvNeXtBlock(out_dim, out_dim, time_dim, mult, rngs=rngs)
    self.attention = SpatialAttention(out_dim, True, heads, head_dim, rngs=rngs)
    self.down = (nnx.Conv(out_dim, out_dim, (4, 4), strides=2, padding=1, rngs=rngs)
                 if downsample else None)


class PixelUpLevel(nnx.Module):
  """Consumes the skip of one resolution: two ConvNeXt blocks, linear attention, a stride-2 transposed conv."""

  def __init__(self, in_dim: int, out_dim: int, time_dim: int, mult: int, heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    self.block1 = ConvNeXtBlock(2 * in_dim, out_dim, time_dim, mult, rngs=rngs)
    self.block2 = ConvNeXtBlock(out_dim, out_dim, time_dim, mult, rngs=rngs)
    self.attention = SpatialAttention(out_dim, True, heads, head_dim, rngs=rngs)
    self.up = nnx.ConvTranspose(out_dim, out_dim, (4, 4), strides=2, padding="SAME", rngs=rngs)


class PixelUNet(nnx.Module):
  """Guided-DDPM conv U-Net for images `(B, H, W, channels)` (diffusion_as_artist `Unet_V2_Omniglot`).

  The exemplar image is stacked with the noisy image along channels. Widths are `features * m` per level;
  all but the last level halve the resolution, so H and W must be divisible by 2**(len(dim_mults) - 1).
  As in the reference, the first level's features are not reused by the decoder.
  """

  def __init__(self, *, channels: int = 1, features: int = 48, dim_mults: Sequence[int] = (1, 2, 4),
               convnext_mult: int = 2, heads: int = 4, head_dim: int = 32, rngs: nnx.Rngs):
    if len(dim_mults) < 2:
      raise ValueError(f"dim_mults needs at least two levels, got {tuple(dim_mults)}")
    self.channels = channels
    self.num_downsamples = len(dim_mults) - 1
    init_dim = max(features // 3 * 2, 1)
    widths = [init_dim] + [features * m for m in dim_mults]
    time_dim = 4 * features
    self.input = nnx.Conv(2 * channels, init_dim, (7, 7), padding=3, rngs=rngs)
    self.time_embedding = TimeEmbedding(features, time_dim, rngs=rngs)
    pairs = list(zip(widths[:-1], widths[1:]))
    self.downs = nnx.List([
        PixelDownLevel(d_in, d_out, time_dim, convnext_mult, heads, head_dim, downsample=i < len(pairs) - 1,
                       rngs=rngs)
        for i, (d_in, d_out) in enumerate(pairs)])
    mid = widths[-1]
    self.mid_block1 = ConvNeXtBlock(mid, mid, time_dim, convnext_mult, rngs=rngs)
    self.mid_attention = SpatialAttention(mid, False, heads, head_dim, rngs=rngs)
    self.mid_block2 = ConvNeXtBlock(mid, mid, time_dim, convnext_mult, rngs=rngs)
    self.ups = nnx.List([PixelUpLevel(d_out, d_in, time_dim, convnext_mult, heads, head_dim, rngs=rngs)
                         for d_in, d_out in reversed(pairs[1:])])
    self.final_block = ConvNeXtBlock(widths[1], widths[1], time_dim, convnext_mult, rngs=rngs)
    self.output = nnx.Conv(widths[1], channels, (1, 1), rngs=rngs)

  def __call__(self, x_t: jax.Array, t: jax.Array, cond: jax.Array,
               drop: jax.Array | None = None) -> jax.Array:
    """Predicts the noise in `x_t` `(B, H, W, channels)` at timesteps `t` `(B,)` given exemplar images `cond`."""
    factor = 2**self.num_downsamples
    if (x_t.ndim != 4 or x_t.shape[-1] != self.channels or cond.shape != x_t.shape
        or x_t.shape[1] % factor or x_t.shape[2] % factor):
      raise ValueError(f"x_t {x_t.shape} and cond {cond.shape} must both be (B, H, W, {self.channels}) "
                       f"with H and W divisible by {factor}")
    cond = null_condition(cond, _drop_mask(drop, x_t.shape[0]))
    x = self.input(jnp.concatenate([x_t, cond], axis=-1))
    time_emb = self.time_embedding(t)
    skips = []
    for level in self.downs:
      x = level.attention(level.block2(level.block1(x, time_emb), time_emb))
      skips.append(x)
      if level.down is not None:
        x = level.down(x)
    x = self.mid_block2(self.mid_attention(self.mid_block1(x, time_emb)), time_emb)
    for level in self.ups:
      x = level.block1(jnp.concatenate([x, skips.pop()], axis=-1), time_emb)
      x = level.up(level.attention(level.block2(x, time_emb)))
    return self.output(self.final_block(x, time_emb))
