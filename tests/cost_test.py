import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

from tas_jax.core import cost
from tas_jax.core import shape_files
from tas_jax.nets import supernet


def _random_indices(space, rng):
  wi = np.array([rng.choice(np.flatnonzero(m)) for m in space.width_mask], np.int32)
  di = np.array([rng.choice(np.flatnonzero(m)) for m in space.depth_mask], np.int32)
  return wi, di


def _random_probs(space, rng):
  w = rng.dirichlet(np.ones(space.width_table.shape[1]), size=space.width_table.shape[0]) * space.width_mask
  d = rng.dirichlet(np.ones(space.depth_table.shape[1]), size=space.depth_table.shape[0]) * space.depth_mask
  return (w / w.sum(1, keepdims=True)).astype(np.float32), (d / d.sum(1, keepdims=True)).astype(np.float32)


def numpy_expected_cost(space, wp, dp, exact):
  """METHOD.md §3.2 written out with loops, in float64 (exact=True adds the projection and depth mixing)."""
  lay, base = space.layout, space.base
  c = space.width_table.astype(np.float64)
  e = (wp * c).sum(1)
  total = lay.convs[0].kernel ** 2 * lay.convs[0].out_hw ** 2 * base.in_channels * e[0]
  in_e, in_p = e[0], wp[0]
  for s in range(len(base.layers)):
    choices = list(space.depth_table[s][space.depth_mask[s]])
    ends = []
    for b in lay.stage_blocks(s):
      keep = 1.0 if b.index == 0 else sum(dp[s][k] for k, d in enumerate(choices) if d >= b.index + 1)
      t, prev = 0.0, in_e
      for ci in b.convs:
        t += lay.convs[ci].kernel ** 2 * lay.convs[ci].out_hw ** 2 * prev * e[ci]
        prev = e[ci]
      last = b.convs[-1]
      if b.stride > 1 or b.nominal_in != b.nominal_out:
        t += b.out_hw ** 2 * in_e * e[last]
      elif exact:
        t += b.out_hw ** 2 * sum(in_p[i] * wp[last][j] * c[last][i] * c[last][j]
                                 for i in range(c.shape[1]) for j in range(c.shape[1]) if c[last][i] != c[last][j])
      total += keep * t
      in_e, in_p = e[last], wp[last]
      if b.index + 1 in choices:
        ends.append(last)
    if exact and len(ends) > 1:
      in_e = sum(dp[s][k] * e[l] for k, l in enumerate(ends))
      in_p = sum(dp[s][k] * wp[l] for k, l in enumerate(ends))
  return total + in_e * base.num_classes + (base.num_classes if exact else 0)


@functools.lru_cache(maxsize=None)
def _model(name, exact=True):
  """A supernet of the preset's space, built abstractly: its costs read no variable."""
  config = supernet.SupernetConfig(exact_cost=exact)
  return nnx.eval_shape(lambda: supernet.Supernet(shape_files.preset(name), config, rngs=nnx.Rngs(0)))


class CostTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("resnet20", "resnet56", "resnet164", "imagenet-resnet50")
  def test_one_hot_costs_equal_the_counter(self, name):
    model = _model(name)
    space = model.space
    rng = np.random.default_rng(0)
    disc = self.variant(model.discrete_cost)
    expc = self.variant(model.expected_cost)
    for _ in range(4):
      wi, di = _random_indices(space, rng)
      macs = cost.count(space.shape_from_indices(wi, di)).macs
      assert cost.as_int(disc(wi, di)) == macs
      wp = jax.nn.one_hot(wi, space.width_table.shape[1])
      dp = jax.nn.one_hot(di, space.depth_table.shape[1])
      np.testing.assert_allclose(float(expc(wp, dp)), macs, rtol=1e-6)

  @parameterized.parameters(True, False)
  def test_expected_cost_against_numpy(self, exact):
    rng = np.random.default_rng(1)
    for name in ("resnet20", "resnet56"):
      model = _model(name, exact)
      space = model.space
      wp, dp = _random_probs(space, rng)
      got = float(jax.jit(model.expected_cost)(wp, dp))
      np.testing.assert_allclose(got, numpy_expected_cost(space, wp.astype(np.float64), dp.astype(np.float64), exact),
                                 rtol=1e-5)

  def test_expected_cost_gradient(self):
    model = _model("resnet20")
    space = model.space
    rng = np.random.default_rng(2)
    a = rng.normal(size=space.width_table.shape).astype(np.float32)
    b = rng.normal(size=space.depth_table.shape).astype(np.float32)
    f = lambda a, b: model.expected_cost(jax.nn.softmax(a), jax.nn.softmax(b)) / 1e6
    ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
    ref = lambda a, b: numpy_expected_cost(space, _softmax(a), _softmax(b), True) / 1e6
    h = 1e-3
    for (i, j) in [(0, 0), (5, 3), (18, 7)]:
      d = np.zeros_like(a, np.float64); d[i, j] = h
      fd = (ref(a + d, b) - ref(a - d, b)) / (2 * h)
      np.testing.assert_allclose(ga[i, j], fd, rtol=2e-2, atol=1e-4)
    for (i, j) in [(0, 1), (2, 2)]:
      d = np.zeros_like(b, np.float64); d[i, j] = h
      fd = (ref(a, b + d) - ref(a, b - d)) / (2 * h)
      np.testing.assert_allclose(gb[i, j], fd, rtol=2e-2, atol=1e-4)

  def test_official_formula_misses_truncation_and_projection(self):
    space = _model("resnet20").space
    base = space.base
    # Stage 0 keeps one block whose output width differs from the dropped last block's.
    widths = list(base.widths)
    widths[2], widths[6] = 8, 16
    shape = base.replace(widths=tuple(widths), blocks=(1, 3, 3))
    wi, di = space.indices_of(shape)
    exact = cost.as_int(_model("resnet20", True).discrete_cost(wi, di))
    official = cost.as_int(_model("resnet20", False).discrete_cost(wi, di))
    assert exact == cost.count(shape).macs
    # Official F feeds stage 1 the dropped block's 16 channels instead of 8, and leaves out the bias.
    stage1 = base.layout.stage_blocks(1)[0]
    extra = (16 - 8) * (9 * shape.widths[stage1.convs[0]] + shape.widths[stage1.convs[-1]]) * stage1.out_hw ** 2
    assert official - exact == extra - base.num_classes


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("band", cost.BANDS)
def test_cost_loss_bands(band):
  max_cost, target, t = 100.0, 50.0, 0.05
  low, high = (target - t * max_cost, target) if band == "official" else ((1 - t) * target, (1 + t) * target)
  for f in [low - 1, low + 0.1, high - 0.1, high + 1]:
    e = jnp.float32(40.0)
    loss = cost.cost_loss(e, jnp.float32(f), target, max_cost, band=band, tolerance=t, weight=2.0)
    sign = 1.0 if f > high else (-1.0 if f < low else 0.0)
    np.testing.assert_allclose(float(loss), 2.0 * sign * np.log(40.0), rtol=1e-6)
    g = jax.grad(lambda e: cost.cost_loss(e, jnp.float32(f), target, max_cost, band=band))(e)
    np.testing.assert_allclose(float(g), 2.0 * sign / 40.0, rtol=1e-6)
  with pytest.raises(ValueError, match="band"):
    cost.cost_band(1.0, 1.0, band="wide")
