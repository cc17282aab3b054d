"""Mesh, shardings and batch assembly on 8 fake CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from tas_jax.runtime import parallel


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def test_mesh_spans_all_devices_with_auto_axis(mesh):
  assert jax.device_count() == 8
  assert mesh.axis_names == ("data",)
  assert mesh.shape["data"] == 8
  assert mesh.axis_types == (AxisType.Auto,)
  assert set(mesh.devices.flat) == set(jax.devices())


def test_make_mesh_over_given_devices():
  sub = parallel.make_mesh(jax.devices()[:4])
  assert sub.shape["data"] == 4
  assert list(sub.devices.flat) == jax.devices()[:4]


def test_shardings(mesh):
  assert parallel.data_sharding(mesh).spec == P("data")
  assert parallel.replicated(mesh).spec == P()


def test_jitted_reduction_over_sharded_batch_matches_numpy(mesh):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 5)).astype(np.float32)
  w = rng.normal(size=(5,)).astype(np.float32)
  xs = jax.device_put(x, parallel.data_sharding(mesh))
  ws = parallel.replicate(w, mesh)
  assert len(xs.addressable_shards) == 8
  assert {s.data.shape for s in xs.addressable_shards} == {(8, 5)}

  @jax.jit
  def stats(x, w):
    y = x @ w
    return y.sum(), (x * x).mean(axis=0)

  total, sq = stats(xs, ws)
  np.testing.assert_allclose(total, (x @ w).sum(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sq, (x * x).mean(axis=0), rtol=1e-6)


def test_shard_map_mean_is_global(mesh):
  x = np.arange(32, dtype=np.float32).reshape(16, 2)
  xs = jax.device_put(x, parallel.data_sharding(mesh))
  f = jax.jit(jax.shard_map(lambda b: jax.lax.pmean(b.mean(axis=0), "data"), mesh=mesh,
                            in_specs=P("data"), out_specs=P()))
  np.testing.assert_allclose(f(xs), x.mean(axis=0))


def test_global_batch_shapes_and_sharding(mesh):
  local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
           "label": np.arange(16, dtype=np.int32)}
  batch = parallel.global_batch(mesh, local)
  assert batch["image"].shape == (16, 3) and batch["label"].shape == (16,)
  assert batch["image"].sharding == parallel.data_sharding(mesh)
  assert batch["label"].dtype == jnp.int32
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
  assert int(jax.jit(jnp.sum)(batch["label"])) == sum(range(16))


def test_global_batch_rejects_bad_batches(mesh):
  with pytest.raises(ValueError, match="same leading size"):
    parallel.global_batch(mesh, {"a": np.zeros((8, 2)), "b": np.zeros((16,))})
  with pytest.raises(ValueError, match="does not split over"):
    parallel.global_batch(mesh, np.zeros((12, 2)))
  with pytest.raises(ValueError, match="leading batch axis"):
    parallel.global_batch(mesh, np.float32(1.0))


def test_replicate_puts_a_full_copy_on_every_device(mesh):
  tree = {"w": np.ones((3, 2), np.float32), "step": 7, "b": jnp.arange(4.0)}
  out = parallel.replicate(tree, mesh)
  for leaf in jax.tree.leaves(out):
    assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
    assert len(leaf.addressable_shards) == 8
  np.testing.assert_array_equal(out["b"], np.arange(4.0))
  assert int(out["step"]) == 7


def test_local_batch_size():
  assert parallel.local_batch_size(256, 1) == 256
  assert parallel.local_batch_size(256, 4, 32) == 64
  with pytest.raises(ValueError, match="does not split evenly over 8 devices"):
    parallel.local_batch_size(100)
  with pytest.raises(ValueError, match="over 3 processes"):
    parallel.local_batch_size(40, 3, 8)
  with pytest.raises(ValueError, match="positive"):
    parallel.local_batch_size(0)


def test_single_process_helpers():
  assert parallel.initialize_distributed() == (0, 1)
  assert parallel.initialize_distributed() == (0, 1)
  assert parallel.is_main_process()
  assert parallel.any_process(True) and not parallel.any_process(False)
  assert parallel.all_processes(True) and not parallel.all_processes(False)
  parallel.barrier("single")
