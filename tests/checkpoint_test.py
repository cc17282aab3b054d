"""Checkpointer: round trips, retention, fingerprints, damaged and unfinished steps."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tas_jax.runtime import parallel
from tas_jax.runtime.checkpoint import (CheckpointError, Checkpointer, CorruptCheckpointError,
                                FingerprintMismatchError, IncompatibleCheckpointError)

# Orbax leaves failed read coroutines behind when a restore fails on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FINGERPRINT = {"model": "resnet20", "shape": [16, 16, 32], "config": {"hash": "abc123", "seed": 1}}


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def make_state(mesh, scale: float = 1.0):
  rng = np.random.default_rng(int(scale * 10))
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)).astype(np.float32) * scale,
                     "bias": np.zeros(8, np.float32) + scale},
            "arch": [rng.normal(size=(5,)).astype(np.float32), jnp.bfloat16(scale)]}
  state = {"params": parallel.replicate(params, mesh),
           "step": parallel.replicate(np.int32(scale * 100), mesh),
           "batch_stats": jax.device_put(np.arange(16, dtype=np.float32) * scale,
                                         parallel.data_sharding(mesh)),
           "host": np.arange(3, dtype=np.int64)}
  return state


def abstract_of(state, mesh):
  """ShapeDtypeStructs with replicated shardings: the usual resume target."""
  sharding = parallel.replicated(mesh)
  return jax.tree.map(lambda x: x if isinstance(x, np.ndarray)
                      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def assert_trees_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_bit_identical_with_requested_sharding(tmp_path, mesh):
  state = make_state(mesh)
  meta = {"epoch": 3, "tau": np.float32(4.5), "arch": [16, 8, 32], "name": "search"}
  with Checkpointer(tmp_path / "ckpt", fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, meta)
    assert ckpt.latest_step() == 10
  with Checkpointer(tmp_path / "ckpt", fingerprint=FINGERPRINT) as ckpt:
    restored, restored_meta = ckpt.restore(abstract_of(state, mesh))
  assert_trees_identical(restored, state)
  assert restored_meta == {"epoch": 3, "tau": 4.5, "arch": [16, 8, 32], "name": "search"}
  replicated = parallel.replicated(mesh)
  for leaf in jax.tree.leaves(restored["params"]) + [restored["batch_stats"], restored["step"]]:
    assert leaf.sharding == replicated
  assert isinstance(restored["host"], np.ndarray)


def test_restore_into_concrete_arrays_takes_their_sharding(tmp_path, mesh):
  state = make_state(mesh)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    target = make_state(mesh, scale=2.0)
    restored, meta = ckpt.restore(target, step=1)
  assert meta == {}
  assert_trees_identical(restored, state)
  assert restored["batch_stats"].sharding == parallel.data_sharding(mesh)


def test_abstract_leaf_without_sharding_is_refused(tmp_path, mesh):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="w: ShapeDtypeStruct has no sharding"):
      ckpt.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_max_to_keep_and_steps(tmp_path, mesh):
  state = {"w": parallel.replicate(np.ones(4, np.float32), mesh)}
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (5, 10, 15, 20):
      ckpt.save(step, {"w": state["w"] * step}, {"step": step})
    assert ckpt.all_steps() == [15, 20]
    restored, meta = ckpt.restore(abstract_of(state, mesh), step=15)
    np.testing.assert_array_equal(restored["w"], np.full(4, 15.0))
    assert meta == {"step": 15}
    assert ckpt.read_meta() == {"step": 20}
    with pytest.raises(CheckpointError, match="no checkpoint step 5 .* it has \\[15, 20\\]"):
      ckpt.restore(abstract_of(state, mesh), step=5)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["15", "20"]


def test_save_same_step_twice_and_stale_newer_steps(tmp_path, mesh):
  w = parallel.replicate(np.ones(2, np.float32), mesh)
  abstract = abstract_of({"w": w}, mesh)
  with Checkpointer(tmp_path, max_to_keep=None) as ckpt:
    assert ckpt.save(10, {"w": w})
    assert ckpt.save(20, {"w": w * 2})
    assert not ckpt.save(20, {"w": w * 3})  # already there: kept as is
    np.testing.assert_array_equal(ckpt.restore(abstract)[0]["w"], [2.0, 2.0])
    assert ckpt.save(20, {"w": w * 3}, force=True)
    np.testing.assert_array_equal(ckpt.restore(abstract)[0]["w"], [3.0, 3.0])
    # A run resumed from step 10 must not save under the shadow of step 20.
    with pytest.raises(CheckpointError, match=r"newer steps \[20\] exist.*truncate_after\(15\)"):
      ckpt.save(15, {"w": w})
    assert ckpt.truncate_after(10) == [20]
    assert ckpt.save(15, {"w": w * 4})
    assert ckpt.all_steps() == [10, 15]
    np.testing.assert_array_equal(ckpt.restore(abstract)[0]["w"], [4.0, 4.0])


def test_fingerprint_mismatch_names_keys_and_values(tmp_path, mesh):
  with Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(3, {"w": jnp.ones(2)})
  other = {**FINGERPRINT, "model": "resnet56", "config": {"hash": "abc123", "seed": 2}}
  with pytest.raises(FingerprintMismatchError) as info:
    Checkpointer(tmp_path, fingerprint=other)
  message = str(info.value)
  assert "model: checkpoint has 'resnet20', this run has 'resnet56'" in message
  assert "config.seed: checkpoint has 1, this run has 2" in message
  assert "shape" not in message and "config.hash" not in message
  assert info.value.differences == {"model": ("resnet20", "resnet56"), "config.seed": (1, 2)}
  assert info.value.step == 3

  # Also on restore, for a Checkpointer opened before the directory filled.
  extra = {**FINGERPRINT, "width_ratio": 0.5}
  with Checkpointer(tmp_path / "late", fingerprint=extra) as late, \
       Checkpointer(tmp_path / "late", fingerprint=FINGERPRINT) as writer:
    writer.save(1, {"w": jnp.ones(2)})
    late.reload()
    with pytest.raises(FingerprintMismatchError, match="width_ratio: checkpoint has '<missing>', "
                       "this run has 0.5"):
      late.restore({"w": jnp.zeros(2)})
  # Tuples and lists are the same JSON value: no false alarm.
  with Checkpointer(tmp_path, fingerprint={**FINGERPRINT, "shape": (16, 16, 32)}) as same:
    np.testing.assert_array_equal(same.restore({"w": jnp.zeros(2)})[0]["w"], [1.0, 1.0])


def test_incompatible_state_is_not_reported_as_corruption(tmp_path, mesh):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"w": jnp.ones((3, 4)), "b": jnp.ones(4)})
    with pytest.raises(IncompatibleCheckpointError, match=r"w: checkpoint shape \(3, 4\), requested \(3, 5\)"):
      ckpt.restore({"w": jnp.zeros((3, 5)), "b": jnp.zeros(4)})
    with pytest.raises(IncompatibleCheckpointError, match="extra: not in the checkpoint"):
      ckpt.restore({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "extra": jnp.zeros(1)})
    with pytest.raises(IncompatibleCheckpointError):
      ckpt.restore_latest_valid({"w": jnp.zeros((3, 4))})


def _state_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Data files of the merged array store (those a restore must read)."""
  files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  assert files, "unexpected checkpoint layout"
  return files


@pytest.mark.parametrize("damage", ["delete_data", "truncate_data", "truncate_manifest",
                                    "delete_meta", "truncate_meta", "delete_state", "empty_dir"])
def test_corrupt_latest_step_is_detected_and_skipped(tmp_path, mesh, damage, caplog):
  state = {"w": parallel.replicate(np.arange(1000, dtype=np.float32), mesh)}
  abstract = abstract_of(state, mesh)
  with Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    for step in (100, 200, 300):
      ckpt.save(step, {"w": state["w"] + step}, {"step": step})
  latest = tmp_path / "300"
  if damage == "delete_data":
    for f in _state_files(latest):
      f.unlink()
  elif damage == "truncate_data":
    for f in _state_files(latest):
      with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
  elif damage == "truncate_manifest":
    (latest / "state" / "manifest.ocdbt").write_bytes(b"")
  elif damage == "delete_meta":
    (latest / "meta" / "metadata").unlink()
  elif damage in ("delete_state", "empty_dir"):
    for item in latest.iterdir():
      if item.is_dir() and (item.name == "state" or damage == "empty_dir"):
        shutil.rmtree(item)
      elif damage == "empty_dir":
        item.unlink()
  else:
    (latest / "meta" / "metadata").write_text('{"format": "tas_j')

  with Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    assert ckpt.latest_step() == 300
    with pytest.raises(CorruptCheckpointError) as info:
      ckpt.restore(abstract)
    message = str(info.value)
    assert "step 300" in message and "corrupt" in message
    assert "previous checkpoint is step 200" in message
    assert info.value.step == 300 and info.value.previous_step == 200

    with caplog.at_level(logging.WARNING, logger="tas_jax.runtime.checkpoint"):
      restored, meta, step = ckpt.restore_latest_valid(abstract, delete_invalid=True)
    assert step == 200 and meta == {"step": 200}
    np.testing.assert_array_equal(restored["w"], np.arange(1000, dtype=np.float32) + 200)
    assert ckpt.skipped_steps == [300]
    assert any("Skipping corrupt checkpoint step 300" in r.getMessage() for r in caplog.records)
    # The damaged step is gone, so the resumed run can write step 300 again.
    assert ckpt.all_steps() == [100, 200]
    assert ckpt.save(300, {"w": state["w"]})


def test_no_valid_checkpoint_at_all(tmp_path, mesh):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
      ckpt.restore({"w": jnp.zeros(2)})
    ckpt.save(1, {"w": jnp.ones(2)})
    (tmp_path / "1" / "meta" / "metadata").unlink()
    with pytest.raises(CorruptCheckpointError, match="no older checkpoint"):
      ckpt.restore({"w": jnp.zeros(2)})
    with pytest.raises(CorruptCheckpointError, match=r"none of the checkpoints \[1\]"):
      ckpt.restore_latest_valid({"w": jnp.zeros(2)})


def test_unfinished_tmp_directory_is_ignored(tmp_path, mesh):
  state = {"w": parallel.replicate(np.ones(8, np.float32), mesh)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
  # What a save killed half-way leaves behind: a partial step under a temporary name.
  partial = tmp_path / "2.orbax-checkpoint-tmp"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "manifest.ocdbt").write_bytes(b"\0" * 10)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    assert ckpt.latest_step() == 1
    restored, _ = ckpt.restore(abstract_of(state, mesh))
    np.testing.assert_array_equal(restored["w"], np.ones(8))
    assert ckpt.save(2, state)  # the leftover does not block this step
  assert not partial.exists()


_KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from tas_jax.runtime.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], max_to_keep=2, fingerprint={"run": "kill"})
    base = np.arange(2_000_000, dtype=np.float32)
    for step in range(1, 1000):
      ckpt.save(step, {"w": base + step, "s": np.int64(step)}, {"step": step})
      print("saved", step, flush=True)
""")


def test_sigkill_during_saves_leaves_a_restorable_latest_step(tmp_path, mesh):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      line = proc.stdout.readline()
      assert line, "writer exited early"
      if line.split() == ["saved", "2"]:
        break
    # Kill while a later step is being written, if the poll catches one.
    while time.monotonic() < deadline and not any(
        "tmp" in p.name for p in tmp_path.iterdir()):
      time.sleep(0.002)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
  with Checkpointer(tmp_path, max_to_keep=2, fingerprint={"run": "kill"}) as ckpt:
    step = ckpt.latest_step()
    assert step is not None and step >= 2
    target = {"w": np.zeros(2_000_000, np.float32), "s": np.int64(0)}
    restored, meta = ckpt.restore(target)
  assert meta == {"step": step}
  assert int(restored["s"]) == step
  np.testing.assert_array_equal(restored["w"], np.arange(2_000_000, dtype=np.float32) + step)


def test_flipped_bit_in_array_data_is_detected_by_checksum(tmp_path, mesh):
  """Catches silent damage: a bit flipped inside stored array data reads back without error, so only the
  checksums saved with the step tell it apart; the step is skipped like a truncated one."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=4096).astype(np.float32)  # incompressible: the stored bytes are the values themselves
  abstract = abstract_of({"w": parallel.replicate(w, mesh)}, mesh)
  with Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    ckpt.save(1, {"w": parallel.replicate(w, mesh)})
    ckpt.save(2, {"w": parallel.replicate(w + 1, mesh)})
  data = max((f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
  blob = bytearray(data.read_bytes())
  blob[len(blob) // 2] ^= 0x10
  data.write_bytes(bytes(blob))
  with Checkpointer(tmp_path, fingerprint=FINGERPRINT) as ckpt:
    with pytest.raises(CorruptCheckpointError, match=r"step 2 .*arrays differ from what was saved \(checksum of \['w'\]"):
      ckpt.restore(abstract)
    restored, _, step = ckpt.restore_latest_valid(abstract)
  assert step == 1
  np.testing.assert_array_equal(np.asarray(restored["w"]), w)
