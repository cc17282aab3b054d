"""A convolution that stays fast inside ``lax.scan`` on XLA:CPU.

XLA:CPU runs its native gradient convolutions some 40 times slower inside a
loop body than unrolled, and forward convolutions at full speed. The
searchable network scans the identical blocks of a stage, so its stride-1
convs use :func:`conv_same`, whose gradients are written as forward
convolutions: the same numbers as autodiff, as fast unrolled, and fast in a
scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _conv(x, kernel, padding, stride: int = 1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv(x, kernel, stride: int):
  """NHWC x HWIO conv with symmetric padding k // 2, as PyTorch pads; stride 1 through :func:`conv_same`."""
  if stride == 1:
    return conv_same(x, kernel)
  p = kernel.shape[0] // 2
  return _conv(x, kernel, ((p, p), (p, p)), stride)


@jax.custom_vjp
def conv_same(x, kernel):
  """A stride-1 conv with same padding (odd kernel), NHWC x HWIO, whose gradients are forward convolutions."""
  p = kernel.shape[0] // 2
  return _conv(x, kernel, ((p, p), (p, p)))


def _fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _bwd(res, dy):
  x, kernel = res
  p = kernel.shape[0] // 2
  dx = _conv(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), ((p, p), (p, p)))
  # dW[i, j, c, o] = sum_{b,h,w} x[b, h+i-p, w+j-p, c] dy[b, h, w, o]: a conv with the channels of x as the
  # batch, its batch as the features, and dy as the kernel.
  dw = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), ((p, p), (p, p)))  # [Ci, kh, kw, Co]
  return dx, dw.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv_same.defvjp(_fwd, _bwd)
