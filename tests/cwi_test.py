"""Channel-wise interpolation and left-aligned add (METHOD.md §2.3, 2.4) against NumPy references."""

from __future__ import annotations

import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from tas_jax.core import cwi as cwi_lib


def ref_sources(in_width: int, out_width: int) -> list[range]:
  """Source channels of each output: [floor(o*in/out), ceil((o+1)*in/out)), in rationals."""
  return [
      range(math.floor(Fraction(o * in_width, out_width)), math.ceil(Fraction((o + 1) * in_width, out_width)))
      for o in range(out_width)
  ]


def ref_cwi(x: np.ndarray, in_width: int, out_width: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  out = np.zeros(x.shape[:-1] + (out_width,))
  for o, src in enumerate(ref_sources(in_width, out_width)):
    out[..., o] = x[..., list(src)].mean(-1)
  return out


def ref_left_add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  width = max(a.shape[-1], b.shape[-1])
  lead = np.broadcast_shapes(a.shape[:-1], b.shape[:-1])
  out = np.zeros(lead + (width,))
  out[..., :a.shape[-1]] += a
  out[..., :b.shape[-1]] += b
  return out


def with_garbage(x: np.ndarray, in_width: int, rng) -> np.ndarray:
  """x with large, non-finite and random values in the channels at or beyond in_width."""
  x = x.copy()
  pad = x[..., in_width:]
  pool = np.array([np.nan, np.inf, -np.inf, 1e30, 7.0], x.dtype)
  pad[...] = pool[rng.integers(0, len(pool), pad.shape)]
  return x


class CwiTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((8, 4, 6, (3,)), (16, 16, 5, (2, 3)), (7, 3, 7, ()), (12, 11, 12, (2, 2, 2)))
  def test_static_widths_match_reference(self, channels, in_width, out_width, lead):
    rng = np.random.default_rng(channels * in_width + out_width)
    x = rng.normal(size=lead + (channels,)).astype(np.float32)
    got = self.variant(lambda t: cwi_lib.cwi(t, in_width, out_width))(with_garbage(x, in_width, rng))
    chex.assert_shape(got, x.shape)
    want = np.zeros(x.shape)
    want[..., :out_width] = ref_cwi(x[..., :in_width], in_width, out_width)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_spec_example_4_to_6(self):
    # Applying CWI to the channel basis reads off its matrix: row c, column o.
    m = np.asarray(cwi_lib.cwi(jnp.eye(8), 4, 6))
    sources = [set(np.flatnonzero(m[:, o])) for o in range(6)]
    self.assertEqual(sources, [{0}, {0, 1}, {1}, {2}, {2, 3}, {3}])
    self.assertTrue((m[:, 6:] == 0).all())
    np.testing.assert_array_equal(m[:, 1][[0, 1]], [0.5, 0.5])
    self.assertEqual([set(r) for r in ref_sources(4, 6)], sources)

  def test_traced_widths_one_compilation(self):
    channels = 10
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, channels)).astype(np.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def both(t, i, o):
      return cwi_lib.cwi(t, i, o), cwi_lib.cwi_up(t, i, jnp.maximum(i, o))

    for i in range(1, channels + 1):
      xi = with_garbage(x, i, rng)
      for o in range(1, channels + 1):
        got, up = both(xi, jnp.int32(i), jnp.int32(o))
        want = np.zeros(x.shape)
        want[..., :o] = ref_cwi(x[..., :i], i, o)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"in={i} out={o}")
        want_up = np.zeros(x.shape)
        want_up[..., :max(i, o)] = ref_cwi(x[..., :i], i, max(i, o))
        np.testing.assert_allclose(up, want_up, rtol=1e-6, atol=1e-6, err_msg=f"up in={i} out={max(i, o)}")

  @chex.variants(with_jit=True, without_jit=True)
  def test_cwi_up_equals_cwi_exactly(self):
    channels = 9
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(4, channels)) * 10).astype(np.float32)
    f = self.variant(lambda t, i, o: (cwi_lib.cwi(t, i, o), cwi_lib.cwi_up(t, i, o)))
    for i in range(1, channels + 1):
      for o in range(i, channels + 1):
        full, up = f(x, jnp.int32(i), jnp.int32(o))
        np.testing.assert_array_equal(up, full, err_msg=f"in={i} out={o}")

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_per_example_widths(self):
    channels = 6
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 4, channels)).astype(np.float32)
    ins = np.array([1, 6, 3, 4, 2], np.int32)
    outs = np.array([6, 2, 3, 5, 2], np.int32)
    got = self.variant(jax.vmap(cwi_lib.cwi))(x, ins, outs)
    for b in range(5):
      want = np.zeros((4, channels))
      want[:, :outs[b]] = ref_cwi(x[b, :, :ins[b]], int(ins[b]), int(outs[b]))
      np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_is_transposed_average(self):
    channels, i, o = 7, 5, 3
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, channels)).astype(np.float32)
    c = rng.normal(size=(2, channels)).astype(np.float32)
    grad = self.variant(jax.grad(lambda t: jnp.sum(c * cwi_lib.cwi(t, i, o))))(x)
    want = np.zeros(x.shape)
    for out_ch, src in enumerate(ref_sources(i, o)):
      for s in src:
        want[:, s] += c[:, out_ch] / len(src)
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)

  def test_static_width_checks(self):
    x = jnp.zeros((2, 4))
    for i, o in ((0, 2), (5, 2), (2, 0), (2, 5)):
      with self.assertRaises(ValueError):
        cwi_lib.cwi(x, i, o)
    with self.assertRaises(ValueError):
      cwi_lib.cwi_up(x, 3, 2)


class LeftAddTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((2, 3), 5, 8), ((4,), 6, 6), ((3, 1), 9, 2), ((), 1, 4))
  def test_matches_reference(self, lead, ca, cb):
    rng = np.random.default_rng(ca * 10 + cb)
    a = rng.normal(size=lead + (ca,)).astype(np.float32)
    b = rng.normal(size=lead + (cb,)).astype(np.float32)
    got = self.variant(cwi_lib.left_add)(a, b)
    chex.assert_shape(got, lead + (max(ca, cb),))
    np.testing.assert_allclose(got, ref_left_add(a, b), rtol=1e-6)
    np.testing.assert_allclose(self.variant(cwi_lib.left_add)(b, a), ref_left_add(a, b), rtol=1e-6)

  def test_broadcasts_leading_axes(self):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 1, 4)).astype(np.float32)
    b = rng.normal(size=(1, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(cwi_lib.left_add(a, b), ref_left_add(a, b), rtol=1e-6)

