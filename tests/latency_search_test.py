"""Latency-aware costs and many targets in one vectorised search."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tas_jax.core import shape_files
from tas_jax.latency import table as latency_table
from tas_jax.nets import supernet
from tas_jax.runtime import parallel
from tas_jax.steps import search as search_lib
from search_test import tiny_config


def fake_unit(kernel, stride, in_hw, cin, cout, batch_size, *, pool=False, relu=True, reps=10, trials=3):
  """A deterministic stand-in for a timing: proportional to MACs plus a fixed cost."""
  out_hw = in_hw // (2 if (stride > 1 or pool) else 1)
  return 1e-9 * kernel * kernel * cin * cout * out_hw * out_hw + 1e-6


@pytest.fixture
def tables(monkeypatch, tmp_path):
  monkeypatch.setattr(latency_table, "measure_unit", fake_unit)
  model = nnx.eval_shape(lambda: supernet.Supernet(shape_files.preset("resnet14"), rngs=nnx.Rngs(0)))
  return model, latency_table.build_tables(model, batch_size=1, cache_dir=str(tmp_path), calibrate=False)


def numpy_latency(space, tables, shape):
  """Sum of the unit latencies the pruned net runs, written from the shape directly."""
  lay = space.layout
  total = fake_unit(3, 1, 32, 3, shape.widths[0], 1)
  for b in lay.blocks:
    if b.index >= shape.blocks[b.stage]:
      continue
    cin, ws = shape.block_widths(b.stage, b.index)
    prev, hw = cin, b.in_hw
    for ci, w in zip(b.convs, ws):
      spec = lay.convs[ci]
      total += fake_unit(spec.kernel, spec.stride, hw, prev, w, 1)
      prev, hw = w, spec.out_hw
    if b.stride > 1:
      total += fake_unit(1, 1, b.in_hw, cin, ws[-1], 1, pool=True)
    elif cin != ws[-1]:
      total += fake_unit(1, 1, b.in_hw, cin, ws[-1], 1)
  return total


def test_one_hot_latency_equals_the_units_of_the_pruned_net(tables):
  model, t = tables
  space = model.space
  rng = np.random.default_rng(0)
  for _ in range(5):
    wi = np.array([rng.choice(np.flatnonzero(m)) for m in space.width_mask])
    di = np.array([rng.choice(np.flatnonzero(m)) for m in space.depth_mask])
    shape = space.shape_from_indices(wi, di)
    np.testing.assert_allclose(latency_table.predict(model, t, shape), numpy_latency(space, t, shape), rtol=1e-5)


def test_expected_latency_is_the_expectation_over_independent_widths(tables):
  model, t = tables
  space = model.space
  rng = np.random.default_rng(1)
  wp = rng.dirichlet(np.ones(8), size=space.width_table.shape[0]).astype(np.float32)
  dp = np.ones(space.depth_table.shape, np.float32) * space.depth_mask
  dp[:, -1] = 1.0
  dp[:, :-1] = 0.0  # all blocks kept: the expectation is then a plain Monte-Carlo mean over widths
  exp = float(jax.jit(lambda w, d: latency_table.predicted(model, t, w, d))(wp, dp))
  samples = []
  for _ in range(400):
    wi = np.array([rng.choice(8, p=p / p.sum()) for p in wp])
    samples.append(latency_table.predict(model, t, space.shape_from_indices(wi, np.full(3, dp.shape[1] - 1))))
  assert abs(exp - np.mean(samples)) < 4 * np.std(samples) / np.sqrt(len(samples))
  g = jax.grad(lambda w: latency_table.predicted(model, t, jax.nn.softmax(w), jnp.asarray(dp)))(jnp.zeros_like(wp))
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_tables_are_cached_per_device(tables, tmp_path, monkeypatch):
  model, t = tables
  calls = []
  monkeypatch.setattr(latency_table, "measure_unit", lambda *a, **k: calls.append(a) or 1.0)
  again = latency_table.build_tables(model, batch_size=1, cache_dir=str(tmp_path), calibrate=False)
  assert not calls  # every unit came from the cache
  np.testing.assert_array_equal(again.stem, t.stem)


def test_a_real_unit_timing_is_positive():
  s = latency_table.measure_unit(3, 1, 8, 4, 4, 1, reps=2, trials=1)
  assert 0 < s < 1


@pytest.mark.slow  # three searches and a vectorised one: half a minute
def test_vectorised_targets_equal_single_searches():
  config = tiny_config()
  problem, state = search_lib.build(config, 10, 4)
  mesh = parallel.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = lambda: parallel.global_batch(mesh, {"images": rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
                                               "labels": rng.integers(0, 10, 16).astype(np.int32)})
  batches = [(batch(), batch()) for _ in range(3)]
  targets = jnp.asarray([0.3, 0.7], jnp.float32) * problem.max_cost
  multi_step = search_lib.compile_step(problem, mesh, targets=targets)
  single_step = jax.jit(functools.partial(search_lib.search_step, problem))
  stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  singles = [state, state]
  for tb, vb in batches:
    stacked, m = multi_step(stacked, tb, vb, jnp.float32(5.0))
    singles = [single_step(s, tb, vb, jnp.float32(5.0), targets[i])[0] for i, s in enumerate(singles)]
  assert set(m) >= {"flops_ratio_0.3", "flops_ratio_0.7"}
  for i in range(2):
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], stacked["arch"])), jax.tree.leaves(singles[i]["arch"])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # The two targets pull the architectures apart.
  width_logits = max(jax.tree.leaves(stacked["arch"]), key=lambda x: x.size)
  a0, a1 = (np.asarray(width_logits[i]) for i in range(2))
  assert np.abs(a0 - a1).max() > 1e-4


def test_tables_round_trip_through_json(tables, tmp_path):
  model, t = tables
  path = str(tmp_path / "t.json")
  latency_table.save_tables(path, t)
  back = latency_table.load_tables(path)
  shape = shape_files.preset("resnet14")
  assert latency_table.predict(model, back, shape) == latency_table.predict(model, t, shape)
