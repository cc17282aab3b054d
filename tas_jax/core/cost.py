"""What a ResNet shape costs, exact integers on device, and TAS's cost loss.

A searchable network's expected cost E and discrete cost F come from its cost
graph (:mod:`tas_jax.nets.cost_graph`).

Counting convention (the official one, METHOD.md §3.1): MACs are the
multiply-accumulates of conv and linear layers only, a conv costing
k*k*C_in*C_out*H_out*W_out and the classifier in*out + out (its bias included);
batch norm, ReLU, pooling and adds are free. FLOPs = 2 * MACs. Parameters are
every trainable parameter of the built network: conv kernels, batch-norm scales
and offsets, classifier weight and bias.

The pruned network follows METHOD.md §6.1: a kept block whose input and output
widths differ gets a 1x1 projection shortcut, and the first block of a stage
reads the output width of the last block kept in the previous stage.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax.core import space as space_lib
from tas_jax.core.shapes import Shape


@dataclasses.dataclass(frozen=True)
class Cost:
  macs: int
  params: int

  @property
  def flops(self) -> int:
    return 2 * self.macs


def shortcut_has_bn(shape_or_arch, block: str, stride: int) -> bool:
  """Whether a projection shortcut carries batch norm (METHOD.md §6.1 table)."""
  arch = shape_or_arch if isinstance(shape_or_arch, str) else shape_or_arch.arch
  if arch == "imagenet":
    return True
  return stride == 1 and block == "basic"


def count(shape: Shape) -> Cost:
  """Exact MACs and parameters of the pruned network ``shape`` describes."""
  lay = shape.layout
  stem = lay.convs[0]
  w0 = shape.widths[0]
  macs = stem.kernel**2 * shape.in_channels * w0 * stem.out_hw**2
  params = stem.kernel**2 * shape.in_channels * w0 + 2 * w0
  for b in lay.blocks:
    if b.index >= shape.blocks[b.stage]:
      continue
    cin, ws = shape.block_widths(b.stage, b.index)
    prev = cin
    for ci, w in zip(b.convs, ws):
      spec = lay.convs[ci]
      macs += spec.kernel**2 * prev * w * spec.out_hw**2
      params += spec.kernel**2 * prev * w + 2 * w
      prev = w
    if b.stride > 1 or cin != ws[-1]:
      macs += cin * ws[-1] * b.out_hw**2
      params += cin * ws[-1] + (2 * ws[-1] if shortcut_has_bn(shape, shape.block, b.stride) else 0)
  c = shape.out_width
  macs += c * shape.num_classes + shape.num_classes
  params += c * shape.num_classes + shape.num_classes
  return Cost(int(macs), int(params))


def macs(shape: Shape) -> int:
  return count(shape).macs


def params(shape: Shape) -> int:
  return count(shape).params


# ----------------------------------------------------------------------------- exact costs on device

def as_float(pair):
  """A discrete cost as an int32 pair ``[high, low]`` (MACs = high * 2**16 + low, exact beyond 2**31) as float32,
  on device (relative error about 1e-7)."""
  return pair[0].astype(jnp.float32) * 65536.0 + pair[1].astype(jnp.float32)


def as_int(pair) -> int:
  """A discrete cost pair as an exact Python integer, on the host."""
  hi, lo = (int(v) for v in np.asarray(pair))
  return hi * 65536 + lo


# ----------------------------------------------------------------------------- the cost loss

BANDS = ("official", "paper")


def cost_band(target, max_cost, band: str = "official", tolerance: float = 0.05):
  """The band [low, high] the discrete cost should lie in (METHOD.md §3.4).

  ``official``: [R - t * MAX, R]; ``paper``: [(1 - t) R, (1 + t) R]; R = target.
  """
  if band == "official":
    return target - tolerance * max_cost, target
  if band == "paper":
    return (1 - tolerance) * target, (1 + tolerance) * target
  raise ValueError(f"unknown cost band {band!r}; expected one of {BANDS}")


def cost_loss(expected, discrete, target, max_cost, band: str = "official", tolerance: float = 0.05,
              weight: float = 2.0):
  """lambda * L_cost of METHOD.md §3.4: +log E above the band, -log E below it, 0 inside.

  The sign comes from the discrete cost F (not differentiable, decided on
  device with ``jnp.where``); the gradient flows through log E. ``discrete``
  is a float MAC count (see :func:`as_float`). Units cancel in the gradient.
  """
  low, high = cost_band(target, max_cost, band, tolerance)
  sign = jnp.where(discrete > high, 1.0, jnp.where(discrete < low, -1.0, 0.0))
  return weight * jax.lax.stop_gradient(sign) * jnp.log(expected)
