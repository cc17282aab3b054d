"""Checkpoints of pytrees plus JSON metadata, on Orbax, safe to resume from.

A :class:`Checkpointer` keeps the newest ``max_to_keep`` steps of a run in
``directory/<step>/`` with two Orbax items: ``state`` (any pytree of JAX or
numpy arrays and Python scalars, written with ``StandardSave``) and ``meta``
(a JSON document holding the caller's ``meta`` dict and the run's
fingerprint).

What it adds to ``orbax.checkpoint.CheckpointManager``:

* Atomic steps. Orbax writes a step into ``<step>.orbax-checkpoint-tmp-*``
  and renames it when complete, so a process killed at any moment leaves
  either the finished step or a temporary directory that is never listed
  (and is deleted the next time a Checkpointer opens the directory).
* Fingerprints. A dict describing what the checkpoints are of (model,
  shape, config hash, ...) is stored with every step; opening a directory or
  restoring a step written under a different fingerprint raises
  :class:`FingerprintMismatchError` naming the differing keys and both values,
  instead of silently loading another run's weights.
* Corruption handling. A step whose files were truncated or deleted after
  the fact raises :class:`CorruptCheckpointError` naming the step and the
  previous one; :meth:`Checkpointer.restore_latest_valid` walks back to the
  newest step that restores, and :meth:`Checkpointer.quarantine` moves a
  corrupt step out of the way (into ``<directory>-corrupt/``) without deleting
  it. A state that does not fit the checkpoint (a changed model) raises
  :class:`IncompatibleCheckpointError` instead, which is never skipped over.

Multi-process runs: every process constructs the Checkpointer and calls
``save``/``restore`` with the same arguments at the same point (Orbax
synchronises them; only process 0 writes the JSON item and directories); the
directory must be on storage all processes share.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tas_jax.runtime import parallel
from tas_jax.runtime.checkpoint_checks import (CheckpointError, CorruptCheckpointError, FingerprintMismatchError,
                                               IncompatibleCheckpointError, abstract_target,
                                               fingerprint_differences, layout_problems, one_line)
from tas_jax.runtime.metrics import to_json_value

FORMAT = "tas_jax.checkpoint/1"  # written into every checkpoint: kept as it was so older runs still resume
_ITEMS = ("state", "meta")

_log = logging.getLogger(__name__)


def _leaf_array(x) -> np.ndarray | None:
  """The bytes of one leaf as this process holds it whole; None for a leaf sharded across processes."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated:
      x = x.addressable_data(0)
    elif not x.is_fully_addressable:
      return None
  return np.ascontiguousarray(np.asarray(x))


def checksums(state: Any) -> list[str | None]:
  """A CRC-32 and dtype of every leaf of ``state`` (in tree order), stored with a checkpoint to detect silent damage.

  Orbax reads back flipped bits inside array data without complaint; comparing
  these on restore turns them into a corrupt step, set aside like a truncated one.
  """
  out = []
  for leaf in jax.tree.leaves(state):
    a = _leaf_array(leaf)
    out.append(None if a is None else f"{zlib.crc32(a.tobytes()):08x}/{a.dtype}")
  return out


def checksum_mismatches(saved: list, state: Any) -> list[str]:
  """Tree paths of the leaves of a restored ``state`` whose checksum differs from the saved one."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  if len(saved) != len(leaves):
    return [f"{len(leaves)} arrays where {len(saved)} were saved"]
  now = checksums([leaf for _, leaf in leaves])
  # A leaf restored in another dtype (cast on purpose) cannot be compared.
  return [jax.tree_util.keystr(path) for (path, _), a, b in zip(leaves, saved, now)
          if a is not None and b is not None and a.split("/")[-1] == b.split("/")[-1] and a != b]


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs by step in one directory.

  Args:
    directory: where step directories go; created if missing. Local paths
      are made absolute; URLs such as ``gs://...`` are used as given.
    max_to_keep: newest steps kept (older ones are deleted after each save);
      None keeps all.
    fingerprint: JSON-able dict identifying what is checkpointed; stored with
      every step and compared with the stored one on open and on restore.
      None stores nothing and checks nothing.
    async_save: if True, ``save`` returns once the arrays are copied off the
      devices and writes in the background; call :meth:`wait` before relying
      on the files. Synchronous by default.

  Raises:
    FingerprintMismatchError: if the newest readable step has another
      fingerprint.
  """

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3,
               fingerprint: Mapping[str, Any] | None = None, async_save: bool = False):
    directory = os.fspath(directory)
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be positive or None, got {max_to_keep}")
    self.max_to_keep = max_to_keep
    self.fingerprint = None if fingerprint is None else to_json_value(dict(fingerprint))
    self.async_save = async_save
    self.skipped_steps: list[int] = []
    self.skip_reasons: dict[int, str] = {}
    options = ocp.CheckpointManagerOptions(
        preservation_policy=(None if max_to_keep is None
                             else ocp.checkpoint_managers.LatestN(max_to_keep)),
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    # Orbax deletes leftover temporary saves in a background thread; finish that here, so that opening is over
    # when the constructor returns and no save started afterwards (by any Checkpointer) can be deleted.
    await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    if self.fingerprint is not None:
      self._check_directory_fingerprint()

  # -- queries ---------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Finished steps, oldest first (temporary directories are never listed)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished step, or None for an empty directory."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def reload(self) -> None:
    """Re-reads the step list from storage (after another program changed it)."""
    self._manager.reload()

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The ``meta`` dict saved with ``step`` (default newest), without the state."""
    step = self._resolve_step(step)
    envelope = self._read_envelope(step)
    self._check_fingerprint(step, envelope)
    return envelope.get("meta") or {}

  # -- saving ----------------------------------------------------------------

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Writes ``state`` and ``meta`` as checkpoint ``step``.

    Args:
      step: training step the state belongs to.
      state: pytree of JAX arrays (any sharding), numpy arrays, Python scalars.
      meta: JSON-able dict saved alongside (numpy/JAX scalars are converted).
      force: replace an existing checkpoint of the same step, and allow a step
        older than the newest one.

    Returns:
      True if written; False if ``step`` already has a checkpoint (the same
      step saved twice, e.g. by a periodic save and a preemption save).

    Raises:
      CheckpointError: if newer steps exist. A resumed run must first drop
        them (:meth:`truncate_after`), otherwise they would shadow its own.
    """
    step = int(step)
    envelope = {"format": FORMAT, "step": step, "fingerprint": self.fingerprint,
                "meta": to_json_value(dict(meta or {})), "checksums": checksums(state)}
    steps = self.all_steps()
    if step in steps:
      if not force:
        _log.info("Checkpoint step %d already exists in %s; not saving it again.", step, self.directory)
        return False
      self._manager.delete(step)
    newer = [s for s in steps if s > step]
    if newer and not force:
      raise CheckpointError(
          f"cannot save step {step} in {self.directory}: newer steps {newer} exist and would be "
          f"restored instead of it; call truncate_after({step}) first (a resumed run) or use "
          "another directory", directory=self.directory, step=step)
    # Orbax's own save-interval policy is bypassed: the caller decides when to save.
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(envelope)), force=True)
    if not self.async_save:
      self._manager.wait_until_finished()
    return True

  def delete(self, step: int) -> None:
    """Deletes checkpoint ``step`` (all processes must call it)."""
    self._manager.delete(int(step))

  def truncate_after(self, step: int) -> list[int]:
    """Deletes every checkpoint newer than ``step``; returns the deleted steps."""
    doomed = [s for s in self.all_steps() if s > step]
    for s in doomed:
      self._manager.delete(s)
    if doomed:
      _log.info("Deleted checkpoints %s after step %d in %s.", doomed, step, self.directory)
    return doomed

  # -- restoring -------------------------------------------------------------

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Reads checkpoint ``step`` (default newest) into the layout of ``abstract_state``.

    Args:
      abstract_state: pytree like the saved state whose leaves are
        ``jax.ShapeDtypeStruct`` s with shardings, or concrete arrays to take
        shape, dtype and sharding from. Restored JAX leaves carry those
        shardings; dtypes differing from the saved ones are cast.
      step: which checkpoint; default the newest.

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointError: no such step (or no checkpoint at all).
      FingerprintMismatchError: the step belongs to a different run.
      IncompatibleCheckpointError: ``abstract_state`` does not fit the step.
      CorruptCheckpointError: the step's files are damaged.
    """
    step = self._resolve_step(step)
    target = abstract_target(abstract_state)
    envelope = self._read_envelope(step)
    self._check_fingerprint(step, envelope)
    error: BaseException | None = None
    state = None
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if error is None and envelope.get("checksums") is not None:
      damaged = checksum_mismatches(envelope["checksums"], state)
      if damaged:
        error = ValueError(f"the arrays differ from what was saved (checksum of {damaged[0]}"
                           f"{f' and {len(damaged) - 1} more' if len(damaged) > 1 else ''})")
    # A damaged shard may be read by some processes only; all must agree
    # before any returns, or they would continue from different steps.
    if not parallel.all_processes(error is None):
      error = error or RuntimeError("restoring failed on another process")
      if isinstance(error, ValueError) and str(error).startswith("the arrays differ"):
        raise self._corrupt(step, str(error))
      raise self._restore_failure(step, target, error) from error
    return state, envelope.get("meta") or {}

  def restore_latest_valid(self, abstract_state: Any, *, delete_invalid: bool = False,
                           log_skips: bool = True) -> tuple[Any, dict[str, Any], int]:
    """Restores the newest step that is intact, skipping corrupt ones.

    Each skipped step is logged with the reason and listed in
    :attr:`skipped_steps`. Fingerprint and layout mismatches are not skipped:
    they concern every step and are raised.

    Args:
      abstract_state: as for :meth:`restore`.
      delete_invalid: delete the skipped steps, so that the resumed run can
        save its own checkpoints under those step numbers.
      log_skips: log each skipped step; False for a caller that reports
        :attr:`skipped_steps` and :attr:`skip_reasons` itself.

    Returns:
      ``(state, meta, step)``.

    Raises:
      CheckpointError: no checkpoint, or none restores
        (:class:`CorruptCheckpointError`).
    """
    self.skipped_steps = []
    self.skip_reasons = {}
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}", directory=self.directory)
    last_error: CorruptCheckpointError | None = None
    for step in reversed(steps):
      try:
        state, meta = self.restore(abstract_state, step)
      except CorruptCheckpointError as e:
        if log_skips:
          _log.warning("Skipping corrupt checkpoint step %d in %s: %s", step, self.directory, e.reason)
        self.skipped_steps.append(step)
        self.skip_reasons[step] = e.reason
        last_error = e
        continue
      if self.skipped_steps and log_skips:
        _log.warning("Restored step %d of %s instead of the newest, %d (skipped %s).", step,
                     self.directory, steps[-1], self.skipped_steps)
      if self.skipped_steps and delete_invalid:
        for bad in self.skipped_steps:
          self._manager.delete(bad)
      return state, meta, step
    raise CorruptCheckpointError(
        f"none of the checkpoints {steps} in {self.directory} restores (the oldest, step {steps[0]}: "
        f"{last_error.reason if last_error else '?'})", reason="all steps are corrupt",
        previous_step=None, directory=self.directory)

  def quarantine(self, step: int) -> str:
    """Moves checkpoint ``step`` out of the step list, keeping its files; returns where.

    A corrupt step left in place stays the newest: every resume would skip
    it again, and ``max_to_keep`` would count it and delete good older steps
    in its favour. Moved into ``<directory>-corrupt/<step>`` (``<step>.1``,
    ... if that exists), it can still be inspected or deleted by hand. All
    processes call it; process 0 moves the files.
    """
    step = int(step)
    parent = epath.Path(self.directory.rstrip("/") + "-corrupt")
    dest = parent / str(step)
    n = 0
    while dest.exists():
      n += 1
      dest = parent / f"{step}.{n}"
    if parallel.is_main_process():
      parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(dest)
    parallel.barrier(f"tas_jax.runtime.checkpoint.quarantine.{step}")
    self._manager.reload()
    return os.fspath(dest)

  # -- lifecycle -------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until background saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- internals -------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {self.directory}", directory=self.directory)
      return steps[-1]
    if int(step) not in steps:
      raise CheckpointError(f"no checkpoint step {step} in {self.directory}; it has {steps}",
                            directory=self.directory, step=int(step))
    return int(step)

  def _corrupt(self, step: int, reason: str) -> CorruptCheckpointError:
    older = [s for s in self.all_steps() if s < step]
    previous = older[-1] if older else None
    advice = (f"The previous checkpoint is step {previous}: restore_latest_valid() falls back to "
              f"the newest step that restores, or delete({step}) removes this one."
              if previous is not None else "There is no older checkpoint to fall back to.")
    return CorruptCheckpointError(
        f"checkpoint step {step} in {self.directory} is corrupt or incomplete ({reason}). {advice}",
        reason=reason, previous_step=previous, directory=self.directory, step=step)

  def _read_envelope(self, step: int) -> dict[str, Any]:
    try:
      envelope = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise self._corrupt(step, f"unreadable metadata, {one_line(e)}") from e
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
      raise self._corrupt(step, f"metadata without the {FORMAT!r} tag")
    return envelope

  def _check_fingerprint(self, step: int, envelope: Mapping[str, Any]) -> None:
    if self.fingerprint is None:
      return
    differences = fingerprint_differences(envelope.get("fingerprint"), self.fingerprint)
    if differences:
      listed = "; ".join(f"{k}: checkpoint has {old!r}, this run has {new!r}"
                         for k, (old, new) in differences.items())
      raise FingerprintMismatchError(
          f"checkpoint step {step} in {self.directory} was written by a different run "
          f"({listed}). Use another directory, or remove these checkpoints to start over.",
          differences=differences, directory=self.directory, step=step)

  def _check_directory_fingerprint(self) -> None:
    for step in reversed(self.all_steps()):
      try:
        envelope = self._read_envelope(step)
      except CorruptCheckpointError:
        continue  # reported by restore, where the caller can fall back
      self._check_fingerprint(step, envelope)
      return

  def _restore_failure(self, step: int, target: Any, error: BaseException) -> CheckpointError:
    """Tells a state that does not fit the checkpoint from damaged files."""
    try:
      metadata = self._manager.item_metadata(step)["state"]
      saved_tree = getattr(metadata, "tree", metadata)
    except Exception:  # pylint: disable=broad-except
      saved_tree = None
    if saved_tree is not None:
      problems = layout_problems(saved_tree, target)
      if problems:
        return IncompatibleCheckpointError(
            f"checkpoint step {step} in {self.directory} does not fit the requested state: "
            + "; ".join(problems), directory=self.directory, step=step)
    return self._corrupt(step, one_line(error))
