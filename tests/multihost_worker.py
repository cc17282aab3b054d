"""One process of the two-process run driven by multihost_test.py.

Usage: python multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID SHARED_DIR

Prints one line ``RESULT {json}`` that the test compares with NumPy.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

GLOBAL_BATCH = 8
FEATURES = 3


def full_batch() -> np.ndarray:
  """The global batch; each process loads its contiguous slice of it."""
  return (np.arange(GLOBAL_BATCH * FEATURES, dtype=np.float32).reshape(GLOBAL_BATCH, FEATURES) - 5.0) / 3.0


def main(coordinator: str, num_processes: int, process_id: int, shared: str) -> None:
  from tas_jax.runtime import parallel  # pylint: disable=g-import-not-at-top

  # Joining the cluster has to come before anything starts the JAX backend.
  index, count = parallel.initialize_distributed(coordinator, num_processes, process_id)
  assert parallel.initialize_distributed(coordinator, num_processes, process_id) == (index, count)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from tas_jax.runtime.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from tas_jax.runtime.metrics import MetricWriter  # pylint: disable=g-import-not-at-top
  from tas_jax.runtime.preemption import PreemptionGuard  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  per_process = parallel.local_batch_size(GLOBAL_BATCH)
  full = full_batch()
  local = full[index * per_process:(index + 1) * per_process]
  labels = np.arange(GLOBAL_BATCH, dtype=np.int32)[index * per_process:(index + 1) * per_process]
  batch = parallel.global_batch(mesh, {"x": local, "y": labels})

  total = jax.jit(jnp.sum)(batch["x"])
  label_sum = jax.jit(jnp.sum)(batch["y"])
  mean = jax.jit(jax.shard_map(lambda b: jax.lax.pmean(b.mean(axis=0), parallel.DATA_AXIS),
                               mesh=mesh, in_specs=P(parallel.DATA_AXIS), out_specs=P()))(batch["x"])
  gathered = multihost_utils.process_allgather(batch["x"], tiled=True)

  params = parallel.replicate({"w": np.linspace(0.0, 1.0, 6, dtype=np.float32).reshape(2, 3),
                               "step": np.int32(11)}, mesh)
  scaled = jax.jit(lambda p, x: x @ p["w"].T)(params, batch["x"])

  # The stop flag raised on process 1 only must stop both.
  with PreemptionGuard() as guard:
    first = guard.should_stop()
    if index == 1:
      guard.request("test")
    stop = guard.should_stop()
    local_flag = guard.requested

  fingerprint = {"model": "toy", "processes": count}
  with Checkpointer(os.path.join(shared, "ckpt"), fingerprint=fingerprint) as ckpt:
    ckpt.save(7, {"params": params, "batch": batch["x"]}, {"epoch": 2})
    abstract = {
        "params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                              sharding=parallel.replicated(mesh)), params),
        "batch": jax.ShapeDtypeStruct(batch["x"].shape, batch["x"].dtype,
                                      sharding=parallel.data_sharding(mesh)),
    }
    restored, meta = ckpt.restore(abstract)
    latest = ckpt.latest_step()

    # A newer step damaged after the fact: both processes fall back together.
    ckpt.save(8, {"params": params, "batch": batch["x"] * 2}, {"epoch": 3})
    parallel.barrier("saved-8")
    if index == 0:
      data_dir = os.path.join(shared, "ckpt", "8", "state", "d")
      for name in os.listdir(data_dir):
        os.remove(os.path.join(data_dir, name))
    parallel.barrier("damaged-8")
    fallback, fallback_meta, fallback_step = ckpt.restore_latest_valid(abstract, delete_invalid=True)
    steps_after = ckpt.all_steps()

  with MetricWriter(os.path.join(shared, "metrics"), enabled=parallel.is_main_process(),
                    tensorboard=False) as writer:
    writer.write(7, {"loss": total, "process": index})

  result = {
      "process_index": index,
      "process_count": count,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "mesh_size": mesh.shape[parallel.DATA_AXIS],
      "axis_types": [t.name for t in mesh.axis_types],
      "global_shape": list(batch["x"].shape),
      "local_shard_shapes": sorted(list(s.data.shape) for s in batch["x"].addressable_shards),
      "sum": float(total),
      "label_sum": int(label_sum),
      "mean": np.asarray(mean).tolist(),
      "gathered": np.asarray(gathered).tolist(),
      "scaled": np.asarray(multihost_utils.process_allgather(scaled, tiled=True)).tolist(),
      "stop_before": first,
      "stop": stop,
      "local_flag": local_flag,
      "latest": latest,
      "meta": meta,
      "restored_batch": np.asarray(multihost_utils.process_allgather(restored["batch"], tiled=True)).tolist(),
      "restored_w": np.asarray(restored["params"]["w"]).tolist(),
      "restored_step": int(restored["params"]["step"]),
      "restored_w_replicated": restored["params"]["w"].sharding == parallel.replicated(mesh),
      "fallback_step": fallback_step,
      "fallback_meta": fallback_meta,
      "fallback_batch": np.asarray(multihost_utils.process_allgather(fallback["batch"], tiled=True)).tolist(),
      "steps_after": steps_after,
      "restored_batch_sharded": restored["batch"].sharding == parallel.data_sharding(mesh),
  }
  parallel.barrier("worker-done")
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
