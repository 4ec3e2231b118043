"""The dilation-free stride-2 convolutions and the single-channel convolution equal Flax's strided, transposed
and plain convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxldm.strided_conv import DIMENSIONS, DownConv, SingleChannelConv, UpConv, single_channel_conv, up_conv


@pytest.mark.parametrize("size,padding", [(48, 1), (24, 1), (12, 2), (7, 1)])
def test_down_conv_equals_strided_conv(size, padding):
  reference = nnx.Conv(3, 5, (4, 4), strides=2, padding=((padding, padding),) * 2, use_bias=False,
                       rngs=nnx.Rngs(0))
  ours = DownConv(3, 5, padding, rngs=nnx.Rngs(1))
  ours.kernel[...] = reference.kernel[...]
  x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
  np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5, atol=1e-5)
  grad = lambda model: jax.grad(lambda x: jnp.sum(jnp.sin(model(x))))(x)
  np.testing.assert_allclose(grad(ours), grad(reference), rtol=1e-5, atol=1e-5)
  kernel_grad = lambda model: nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model).kernel[...]
  np.testing.assert_allclose(kernel_grad(ours), kernel_grad(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [3, 6, 12])
def test_up_conv_equals_transposed_conv(size):
  reference = nnx.ConvTranspose(4, 3, (4, 4), strides=2, padding=((2, 2), (2, 2)), use_bias=False,
                                rngs=nnx.Rngs(0))
  ours = UpConv(4, 3, rngs=nnx.Rngs(1))
  ours.kernel[...] = reference.kernel[...]
  x = jax.random.normal(jax.random.key(2), (2, size, size, 4))
  assert ours(x).shape == (2, 2 * size, 2 * size, 3)
  np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5, atol=1e-5)
  grad = lambda model: jax.grad(lambda x: jnp.sum(jnp.sin(model(x))))(x)
  np.testing.assert_allclose(grad(ours), grad(reference), rtol=1e-5, atol=1e-5)
  kernel_grad = lambda fn: jax.grad(lambda k: jnp.sum(jnp.sin(fn(k))))(reference.kernel[...])
  flax_like = lambda k: jax.lax.conv_transpose(x, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=DIMENSIONS)
  np.testing.assert_allclose(kernel_grad(lambda k: up_conv(x, k)), kernel_grad(flax_like), rtol=1e-4, atol=1e-4)


def test_single_channel_conv_equals_conv():
  reference = nnx.Conv(4, 1, (4, 4), padding=((1, 2), (1, 2)), rngs=nnx.Rngs(0))
  reference.bias[...] = jnp.array([0.3])
  ours = SingleChannelConv(4, (1, 2), rngs=nnx.Rngs(1))
  ours.kernel[...] = reference.kernel[...]
  ours.bias[...] = reference.bias[...]
  x = jax.random.normal(jax.random.key(2), (2, 10, 9, 4))
  assert ours(x).shape == (2, 10, 9, 1)
  np.testing.assert_allclose(ours(x), reference(x), rtol=1e-5, atol=1e-5)
  grad = lambda model: jax.grad(lambda x: jnp.sum(jnp.sin(model(x))))(x)
  np.testing.assert_allclose(grad(ours), grad(reference), rtol=1e-5, atol=1e-5)
  kernel_grad = lambda conv: jax.grad(lambda k: jnp.sum(jnp.sin(conv(k))))(reference.kernel[...])
  plain_conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 2), (1, 2)), dimension_numbers=DIMENSIONS)
  np.testing.assert_allclose(kernel_grad(lambda k: single_channel_conv(x, k, (1, 2))), kernel_grad(plain_conv),
                             rtol=1e-4, atol=1e-4)
