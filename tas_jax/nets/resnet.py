"""The concrete (pruned) ResNet built from a :class:`~tas_jax.core.shapes.Shape`, as a Flax NNX module.

Construction follows METHOD.md §6.1: only kept blocks are built, each conv gets
exactly its width, a kept block whose input and output widths differ (or that
strides) gets a 1x1 projection shortcut, and the next stage reads the last
kept block's width. Initialisation follows METHOD.md §1.1: convs Kaiming-normal
(fan-out, ReLU gain), batch norm scale 1 and offset 0 (scale 0 on a block's
last batch norm with ``zero_init_residual``), classifier weight N(0, 0.01) and
bias 0. Tensors are channels-last (NHWC).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tas_jax.core import cost as cost_lib
from tas_jax.nets import conv as conv_lib
from tas_jax.core.shapes import Shape

BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1
BN_EPSILON = 1e-5
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nnx.initializers.normal(0.01)


def avg_pool2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 average pool (the official stride-2 shortcut's first half)."""
  b, h, w, c = x.shape
  return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def max_pool3s2(x: jax.Array) -> jax.Array:
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class ConvBN(nnx.Module):
  """Conv (no bias), optional batch norm, optional ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, bn: bool = True, relu: bool = True,
               zero_scale: bool = False, dtype=None, rngs: nnx.Rngs):
    self.kernel, self.stride, self.relu = kernel, stride, relu
    self.conv = nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=conv_lib.padding(kernel), use_bias=False,
                         kernel_init=conv_init, dtype=dtype, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                            scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
                            rngs=rngs) if bn else None

  def __call__(self, x):
    y = self.conv(x)
    if self.bn is not None:
      y = self.bn(y)
    return jax.nn.relu(y) if self.relu else y


class Block(nnx.Module):
  """A residual block of the pruned net: branch convs, projection shortcut when needed, ReLU(add)."""

  def __init__(self, shape: Shape, cin: int, widths: tuple[int, ...], stride: int, *, dtype=None,
               rngs: nnx.Rngs):
    kernels = (3, 3) if shape.block == "basic" else (1, 3, 1)
    strides = (stride, 1) if shape.block == "basic" else (1, stride, 1)
    convs, prev = [], cin
    for i, (w, k, s) in enumerate(zip(widths, kernels, strides)):
      last = i == len(widths) - 1
      convs.append(ConvBN(prev, w, k, s, relu=not last, zero_scale=last and shape.zero_init_residual,
                          dtype=dtype, rngs=rngs))
      prev = w
    self.convs = nnx.List(convs)
    self.pool_shortcut = stride > 1 and shape.shortcut == "avgpool"
    needs_projection = stride > 1 or cin != widths[-1]
    self.shortcut = ConvBN(cin, widths[-1], 1, 1 if self.pool_shortcut else stride, relu=False,
                           bn=cost_lib.shortcut_has_bn(shape, shape.block, stride), dtype=dtype,
                           rngs=rngs) if needs_projection else None

  def __call__(self, x):
    y = x
    for conv in self.convs:
      y = conv(y)
    if self.shortcut is None:
      s = x
    else:
      s = self.shortcut(avg_pool2(x) if self.pool_shortcut else x)
    return jax.nn.relu(y + s)


class ResNet(nnx.Module):
  """The pruned network a shape describes. ``model(x)`` maps NHWC images to logits.

  Example::

    model = ResNet(shapes.preset("tas-c10-resnet20"), rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((8, 32, 32, 3)))
  """

  def __init__(self, shape: Shape, *, dtype=None, rngs: nnx.Rngs):
    self.shape = shape
    lay = shape.layout
    stem = lay.convs[0]
    self.stem = ConvBN(shape.in_channels, shape.widths[0], stem.kernel, stem.stride, dtype=dtype, rngs=rngs)
    blocks = []
    for b in lay.blocks:
      if b.index < shape.blocks[b.stage]:
        cin, ws = shape.block_widths(b.stage, b.index)
        blocks.append(Block(shape, cin, ws, b.stride, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(shape.out_width, shape.num_classes, kernel_init=linear_init,
                           bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)

  def features(self, x):
    x = self.stem(x)
    if self.shape.arch == "imagenet":
      x = max_pool3s2(x)
    for block in self.blocks:
      x = block(x)
    return x.mean(axis=(1, 2))

  def __call__(self, x):
    return self.head(self.features(x)).astype(jnp.float32)


def build(shape: Shape, seed: int = 0, dtype=None) -> ResNet:
  return ResNet(shape, dtype=dtype, rngs=nnx.Rngs(seed))
