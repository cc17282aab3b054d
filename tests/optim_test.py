"""Optimisers (METHOD.md §4.1) against NumPy re-implementations of torch.optim.SGD and torch.optim.Adam."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import parameterized

from tas_jax.core import optim, schedules


def torch_sgd(p, grads, lrs, momentum, weight_decay, nesterov):
  """torch.optim.SGD.step with dampening 0: d = g + wd p; buf = m buf + d (buf_1 = d)."""
  p = p.astype(np.float64)
  buf = None
  for g, lr in zip(grads, lrs):
    d = g + weight_decay * p
    buf = d.copy() if buf is None else momentum * buf + d
    step = d + momentum * buf if nesterov else buf
    p = p - lr * step
  return p


def torch_adam(p, grads, lr, b1, b2, weight_decay, eps):
  """torch.optim.Adam.step (amsgrad off): the decay is added to the gradient."""
  p = p.astype(np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, g in enumerate(grads, start=1):
    d = g + weight_decay * p
    m = b1 * m + (1 - b1) * d
    v = b2 * v + (1 - b2) * d * d
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


def run_optax(tx, params, grads, wrap):
  update = wrap(lambda g, s, p: tx.update(g, s, p))
  state = tx.init(params)
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def random_problem(seed, steps):
  rng = np.random.default_rng(seed)
  params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(steps)]
  return params, grads


class WeightOptimizerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.9, 5e-4, True), (0.9, 5e-2, True), (0.5, 1e-3, False))
  def test_matches_torch_sgd_with_schedule(self, momentum, wd, nesterov):
    steps, spe = 7, 2
    lr = schedules.lr_schedule("cosine", 0.1, 5, spe, warmup_epochs=1)
    params, grads = random_problem(int(momentum * 10), steps)
    tx = optim.weight_optimizer(lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    got = run_optax(tx, jax.tree.map(jnp.asarray, params), grads, self.variant)
    lrs = [float(lr(t)) for t in range(steps)]
    self.assertGreater(len(set(lrs)), 3)
    for name in params:
      want = torch_sgd(params[name], [g[name] for g in grads], lrs, momentum, wd, nesterov)
      np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)

  def test_float_learning_rate_and_defaults(self):
    params, grads = random_problem(3, 4)
    got = run_optax(optim.weight_optimizer(0.05), jax.tree.map(jnp.asarray, params), grads, jax.jit)
    for name in params:
      want = torch_sgd(params[name], [g[name] for g in grads], [0.05] * 4, 0.9, 5e-4, True)
      np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)


class ArchOptimizerTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1e-3, 0.5, 0.999, 1e-3, 1e-8), (3e-2, 0.9, 0.99, 5e-2, 1e-6))
  def test_matches_torch_adam(self, lr, b1, b2, wd, eps):
    params, grads = random_problem(int(lr * 1e4), 6)
    tx = optim.arch_optimizer(lr, b1=b1, b2=b2, weight_decay=wd, eps=eps)
    got = run_optax(tx, jax.tree.map(jnp.asarray, params), grads, self.variant)
    for name in params:
      want = torch_adam(params[name], [g[name] for g in grads], lr, b1, b2, wd, eps)
      np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)

  def test_decay_is_coupled_not_decoupled(self):
    # With a zero gradient only the decay moves the parameter; coupled L2 goes
    # through Adam's normalisation, so the first step is -lr * sign(p).
    p = jnp.array([2.0, -0.5, 3.0])
    tx = optim.arch_optimizer()
    updates, _ = tx.update(jnp.zeros(3), tx.init(p), p)
    chex.assert_trees_all_close(updates, -1e-3 * jnp.sign(p), rtol=1e-4)


def test_masked_update_skips_rows_as_torch_skips_parameters_without_gradient():
  """Catches: masked rows still decayed, or their momentum buffer advanced while they were not used, so that
  the step where they are used again moves them by a stale momentum (each row here is one torch parameter)."""
  rng = np.random.default_rng(0)
  p0 = rng.normal(size=(3, 4)).astype(np.float32)
  grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)]
  used = [np.array([1, 0, 1], bool), np.array([1, 0, 0], bool), np.array([1, 1, 1], bool),
          np.array([0, 1, 1], bool)]
  tx = optim.weight_optimizer(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  params, state = {"w": jnp.asarray(p0)}, tx.init({"w": jnp.asarray(p0)})
  for g, u in zip(grads, used):
    params, state = optim.masked_update(tx, {"w": jnp.asarray(g * u[:, None])}, state, params,
                                        {"w": jnp.asarray(u)[:, None]})
  for row in range(3):
    steps = [(g[row], 0.1) for g, u in zip(grads, used) if u[row]]
    expected = torch_sgd(p0[row], [g for g, _ in steps], [lr for _, lr in steps], 0.9, 5e-4, True)
    np.testing.assert_allclose(np.asarray(params["w"][row]), expected, rtol=1e-5, atol=1e-6)
