"""One writer per run directory: an advisory lock held for the whole run.

Two programs writing one directory would corrupt it: opening the checkpoints
deletes temporary save directories another process is still writing, both
append to ``metrics.jsonl``, a resume keeps the other run's records. So a run
takes ``<workdir>/.lock`` before it opens or cleans anything, and holds it
until it ends.

The lock is ``flock`` on that file: the operating system releases it when the
holder exits, however it exits (a kill included), so a lock is never left
behind by a dead process. The file records its holder (pid, host, start
time) for the refusal line and is emptied on release; a file still naming a
holder that has died on this host (a killed run) is taken over with a
warning naming it. ``flock`` is advisory
and local to a machine (on NFS it depends on the mount); remote paths such as
``gs://`` are not locked.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import time

log = logging.getLogger("tas_jax")

LOCK_FILE = ".lock"


class LockError(RuntimeError):
  """The directory cannot be locked: another run holds it, or it cannot be created or written."""


class Held(LockError):
  """Another live process holds the directory's lock; the message names it."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
          if holder else "another process")


class DirectoryLock:
  """The exclusive lock of one directory; :meth:`release` (or process exit) frees it."""

  def __init__(self, directory: str):
    self.path = os.path.join(directory, LOCK_FILE)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> "DirectoryLock":
    """Takes the lock, or raises :class:`Held` naming the live holder (:class:`LockError` for an unusable directory)."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise LockError(f"cannot use {os.path.dirname(self.path) or '.'} as a run directory: {e.strerror}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      for _ in range(20):  # a holder that has just taken the lock writes its record a moment later
        if holder:
          break
        time.sleep(0.05)
        holder = _read(fd)
      os.close(fd)
      raise Held(f"{os.path.dirname(self.path) or '.'} is in use by another run ({_describe(holder)}); wait for it "
                 f"to end, or use another --workdir") from None
    previous = _read(fd)
    if previous and previous.get("host") == socket.gethostname() and not _alive(int(previous.get("pid", -1))):
      log.warning("taking over the lock of %s left by a run that is no longer running (%s)",
                  os.path.dirname(self.path), _describe(previous))
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Frees the lock; the file stays (deleting it would race with a process about to lock it), emptied, so that
    a holder recorded in it means one that died holding it."""
    if self._fd is not None:
      fd, self._fd = self._fd, None
      try:
        os.ftruncate(fd, 0)
      except OSError:
        pass
      os.close(fd)

  def __enter__(self) -> "DirectoryLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read(fd: int) -> dict:
  try:
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    value = json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def lock(directory: str) -> DirectoryLock | None:
  """The acquired lock of a local ``directory`` (created if missing); None for remote paths, which are not locked."""
  if "://" in directory:
    return None
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise LockError(f"cannot use {directory} as a run directory: {e.strerror or e}") from None
  return DirectoryLock(directory).acquire()


@contextlib.contextmanager
def locked(directory: str):
  """``with locked(d):`` holds ``d``'s lock for the block (see :func:`lock`)."""
  held = lock(directory)
  try:
    yield held
  finally:
    if held is not None:
      held.release()
