"""The jaxpr counter (tas_jax.core.macs) against multiply-accumulates written by hand from the op shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tas_jax.core import macs
from tas_jax.nets import conv as conv_lib

f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)


def test_matmul_and_batched_einsum():
  """Catches a dot counted by output size alone or by input sizes (batch and contraction dims mixed up)."""
  assert macs.count(lambda a, b: a @ b, f32(5, 7), f32(7, 3)) == 5 * 7 * 3
  # attention's Q K^T: b*h*q*k outputs, each a d-long contraction
  assert macs.count(lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k), f32(2, 9, 4, 8), f32(2, 9, 4, 8)) == \
      2 * 4 * 9 * 9 * 8


def test_conv_plain_strided_depthwise():
  """Catches a conv counted without its kernel area, without its input depth, or a depthwise conv counted
  as a dense one (input depth times output depth)."""
  x = f32(1, 8, 8, 6)
  assert macs.count(lambda x, k: conv_lib.conv(x, k, 1), x, f32(3, 3, 6, 10)) == 8 * 8 * 10 * 3 * 3 * 6
  assert macs.count(lambda x, k: conv_lib.conv(x, k, 2), x, f32(3, 3, 6, 10)) == 4 * 4 * 10 * 3 * 3 * 6
  dw = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6)
  assert macs.count(dw, x, f32(3, 3, 1, 6)) == 8 * 8 * 6 * 3 * 3


def test_nested_programs_scan_cond_and_free_ops():
  """Catches sub-programs skipped (jit, custom_vjp), a scan body counted once instead of once per step, both
  branches of a cond summed, and elementwise ops or reductions counted."""
  inner = jax.jit(lambda a, b: a @ b)
  assert macs.count(lambda a, b: inner(a, b) + 1.0, f32(2, 3), f32(3, 4)) == 24
  assert macs.count(lambda x, k: conv_lib.conv_same(x, k), f32(1, 4, 4, 2), f32(3, 3, 2, 2)) == 16 * 2 * 9 * 2

  def scanned(x, w):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]
  assert macs.count(scanned, f32(2, 3), f32(3, 3)) == 5 * 2 * 3 * 3

  def branchy(p, a, b):
    return jax.lax.cond(p, lambda: a @ b, lambda: a[:, :2] @ b[:2])
  assert macs.count(branchy, True, f32(2, 3), f32(3, 4)) == 24  # the dearer branch (2*3*4), not both (24 + 16)
  assert macs.count(lambda x: jax.nn.softmax(x).sum() * jnp.exp(x).mean(), f32(10, 10)) == 0


def test_while_loop_is_refused():
  """Catches a loop without a static trip count silently counted as zero or once."""
  with pytest.raises(macs.CountError, match="while loop"):
    macs.count(lambda x: jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c @ c, x), f32(2, 2))


@pytest.mark.parametrize("stride, size", [(1, 7), (2, 7)])
def test_depthwise_conv_equals_the_convolution_and_counts_as_one(stride, size):
  """Catches the CPU's shifted-product depthwise conv computing something else than the grouped convolution
  (a tap misaligned, a stride or odd size cropped wrongly, a wrong gradient), or being counted as free."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, 5))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=5)
  fast = lambda x, k: conv_lib.depthwise(x, k, stride)
  np.testing.assert_allclose(fast(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
  g_ref = jax.grad(lambda x, k: (ref(x, k) ** 2).sum(), argnums=(0, 1))(x, k)
  g_fast = jax.grad(lambda x, k: (fast(x, k) ** 2).sum(), argnums=(0, 1))(x, k)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert macs.count(fast, x, k) == macs.count(ref, x, k) == math.prod(ref(x, k).shape) * 9
