"""Channel-wise interpolation and the left-aligned residual add, channels last (METHOD.md §2.3, 2.4).

Feature maps keep a static channel axis C (the nominal, widest width) and
carry their current width as a separate number: channels at or beyond the
width are padding. Widths may be Python ints or traced int32 scalars, so one
compiled function serves every width pair the sampler draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _check_static_widths(channels: int, *widths) -> None:
  for w in widths:
    if isinstance(w, int) and not 1 <= w <= channels:
      raise ValueError(f"widths must lie in [1, {channels}], got {w}")


def _segment_bounds(channels: int, in_width, out_width) -> tuple[Array, Array, Array]:
  """For o in [0, C): lo(o) = floor(o*in/out), hi(o) = ceil((o+1)*in/out), and o < out.

  Exact integer arithmetic: floor(a/b) = a // b and ceil(a/b) = (a + b - 1) // b
  for a >= 0, b >= 1. Entries with o >= out are meaningless and flagged False.
  """
  i = jnp.asarray(in_width, jnp.int32)
  o_w = jnp.asarray(out_width, jnp.int32)
  o = lax.iota(jnp.int32, channels)
  lo = (o * i) // o_w
  hi = ((o + 1) * i + o_w - 1) // o_w
  return lo, hi, o < o_w


def interpolation_matrix(channels: int, in_width, out_width, dtype=jnp.float32) -> Array:
  """Averaging matrix M [C_in=C, C_out=C] with CWI(x)[o] = sum_c x[c] * M[c, o] (METHOD.md §2.3).

  M[c, o] = 1 / (hi(o) - lo(o)) if lo(o) <= c < hi(o) and o < out_width, else 0,
  with lo(o) = floor(o*in/out) and hi(o) = ceil((o+1)*in/out). Since
  hi(o) <= in for o < out, rows c >= in_width are all zero.
  """
  lo, hi, valid = _segment_bounds(channels, in_width, out_width)
  c = lax.iota(jnp.int32, channels)[:, None]
  inside = (c >= lo[None, :]) & (c < hi[None, :]) & valid[None, :]
  count = jnp.maximum(hi - lo, 1).astype(dtype)
  return jnp.where(inside, 1.0 / count[None, :], 0.0).astype(dtype)


def cwi(x: Array, in_width, out_width) -> Array:
  """Channel-wise interpolation, 1-D adaptive average pooling on the last axis (METHOD.md §2.3).

  Reads x[..., :in_width] of x [..., C] and returns [..., C] with

    out[..., o] = mean_{c in [floor(o*in/out), ceil((o+1)*in/out))} x[..., c]   for o < out_width,
    out[..., o] = 0                                                           for o >= out_width.

  Up- and down-sampling are both exact; in == out copies the first in_width
  channels. 1 <= in_width, out_width <= C, as Python ints or traced int32.
  """
  x = jnp.asarray(x)
  channels = x.shape[-1]
  _check_static_widths(channels, in_width, out_width)
  # Padding channels are zeroed first so that a non-finite value there cannot
  # leak into the output through a 0 * inf product of the contraction.
  keep = lax.iota(jnp.int32, channels) < jnp.asarray(in_width, jnp.int32)
  x = jnp.where(keep, x, jnp.zeros((), x.dtype))
  m = interpolation_matrix(channels, in_width, out_width, x.dtype)
  return jnp.einsum("...c,co->...o", x, m, precision=lax.Precision.HIGHEST)


def cwi_up(x: Array, in_width, out_width) -> Array:
  """CWI for in_width <= out_width with two gathers, no [C, C] matrix (METHOD.md §2.3).

  When in <= out each segment [lo(o), hi(o)) holds one or two channels, so

    out[..., o] = 0.5 * (x[..., lo(o)] + x[..., hi(o) - 1])   for o < out_width,

  which is exact also when the segment holds one channel, and 0 beyond.
  Equals ``cwi`` exactly in that regime; for in > out the result is wrong
  (segments are longer than two), and traced widths cannot be checked.
  """
  x = jnp.asarray(x)
  channels = x.shape[-1]
  _check_static_widths(channels, in_width, out_width)
  if isinstance(in_width, int) and isinstance(out_width, int) and in_width > out_width:
    raise ValueError(f"cwi_up needs in_width <= out_width, got {in_width} > {out_width}")
  lo, hi, valid = _segment_bounds(channels, in_width, out_width)
  # Indices of the slots o >= out are clipped into range; `where` drops them.
  last = jnp.clip(hi - 1, 0, channels - 1)
  lo = jnp.clip(lo, 0, channels - 1)
  a = jnp.take(x, lo, axis=-1)
  b = jnp.take(x, last, axis=-1)
  half = jnp.asarray(0.5, x.dtype)
  return jnp.where(valid, half * (a + b), jnp.zeros((), x.dtype))


def left_add(a: Array, b: Array) -> Array:
  """Left-aligned residual add, the official additive_func (METHOD.md §2.4).

  With C = max(C_a, C_b): out[..., :C_a] += a and out[..., :C_b] += b on a
  zero [..., C] tensor, i.e. the narrower tensor is added into the first
  channels of the wider one. Leading axes broadcast.
  """
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  width = max(a.shape[-1], b.shape[-1])

  def pad(t: Array) -> Array:
    extra = width - t.shape[-1]
    if extra == 0:
      return t
    return jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, extra)])

  return pad(a) + pad(b)
