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


def padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding ``kernel // 2``, as PyTorch pads; "SAME" would pad stride-2 convs asymmetrically."""
  p = kernel // 2
  return ((p, p), (p, p))


def _conv(x, kernel, stride: int = 1):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding(kernel.shape[0]),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv(x, kernel, stride: int):
  """NHWC x HWIO conv with :func:`padding`; stride 1 through :func:`conv_same`."""
  return conv_same(x, kernel) if stride == 1 else _conv(x, kernel, stride)


@jax.custom_vjp
def conv_same(x, kernel):
  """A stride-1 conv with same padding (odd kernel), NHWC x HWIO, whose gradients are forward convolutions."""
  return _conv(x, kernel)


def _fwd(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _bwd(res, dy):
  x, kernel = res
  dx = _conv(dy, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  # dW[i, j, c, o] = sum_{b,h,w} x[b, h+i-p, w+j-p, c] dy[b, h, w, o]: a conv with the channels of x as the
  # batch, its batch as the features, and dy as the kernel; dy has x's spatial size, so padding x by
  # padding(kernel) gives the kernel's spatial size back.
  dw = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                    padding(kernel.shape[0]), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return dx, dw.transpose(1, 2, 0, 3).astype(kernel.dtype)  # [Ci, kh, kw, Co] -> HWIO


conv_same.defvjp(_fwd, _bwd)


def depthwise(x, kernel, stride: int = 1, pad: int | None = None):
  """A depthwise conv, NHWC x [kh, kw, 1, C], each channel filtered on its own; ``pad`` per side (kh // 2).

  XLA:CPU runs grouped convolutions some 30 times slower than the same
  multiply-adds written as a sum of shifted products, so on the CPU it is
  that sum; elsewhere the convolution. ``platform_dependent`` keeps both in
  the traced program, which the MAC counter reads as the convolution.
  """
  kh, kw = kernel.shape[:2]
  pad = kh // 2 if pad is None else pad

  def as_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])

  def as_shifts(x, kernel):
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho = (x.shape[1] + 2 * pad - kh) // stride + 1
    wo = (x.shape[2] + 2 * pad - kw) // stride + 1
    return sum(xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] * kernel[i, j, 0]
               for i in range(kh) for j in range(kw))

  return jax.lax.platform_dependent(x, kernel, cpu=as_shifts, default=as_conv)
