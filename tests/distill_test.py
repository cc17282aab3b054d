import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tas_jax.core import distill


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _softmax(z):
  return np.exp(_log_softmax(z))


def reference_kd(zs, zt, y, alpha, t):
  """(1 - a) CE + a T^2 KL(p_t || p_s), KL summed over classes and averaged over the batch, in float64."""
  ce = -_log_softmax(zs)[np.arange(len(y)), y].mean()
  log_s, log_p = _log_softmax(zs / t), _log_softmax(zt / t)
  kl = (np.exp(log_p) * (log_p - log_s)).sum(-1).mean()
  return (1 - alpha) * ce + alpha * t * t * kl


def logits(seed, b=12, k=10, scale=3.0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((b, k)) * scale, rng.standard_normal((b, k)) * scale, rng.integers(0, k, b))


@pytest.mark.parametrize("alpha,t", [(0.9, 4.0), (0.5, 1.0), (0.0, 4.0), (1.0, 2.5)])
def test_kd_loss_matches_numpy(alpha, t):
  zs, zt, y = logits(int(alpha * 10 + t))
  got = distill.kd_loss(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.asarray(y), alpha, t)
  np.testing.assert_allclose(float(got), reference_kd(zs, zt, y, alpha, t), rtol=1e-5, atol=1e-6)


def test_kd_gradient_matches_closed_form():
  zs, zt, y = logits(3)
  a, t = 0.9, 4.0
  b, k = zs.shape
  g_s, g_t = jax.grad(distill.kd_loss, argnums=(0, 1))(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32),
                                                         jnp.asarray(y), a, t)
  # d/dz_s: (1 - a) (softmax(z_s) - onehot(y)) / B + a T (softmax(z_s/T) - softmax(z_t/T)) / B
  expected = ((1 - a) * (_softmax(zs) - np.eye(k)[y]) + a * t * (_softmax(zs / t) - _softmax(zt / t))) / b
  np.testing.assert_allclose(np.asarray(g_s), expected, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_t).max()) == 0.0  # the teacher gets no gradient


def test_kl_is_zero_for_identical_logits_and_kd_reduces_to_ce():
  zs, _, y = logits(5)
  z = jnp.asarray(zs, jnp.float32)
  assert abs(float(distill.kl_divergence(z, z, 4.0))) < 1e-6
  np.testing.assert_allclose(float(distill.kd_loss(z, z, jnp.asarray(y), 0.0, 4.0)),
                             float(distill.cross_entropy(z, jnp.asarray(y))), rtol=1e-6)


def test_cross_entropy_label_smoothing():
  zs, _, y = logits(7)
  eps, k = 0.1, zs.shape[1]
  q = (1 - eps) * np.eye(k)[y] + eps / k
  expected = -(q * _log_softmax(zs)).sum(-1).mean()
  z = jnp.asarray(zs, jnp.float32)
  np.testing.assert_allclose(float(distill.cross_entropy(z, jnp.asarray(y), eps)), expected, rtol=1e-5)
  plain = -_log_softmax(zs)[np.arange(len(y)), y].mean()
  np.testing.assert_allclose(float(distill.cross_entropy(z, jnp.asarray(y))), plain, rtol=1e-5)
  # bfloat16 logits give a float32 loss
  assert distill.kd_loss(z.astype(jnp.bfloat16), z, jnp.asarray(y)).dtype == jnp.float32
