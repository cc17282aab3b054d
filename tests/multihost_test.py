"""Two jax.distributed processes on 127.0.0.1, 2 CPU devices each.

Runs tests/multihost_worker.py twice and checks what each process computed
(a global batch, collectives, a shared checkpoint, the stop agreement)
against NumPy.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 120
NUM_PROCESSES = 2

sys.path.insert(0, str(HERE))
from multihost_worker import full_batch  # noqa: E402  pylint: disable=g-import-not-at-top


def _run_workers(shared: pathlib.Path) -> list[dict]:
  port = portpicker.pick_unused_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "TF_CPP_MIN_LOG_LEVEL": "3"}
  procs = [subprocess.Popen(
      [sys.executable, str(HERE / "multihost_worker.py"), f"127.0.0.1:{port}", str(NUM_PROCESSES),
       str(i), str(shared)],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(NUM_PROCESSES)]
  outputs = []
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
      outputs.append((proc.returncode, out, err))
  except subprocess.TimeoutExpired:
    pytest.fail(f"the {NUM_PROCESSES} processes did not finish within {TIMEOUT_S} s")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  results = []
  for i, (code, out, err) in enumerate(outputs):
    assert code == 0, f"process {i} exited with {code}:\n{out}\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"process {i} printed no result:\n{out}\n{err[-4000:]}"
    results.append(json.loads(lines[0][len("RESULT "):]))
  return results


@pytest.mark.multihost
def test_two_processes_share_mesh_batch_collectives_and_checkpoint(tmp_path):
  results = _run_workers(tmp_path)
  full = full_batch()
  w = np.linspace(0.0, 1.0, 6, dtype=np.float32).reshape(2, 3)
  for index, r in enumerate(results):
    assert r["process_index"] == index and r["process_count"] == NUM_PROCESSES
    assert r["device_count"] == 4 and r["local_device_count"] == 2 and r["mesh_size"] == 4
    assert r["axis_types"] == ["Auto"]
    assert r["global_shape"] == [8, 3]
    assert r["local_shard_shapes"] == [[2, 3], [2, 3]]
    np.testing.assert_array_equal(np.array(r["gathered"], np.float32), full)
    np.testing.assert_allclose(r["sum"], full.sum(), rtol=1e-6, atol=1e-5)
    assert r["label_sum"] == sum(range(8))
    np.testing.assert_allclose(r["mean"], full.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r["scaled"], full @ w.T, rtol=1e-6, atol=1e-6)
    # Only process 1 saw the request; both agreed to stop.
    assert r["stop_before"] is False and r["stop"] is True
    assert r["local_flag"] is (index == 1)
    assert r["latest"] == 7 and r["meta"] == {"epoch": 2}
    np.testing.assert_array_equal(np.array(r["restored_batch"], np.float32), full)
    np.testing.assert_array_equal(np.array(r["restored_w"], np.float32), w)
    assert r["restored_step"] == 11
    assert r["restored_w_replicated"] and r["restored_batch_sharded"]
    assert r["fallback_step"] == 7 and r["fallback_meta"] == {"epoch": 2}
    np.testing.assert_array_equal(np.array(r["fallback_batch"], np.float32), full)
    assert r["steps_after"] == [7]
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["7"]
  # Metrics come from process 0 alone: one record, not one per process.
  with open(tmp_path / "metrics" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records == [{"step": 7, "loss": pytest.approx(float(full.sum()), rel=1e-6), "process": 0}]
