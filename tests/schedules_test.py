"""Temperature and learning-rate schedules (METHOD.md §4.1, 4.2) against plain-Python references."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from tas_jax.core import schedules


def ref_tau_cosine(e, total, hi, lo):
  return lo + (hi - lo) * (1 + math.cos(math.pi * e / total)) / 2


def ref_tau_linear(e, total, hi, lo):
  return hi - (hi - lo) * e / total


def ref_lr(kind, base, epochs, spe, warmup, milestones, gamma, official, step):
  """The per-step rule written out case by case."""
  e, i = divmod(step, spe)
  if e < warmup:
    return base * (e + i / spe) / warmup
  if kind == "constant":
    return base
  if kind == "multistep":
    return base * gamma**sum(1 for m in milestones if m <= e)
  if official:
    return 0.0 if e >= epochs else base * (1 + math.cos(math.pi * (e - warmup) / epochs)) / 2
  return 0.0 if e >= epochs else base * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) / 2


class TauTest(chex.TestCase):

  def test_official_values_from_spec(self):
    got = [float(schedules.tau_cosine(e, 600)) for e in (0, 100, 300, 500, 599)]
    np.testing.assert_array_equal(np.round(got, 2), [5.0, 4.67, 2.55, 0.43, 0.10])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("cosine", "cosine", ref_tau_cosine, 5.0, 0.1), ("linear", "linear", ref_tau_linear, 10.0, 0.1))
  def test_default_schedules_match_formula(self, name, ref, hi, lo):
    rng = np.random.default_rng(len(name))
    totals = rng.integers(2, 1000, size=20)
    epochs = np.array([rng.integers(0, t) for t in totals])
    fn = self.variant(jax.vmap(schedules.tau_schedule(name)))
    got = fn(jnp.asarray(epochs), jnp.asarray(totals))
    want = [ref(e, t, hi, lo) for e, t in zip(epochs, totals)]
    np.testing.assert_allclose(got, want, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_custom_range_and_endpoints(self):
    rng = np.random.default_rng(9)
    hi, lo = rng.uniform(2, 20), rng.uniform(0.01, 1)
    total = 37
    for name, ref in (("cosine", ref_tau_cosine), ("linear", ref_tau_linear)):
      fn = self.variant(schedules.tau_schedule(name, tau_max=hi, tau_min=lo))
      for e in (0, 5, 18, 36, 37):
        np.testing.assert_allclose(fn(jnp.int32(e), total), ref(e, total, hi, lo), rtol=1e-5)
      np.testing.assert_allclose(fn(0, total), hi, rtol=1e-6)
      np.testing.assert_allclose(fn(total, total), lo, rtol=1e-5)

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, "cosine.*linear"):
      schedules.tau_schedule("exponential")


class LrScheduleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("cosine", "cosine", 0.1, 7, 3, 0, (), 0.1, False),
      ("cosine_warmup", "cosine", 0.05, 9, 4, 2, (), 0.1, False),
      ("official_tail", "cosine", 0.1, 6, 5, 2, (), 0.1, True),
      ("official_no_warmup", "cosine", 0.2, 5, 2, 0, (), 0.1, True),
      ("multistep", "multistep", 0.3, 8, 3, 1, (5, 2), 0.2, False),
      ("constant_warmup", "constant", 0.01, 4, 3, 2, (), 0.1, False),
  )
  def test_every_step_matches_reference(self, kind, base, epochs, spe, warmup, milestones, gamma, official):
    fn = schedules.lr_schedule(kind, base, epochs, spe, warmup_epochs=warmup, milestones=milestones, gamma=gamma,
                               official_tail=official)
    run_epochs = epochs + warmup if official else epochs
    steps = np.arange((run_epochs + 1) * spe)
    got = self.variant(jax.vmap(fn))(jnp.asarray(steps))
    chex.assert_type(got, jnp.float32)
    want = [ref_lr(kind, base, epochs, spe, warmup, milestones, gamma, official, int(s)) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)

  def test_cosine_ends_without_zero_tail(self):
    base, epochs, spe, warmup = 0.1, 10, 4, 3
    fn = jax.jit(schedules.lr_schedule("cosine", base, epochs, spe, warmup_epochs=warmup))
    per_epoch = np.array([float(fn(e * spe)) for e in range(epochs)])
    self.assertEqual(per_epoch[warmup], np.float32(base))
    self.assertTrue((per_epoch[1:] > 0).all())
    self.assertTrue((np.diff(per_epoch[warmup:]) < 0).all())
    # Within an epoch the cosine is flat: it moves once per epoch.
    self.assertEqual(float(fn(warmup * spe + 1)), float(fn(warmup * spe + spe - 1)))

  def test_official_tail_quirk(self):
    base, epochs, spe, warmup = 0.1, 10, 2, 3
    fn = jax.jit(schedules.lr_schedule("cosine", base, epochs, spe, warmup_epochs=warmup, official_tail=True))
    tail = [float(fn(s)) for s in range(epochs * spe, (epochs + warmup) * spe)]
    self.assertEqual(tail, [0.0] * (warmup * spe))
    last_live = float(fn((epochs - 1) * spe))
    np.testing.assert_allclose(last_live, base * (1 + math.cos(math.pi * (epochs - 1 - warmup) / epochs)) / 2, rtol=1e-6)
    self.assertGreater(last_live, 0.1 * base)

  def test_one_compilation_for_all_steps(self):
    fn = schedules.lr_schedule("multistep", 0.1, 6, 5, milestones=(2, 4))
    traced = jax.jit(chex.assert_max_traces(fn, n=1))
    for s in range(0, 30, 3):
      np.testing.assert_allclose(traced(s), ref_lr("multistep", 0.1, 6, 5, 0, (2, 4), 0.1, False, s), rtol=1e-6)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "cosine.*multistep.*constant"):
      schedules.lr_schedule("step", 0.1, 10, 10)
    with self.assertRaises(ValueError):
      schedules.lr_schedule("cosine", 0.1, 10, 0)
