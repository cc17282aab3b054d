"""The work-directory lock: one writer per run directory."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from tas_jax.runtime import lock, runs


def test_second_holder_is_refused_naming_the_first(tmp_path):
  """Catches a lock that does not exclude (a second run would corrupt the first's files)."""
  with lock.locked(str(tmp_path)):
    with pytest.raises(lock.Held, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}, "
                                        r"started \d{4}-"):
      lock.DirectoryLock(str(tmp_path)).acquire()
  lock.DirectoryLock(str(tmp_path)).acquire().release()  # free again once released


def test_lock_held_by_another_process_refuses_start_before_anything_is_touched(tmp_path):
  """Catches a run that cleans temporary checkpoints or opens metrics before it holds the lock."""
  tmp_save = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1"
  tmp_save.mkdir(parents=True)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from tas_jax.runtime import lock; lock.lock(sys.argv[1]); "
       "print('held', flush=True); time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runs.RunError, match=rf"in use by another run \(pid {holder.pid} "):
      runs.start(str(tmp_path), {"lr": 0.1}, seed=0)
  finally:
    holder.kill()
    holder.wait()
  assert tmp_save.is_dir() and (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
  assert not (tmp_path / "config.json").exists()
  run = runs.start(str(tmp_path), {"lr": 0.1}, seed=0)  # the killed holder's lock is gone with it
  run.close()


def test_lock_of_a_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
  """Catches a stale lock file that blocks forever, or a take-over that goes unreported."""
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00"}))
  with caplog.at_level(logging.WARNING, logger="tas_jax"):
    held = lock.lock(str(tmp_path))
  assert f"no longer running (pid {dead.pid} on" in caplog.text
  held.release()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="tas_jax"):
    lock.lock(str(tmp_path)).release()  # a cleanly released lock is not reported
  assert "no longer running" not in caplog.text


def test_remote_paths_are_not_locked():
  assert lock.lock("gs://bucket/run") is None


def test_unusable_directory_is_one_clear_error(tmp_path):
  """Catches a work directory under a file ending in a raw OSError traceback."""
  (tmp_path / "a-file").write_text("x")
  with pytest.raises(runs.RunError, match=r"cannot use .*a-file/run as a run directory: Not a directory"):
    runs.start(str(tmp_path / "a-file" / "run"), {}, seed=0)
