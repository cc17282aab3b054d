"""Gumbel sampling (METHOD.md §2.1) against NumPy references written from the formulas."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from scipy import stats



from tas_jax.core import sampling
def np_softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
  s = x - x.max(-1, keepdims=True)
  return s - np.log(np.exp(s).sum(-1, keepdims=True))


def ref_gumbel_softmax(logits, g, tau, mask=None) -> np.ndarray:
  """p̂ = softmax((log_softmax(a) + g) / tau), both softmaxes over the valid entries only."""
  logits = np.asarray(logits, np.float64)
  g = np.asarray(g, np.float64)
  n = logits.shape[-1]
  mask = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(mask, logits.shape)
  out = np.zeros(logits.shape)
  flat_l, flat_g, flat_m, flat_o = (a.reshape(-1, n) for a in (logits, g, mask, out))
  for r in range(flat_l.shape[0]):
    v = flat_m[r]
    flat_o[r, v] = np_softmax((np_log_softmax(flat_l[r, v]) + flat_g[r, v]) / tau)
  return flat_o.reshape(logits.shape)


def ref_sample_widths(logits, g1, g2, tau, k, mask=None, eps=0.0):
  """k largest of log(p̂ + eps) + g2 over valid entries; weights p̂[I] / sum(p̂[I])."""
  p = ref_gumbel_softmax(logits, g1, tau, mask)
  n = p.shape[-1]
  mask = np.ones(p.shape, bool) if mask is None else np.broadcast_to(mask, p.shape)
  with np.errstate(divide="ignore"):
    score = np.where(mask, np.log(p + eps) + np.asarray(g2, np.float64), -np.inf)
  flat_s, flat_p = score.reshape(-1, n), p.reshape(-1, n)
  idx = np.stack([np.argsort(-s, kind="stable")[:k] for s in flat_s])
  sel = np.take_along_axis(flat_p, idx, -1)
  w = sel / sel.sum(-1, keepdims=True)
  return idx.reshape(p.shape[:-1] + (k,)), w.reshape(p.shape[:-1] + (k,))


def noises(key, shape):
  k_soft, k_pick = jax.random.split(key)
  return np.asarray(sampling.gumbel_noise(k_soft, shape)), np.asarray(sampling.gumbel_noise(k_pick, shape))


def random_mask(rng, shape, min_valid):
  """Random boolean mask with at least ``min_valid`` True entries per row."""
  n = shape[-1]
  mask = rng.random(shape) < 0.6
  flat = mask.reshape(-1, n)
  for row in flat:
    if row.sum() < min_valid:
      row[rng.choice(n, min_valid, replace=False)] = True
  return flat.reshape(shape)


def central_difference(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
  grad = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[i] += h
    down[i] -= h
    grad[i] = (f(up) - f(down)) / (2 * h)
  return grad


class GumbelNoiseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_shape_dtype_finite(self, dtype):
    g = self.variant(functools.partial(sampling.gumbel_noise, shape=(7, 3, 5), dtype=dtype))(jax.random.PRNGKey(3))
    chex.assert_shape(g, (7, 3, 5))
    chex.assert_type(g, dtype)
    chex.assert_tree_all_finite(g)

  def test_distribution_is_standard_gumbel(self):
    n = 200_000
    g = np.asarray(sampling.gumbel_noise(jax.random.PRNGKey(11), (n,)), np.float64)
    self.assertTrue(np.isfinite(g).all())
    sd = np.pi / np.sqrt(6.0)
    self.assertLess(abs(g.mean() - np.euler_gamma), 5 * sd / np.sqrt(n))
    self.assertLess(abs(g.std() - sd), 0.02)
    self.assertGreater(stats.kstest(g, stats.gumbel_r.cdf).pvalue, 1e-3)

  def test_keys_matter(self):
    a = sampling.gumbel_noise(jax.random.PRNGKey(0), (16,))
    b = sampling.gumbel_noise(jax.random.PRNGKey(1), (16,))
    np.testing.assert_array_equal(a, sampling.gumbel_noise(jax.random.PRNGKey(0), (16,)))
    self.assertFalse(np.allclose(a, b))


class GumbelSoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((3, 2, 5), 0.3, -1, True), ((6, 3), 5.0, 0, False), ((2, 9), 0.1, -1, True))
  def test_matches_reference(self, shape, tau, axis, masked):
    rng = np.random.default_rng(sum(shape))
    logits = rng.normal(size=shape).astype(np.float32) * 2
    key = jax.random.PRNGKey(len(shape))
    mask = random_mask(rng, shape, 1) if masked else None
    p = self.variant(functools.partial(sampling.gumbel_softmax, axis=axis))(key, logits, jnp.float32(tau), mask)
    g = np.asarray(sampling.gumbel_noise(key, shape))
    move = lambda a: None if a is None else np.moveaxis(a, axis, -1)
    want = np.moveaxis(ref_gumbel_softmax(move(logits), move(g), tau, move(mask)), -1, axis)
    np.testing.assert_allclose(p, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p).sum(axis), 1.0, rtol=1e-5)
    if masked:
      self.assertTrue((np.asarray(p)[~mask] == 0).all())

  def test_sample_depth_is_the_soft_vector(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5)).astype(np.float32)
    key = jax.random.PRNGKey(5)
    q = sampling.sample_depth(key, logits, 0.7)
    g = np.asarray(sampling.gumbel_noise(key, logits.shape))
    np.testing.assert_allclose(q, ref_gumbel_softmax(logits, g, 0.7), rtol=2e-5, atol=1e-6)
    self.assertTrue((np.asarray(q) > 0).all())

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_matches_finite_differences_and_is_nan_free(self):
    rng = np.random.default_rng(7)
    shape, tau = (3, 6), 0.6
    logits = rng.normal(size=shape).astype(np.float32)
    mask = random_mask(rng, shape, 2)
    mask[0] = True
    # Garbage in masked slots must neither leak into values nor gradients.
    garbage = np.array([np.inf, -np.inf, np.nan, 1e30, -1e30, 3.0], np.float32)
    logits = np.where(mask, logits, garbage[rng.integers(0, 6, shape)]).astype(np.float32)
    c = rng.normal(size=shape).astype(np.float32)
    key = jax.random.PRNGKey(9)
    g = np.asarray(sampling.gumbel_noise(key, shape))

    def loss(a):
      return jnp.sum(c * sampling.gumbel_softmax(key, a, tau, mask))

    value, grad = self.variant(jax.value_and_grad(loss))(jnp.asarray(logits))
    chex.assert_tree_all_finite((value, grad))
    self.assertTrue((np.asarray(grad)[~mask] == 0).all())
    clean = np.where(mask, logits, 0.0).astype(np.float64)
    f = lambda a: float(np.sum(c * ref_gumbel_softmax(a, g, tau, mask)))
    fd = np.where(mask, central_difference(f, clean), 0.0)
    np.testing.assert_allclose(value, f(clean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)


class SampleWidthsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(((2, 3, 8), 2, 0.4, True, 0.0), ((7, 5), 1, 5.0, False, 1e-7), ((4, 6), 3, 0.1, True, 1e-7))
  def test_matches_reference(self, shape, k, tau, masked, eps):
    rng = np.random.default_rng(k * 100 + shape[-1])
    logits = (rng.normal(size=shape) * 1.5).astype(np.float32)
    mask = random_mask(rng, shape, k) if masked else None
    key = jax.random.PRNGKey(shape[0])
    fn = self.variant(functools.partial(sampling.sample_widths, k=k, eps=eps))
    idx, w = fn(key, logits, jnp.float32(tau), mask=mask)
    chex.assert_shape((idx, w), shape[:-1] + (k,))
    chex.assert_type(idx, jnp.int32)
    g1, g2 = noises(key, shape)
    want_idx, want_w = ref_sample_widths(logits, g1, g2, tau, k, mask, eps)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(w, want_w, rtol=2e-5, atol=1e-6)

  def test_distinct_and_never_masked(self):
    rng = np.random.default_rng(1)
    rows, n = 64, 8
    logits = (rng.normal(size=(rows, n)) * 3).astype(np.float32)
    for k in (2, 3):
      mask = random_mask(rng, (rows, n), k)
      keys = jax.random.split(jax.random.PRNGKey(k), 100)
      draw = jax.jit(jax.vmap(lambda key, a, m, k=k: sampling.sample_widths(key, a, 0.5, k=k, mask=m),
                              in_axes=(0, None, None)))
      idx, w = (np.asarray(a) for a in draw(keys, logits, mask))
      srt = np.sort(idx, -1)
      self.assertTrue((np.diff(srt, axis=-1) > 0).all())
      self.assertTrue(np.take_along_axis(np.broadcast_to(mask, idx.shape[:-1] + (n,)), idx, -1).all())
      np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)

  def test_rows_with_fewer_valid_than_k(self):
    n = 6
    logits = np.random.default_rng(2).normal(size=(3, n)).astype(np.float32)
    mask = np.zeros((3, n), bool)
    mask[0, 4] = True
    mask[1, [1, 5]] = True
    mask[2, 2] = True
    for seed in range(5):
      idx, w = sampling.sample_widths(jax.random.PRNGKey(seed), logits, 0.3, k=3, mask=mask)
      idx, w = np.asarray(idx), np.asarray(w)
      self.assertEqual(idx[0, 0], 4)
      self.assertEqual(set(idx[1, :2]), {1, 5})
      self.assertEqual(idx[2, 0], 2)
      self.assertTrue((w[0, 1:] == 0).all() and w[0, 0] == 1.0)
      self.assertTrue(w[1, 2] == 0 and abs(w[1, :2].sum() - 1) < 1e-6)
      self.assertTrue((w[2, 1:] == 0).all() and w[2, 0] == 1.0)
      self.assertEqual(len(set(idx[0])), 3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_weight_gradient_matches_finite_differences(self):
    rng = np.random.default_rng(4)
    shape, tau, k = (4, 7), 0.8, 2
    logits = rng.normal(size=shape).astype(np.float32)
    mask = random_mask(rng, shape, 1)
    mask[0] = True
    mask[1] = False
    mask[1, 3] = True  # one valid candidate: the extra pick weighs 0
    logits = np.where(mask, logits, np.float32(np.nan))
    c = rng.normal(size=shape[:-1] + (k,)).astype(np.float32)
    key = jax.random.PRNGKey(21)
    g1, g2 = noises(key, shape)

    def loss(a):
      return jnp.sum(c * sampling.sample_widths(key, a, tau, k=k, mask=mask)[1])

    value, grad = self.variant(jax.value_and_grad(loss))(jnp.asarray(logits))
    chex.assert_tree_all_finite((value, grad))
    self.assertTrue((np.asarray(grad)[~mask] == 0).all())
    clean = np.where(mask, logits, 0.0).astype(np.float64)
    idx, _ = ref_sample_widths(clean, g1, g2, tau, k, mask, 1e-7)

    def f(a):
      p = ref_gumbel_softmax(a, g1, tau, mask)
      sel = np.take_along_axis(p, idx, -1)
      return float(np.sum(c * sel / sel.sum(-1, keepdims=True)))

    np.testing.assert_allclose(value, f(clean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, np.where(mask, central_difference(f, clean), 0.0), rtol=1e-3, atol=1e-5)
    self.assertGreater(np.abs(np.asarray(grad)[0]).sum(), 0)

  def test_vmap_over_layers_matches_rowwise_calls(self):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(5, 8)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(6), 5)
    idx, w = jax.vmap(sampling.sample_widths, in_axes=(0, 0, None))(keys, logits, 1.3)
    one = jax.jit(sampling.sample_widths)
    for r in range(5):
      i_r, w_r = one(keys[r], logits[r], 1.3)
      np.testing.assert_array_equal(idx[r], i_r)
      np.testing.assert_allclose(w[r], w_r, rtol=1e-6)

  def test_rejects_bad_k(self):
    with self.assertRaises(ValueError):
      sampling.sample_widths(jax.random.PRNGKey(0), jnp.zeros((3, 4)), 1.0, k=5)


class SamplerLawTest(chex.TestCase):
  """The pair drawn follows the official law: two multinomial draws without replacement from p̂.

  Given p̂, P(I1 = a, I2 = b | p̂) = p̂_a p̂_b / (1 - p̂_a), so unconditionally
  P(I1 = a) = E[p̂_a] and P(I1 = a, I2 = b) = E[p̂_a p̂_b / (1 - p̂_a)], the
  expectations over the first Gumbel noise. Those are estimated here by a
  NumPy Monte Carlo with many more samples than the sampler under test.
  Neither equals the plain softmax(logits) law, which the test must reject.
  """

  def _expected(self, logits, tau, m):
    rng = np.random.default_rng(123)
    n = logits.shape[0]
    first = np.zeros(n)
    pair = np.zeros((n, n))
    chunk = 100_000
    for _ in range(m // chunk):
      g = rng.gumbel(size=(chunk, n))
      p = np_softmax((np_log_softmax(logits.astype(np.float64)) + g) / tau)
      first += p.sum(0)
      for a in range(n):
        ratio = p * (p[:, a:a + 1] / (1.0 - p[:, a:a + 1]))
        ratio[:, a] = 0.0
        pair[a] += ratio.sum(0)
    return first / m, pair / m

  def test_first_and_pair_frequencies(self):
    logits = np.array([1.6, 0.9, 0.2, -0.3, -1.0, -2.2], np.float32)
    tau, n_draws, m = 2.0, 100_000, 1_000_000
    n = logits.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(2024), n_draws)
    draw = jax.jit(jax.vmap(functools.partial(sampling.sample_widths, eps=0.0), in_axes=(0, None, None)))
    idx = np.asarray(draw(keys, logits, tau)[0])
    self.assertTrue((idx[:, 0] != idx[:, 1]).all())
    q1, q2 = self._expected(logits, tau, m)
    np.testing.assert_allclose(q1.sum(), 1.0, rtol=1e-9)
    np.testing.assert_allclose(q2.sum(), 1.0, rtol=1e-9)
    inflation = 1.0 + n_draws / m  # the expectations are themselves estimates

    def p_value(observed, expected):
      keep = expected > 0
      stat = np.sum((observed[keep] - expected[keep])**2 / expected[keep]) / inflation
      return stats.chi2.sf(stat, keep.sum() - 1)

    obs1 = np.bincount(idx[:, 0], minlength=n)
    obs2 = np.zeros((n, n))
    np.add.at(obs2, (idx[:, 0], idx[:, 1]), 1)
    self.assertGreater(p_value(obs1, n_draws * q1), 1e-3)
    off = ~np.eye(n, dtype=bool)
    self.assertGreater(p_value(obs2[off], n_draws * q2[off]), 1e-3)
    # Power: the law without the Gumbel perturbation is clearly rejected.
    pi = np_softmax(logits.astype(np.float64))
    self.assertLess(p_value(obs1, n_draws * pi), 1e-6)


if __name__ == "__main__":
  pytest.main([__file__])
