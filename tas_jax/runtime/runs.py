"""A run and its directory: set-up, configuration record, data, device batches, checkpoints to resume from.

A run lives in a work directory: ``config.json``, ``checkpoints/``,
``metrics.jsonl``, TensorBoard events in ``tb/``, and whatever the program
writes. Rerunning the same command resumes from the newest valid checkpoint;
a checkpoint of another configuration is refused. Position in the data is the
global step, and every random draw of a step comes from ``fold_in(seed,
step)``, so a resumed run repeats exactly what an uninterrupted one does.
What the policies are (checkpoints, corrupt steps, signals, non-finite
losses, exit codes) is written down in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from tas_jax.runtime import checkpoint as checkpoint_lib
from tas_jax import data as data_lib
from tas_jax.runtime.files import read_json, write_text
from tas_jax.runtime import metrics as metrics_lib
from tas_jax.runtime import lock as lock_lib
from tas_jax.runtime import parallel
from tas_jax.runtime import settings as settings_lib

log = logging.getLogger("tas_jax")

# Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint:
# schedulers can requeue on it; errors exit with 2.
PREEMPTED = 3


class RunError(RuntimeError):
  """A run that cannot go on; the message says why and what to do."""


class Diverged(RunError):
  """A non-finite loss; the last good checkpoint is kept."""


def resume_hint(command: str = "") -> str:
  """How to resume a run: rerun the same command, quoted when it is known."""
  return f"Rerun the same command to resume: {command}" if command else "Rerun the same command to resume."


@dataclasses.dataclass
class Run:
  """Process-wide state of one program run."""

  workdir: str
  mesh: jax.sharding.Mesh
  writer: metrics_lib.MetricWriter
  is_main: bool
  seed: int  # the run's seed: data order and every random draw of a step
  keep_checkpoints: int = 2
  config_text: str = ""  # config.json as it will be written, once the checkpoints accept this run
  command: str = ""  # the command that started the program, quoted, for the lines that say how to resume
  lock: lock_lib.DirectoryLock | None = None  # held by process 0 from start to close

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def close(self) -> None:
    """Closes the metric files and frees the work directory (idempotent; every exit of a program calls it)."""
    self.writer.close()
    if self.lock is not None:
      self.lock.release()


def start(workdir: str, record: Mapping[str, Any], *, seed: int, num_devices: int = 0, keep_checkpoints: int = 2,
          distributed: Mapping[str, Any] | None = None, command: str = "") -> Run:
  """Distributed set-up, mesh, the work directory's lock, metric writer.

  ``record`` is the resolved configuration ``config.json`` keeps.
  ``distributed`` holds ``coordinator_address``, ``num_processes`` and
  ``process_id`` for a multi-process run (none needed on TPU pods and SLURM,
  where JAX detects them). ``num_devices`` (0 = all) limits the mesh.
  ``command`` (quoted) is what the run tells the user to rerun to resume.

  Writes ``config.json`` (the previous one is kept as ``config.prev.json`` if
  the configuration changed in keys that do not affect a resume). In a
  directory that holds checkpoints it is written only once
  :func:`open_checkpoints` has accepted this configuration, so a refused
  command leaves the record of the run that wrote them as it was.

  Process 0 holds the directory's lock (:mod:`tas_jax.runtime.lock`) until
  :meth:`Run.close`; a directory another live run holds is refused
  (:class:`RunError`) before anything in it is touched.
  """
  parallel.initialize_distributed(**{k: v for k, v in (distributed or {}).items() if v is not None})
  n = int(num_devices)
  if n and jax.process_count() > 1:
    raise RunError("num_devices applies to single-process runs only")
  if n > jax.device_count():
    raise RunError(f"num_devices={n} but only {jax.device_count()} devices are visible")
  mesh = parallel.make_mesh(jax.devices()[:n] if n else None)
  is_main = parallel.is_main_process()
  held = claim(workdir)  # before anything in the directory is opened, cleaned or written
  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  log.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(), jax.device_count(),
           jax.devices()[0].platform)
  run = Run(workdir, mesh, writer, is_main, int(seed), int(keep_checkpoints),
            json.dumps(dict(record), indent=1, sort_keys=True), command, held)
  if not os.path.isdir(run.path("checkpoints")):
    record_config(run)
  return run


@contextlib.contextmanager
def opened(workdir: str, settings: settings_lib.RunSettings, distributed: Mapping[str, Any] | None = None,
           command: str = ""):
  """``with opened(workdir, settings) as run:`` a started run (:func:`start`) with its settings' seed, devices and
  checkpoints to keep, closed (its lock freed) however the block ends."""
  run = start(workdir, settings.record(), seed=settings.seed, num_devices=settings.num_devices,
              keep_checkpoints=settings.keep_checkpoints, distributed=distributed, command=command)
  try:
    yield run
  finally:
    run.close()


def claim(workdir: str) -> lock_lib.DirectoryLock | None:
  """The work directory's lock, taken by process 0 (None elsewhere, and for remote paths).

  Every process calls it; all of them raise :class:`RunError` when another
  live run holds the directory.
  """
  held, refusal = None, None
  if parallel.is_main_process():
    try:
      held = lock_lib.lock(workdir)
    except lock_lib.LockError as e:
      refusal = str(e)
  if not parallel.all_processes(refusal is None):
    raise RunError(refusal or f"process 0 could not lock {workdir}")
  return held


def record_config(run: Run) -> None:
  """Writes ``config.json``, keeping a different previous one as ``config.prev.json``."""
  if not run.is_main or not run.config_text:
    return
  path = run.path("config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old == run.config_text:
      return
    write_text(run.path("config.prev.json"), old)
  write_text(path, run.config_text)


def finished_result(run: Run, keys: Sequence[str]) -> dict | None:
  """The result of a run that finished in this directory, or None.

  A finished run is done: rerunning its command reports this result and
  changes nothing. One that finished under a configuration that differs in
  one of ``keys`` (the trajectory-changing ones) is refused, naming them.
  """
  result = read_json(run.path("result.json"))
  if not result.get("finished"):
    return None
  recorded, now = read_json(run.path("config.json")), json.loads(run.config_text or "{}")
  changed = {k: (recorded[k], now.get(k)) for k in keys if k in recorded and recorded[k] != now.get(k)}
  if changed:
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
    raise RunError(f"{run.workdir} holds a run that finished under another configuration ({listed}); "
                   f"use another --workdir")
  log.info("%s finished already; nothing to do (its result: %s)", run.workdir, run.path("result.json"))
  return result


def load_data(spec: settings_lib.DataSettings) -> data_lib.Dataset:
  """The dataset of a run's data settings; one with fewer than two classes is refused.

  ``on_bad_image`` decides what an unreadable file of an image tree does:
  ``"error"`` stops the run naming the file, ``"skip"`` leaves it out with a
  warning.
  """
  dataset = data_lib.load(spec.dataset, data_dir=spec.data_dir or None,
                          num_train_examples=spec.num_train_examples or None, download=spec.download,
                          seed=spec.data_seed, on_bad_image=spec.on_bad_image)
  if dataset.num_classes < 2:  # every prediction would be right: accuracy 1.0 that means nothing
    raise RunError(f"the dataset {spec.dataset} has {dataset.num_classes} class; a classifier needs at least two")
  return dataset


def data_fingerprint(dataset: data_lib.Dataset) -> dict:
  """What identifies the data a network was trained on (recorded in ``result.json`` as ``data``).

  The training subset size is left out: a teacher trained on the whole set
  serves a student trained on part of it.
  """
  return {"name": dataset.name, "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names),
          "image_size": int(dataset.image_size), "test_examples": int(dataset.num_examples("test"))}


def inference_record(dataset: data_lib.Dataset) -> dict:
  """What a saved network needs to be used on raw images: input layout and size, normalisation, class names."""
  return {"input": "uint8 RGB images, NHWC", "image_size": int(dataset.image_size),
          "mean": [float(m) for m in dataset.mean], "std": [float(s) for s in dataset.std],
          "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names), "dataset": dataset.name}


def check_same_data(source: str, what: str, dataset: data_lib.Dataset, allow_foreign: bool) -> None:
  """Refuses a run directory (a teacher, a run to inherit from) whose network was trained on other data.

  Compares the ``data`` record of ``source``'s ``result.json`` with
  ``dataset``; a source recorded before such records existed is accepted with
  a warning. ``allow_foreign`` accepts a difference, with a warning.
  """
  recorded = read_json(os.path.join(source, "result.json")).get("data")
  if not isinstance(recorded, dict):
    log.warning("%s %s records no data fingerprint; its dataset cannot be checked against %s", what, source,
                dataset.name)
    return
  now = data_fingerprint(dataset)
  diffs = [f"{k}: {recorded.get(k)!r} there, {now[k]!r} here" for k in now if k in recorded and recorded[k] != now[k]
           and k != "class_names"]
  if not diffs and recorded.get("class_names", now["class_names"]) != now["class_names"]:
    diffs.append("class names differ")
  if not diffs:
    return
  text = f"{what} {source} was trained on other data ({'; '.join(diffs)})"
  if not allow_foreign:
    raise RunError(f"{text}; set config.allow_foreign_teacher=True if that is meant")
  log.warning("%s; used anyway (allow_foreign_teacher)", text)


def device_batch(run: Run, dataset: data_lib.Dataset, split: str, indices: np.ndarray, step: int = 0,
                 augment: bool | None = None):
  """This process's part of a global batch, assembled into sharded global arrays.

  ``augment`` applies to streamed datasets only (host-side crops); in-memory
  images are augmented on device by the step.
  """
  local = data_lib.process_slice(indices, jax.process_index(), jax.process_count())
  # Streamed batches are flipped on device with the in-memory ones, not on the host too.
  images, labels = data_lib.get_batch(dataset, split, local, seed=run.seed, step=step, augment=augment,
                                      flip=False)
  return parallel.global_batch(run.mesh, {"images": np.asarray(images), "labels": np.asarray(labels, np.int32)})


def step_key(seed: int, step) -> jax.Array:
  """The key of one global step: the same whatever the device count, and after a resume."""
  return jax.random.fold_in(jax.random.key(seed), step)


def check_batch_size(batch_size: int) -> None:
  try:
    parallel.local_batch_size(batch_size)
  except ValueError as e:
    raise RunError(str(e)) from None


LOOP_META = "_loop"


def checkpoint_meta(meta: Mapping[str, Any], carry: Mapping[str, Any] | None) -> dict:
  """A checkpoint's meta with the loop's carry of its step (see :func:`tas_jax.runtime.loop.make_loop`)."""
  return {**meta, LOOP_META: dict(carry)} if carry else dict(meta)


def resumed_carry(meta: Mapping[str, Any]) -> dict | None:
  """The loop's carry stored with the checkpoint a run resumed from (None: it was saved at an epoch's end)."""
  return meta.get(LOOP_META)


def open_checkpoints(run: Run, fingerprint: Mapping[str, Any]) -> checkpoint_lib.Checkpointer:
  """The run's Checkpointer; refuses checkpoints written under another fingerprint.

  Only once they are accepted is ``config.json`` brought up to date.
  """
  try:
    ckpt = checkpoint_lib.Checkpointer(run.path("checkpoints"), max_to_keep=run.keep_checkpoints,
                                       fingerprint=dict(fingerprint))
  except checkpoint_lib.FingerprintMismatchError as e:
    listed = "; ".join(f"{k}: checkpoint has {old!r}, this run has {new!r}" for k, (old, new) in e.differences.items())
    raise RunError(f"the checkpoints in {e.directory} were written by a different configuration ({listed}); "
                   "rerun with the configuration that wrote them, or use another --workdir") from None
  except checkpoint_lib.CheckpointError as e:
    raise RunError(f"{e} (use another --workdir, or rerun with the configuration that wrote it)") from None
  record_config(run)
  return ckpt


def restore(run: Run, ckpt: checkpoint_lib.Checkpointer, state):
  """Resume from the newest valid checkpoint, or keep ``state`` if there is none.

  Returns ``(state, meta, step)``. Corrupt newer checkpoints are skipped: the
  run resumes from the previous valid one, says so in one warning line, and
  moves the corrupt ones into ``checkpoints-corrupt/`` (kept, not deleted).
  If none restores the run is refused. Metric records of steps after the
  restored one (or all of them, starting afresh) are dropped: the run
  repeats those steps and writes them again.
  """
  if ckpt.latest_step() is None:
    run.writer.truncate_after(-1)
    return state, {}, 0
  try:
    restored, meta, step = ckpt.restore_latest_valid(state, log_skips=False)
  except checkpoint_lib.CorruptCheckpointError as e:
    raise RunError(f"{e}; nothing to resume from: move {ckpt.directory} away to start afresh") from None
  except checkpoint_lib.CheckpointError as e:
    raise RunError(str(e)) from None
  skipped = sorted(ckpt.skipped_steps, reverse=True)
  if skipped:
    moved = [ckpt.quarantine(bad) for bad in skipped]
    if run.is_main:
      reasons = "; ".join(f"step {bad}: {_clip(ckpt.skip_reasons.get(bad, '?'), 160)}" for bad in skipped)
      names = ", ".join(str(bad) for bad in skipped)
      print(f"warning: checkpoint step {names} in {ckpt.directory} is corrupt ({reasons}); resuming from the "
            f"previous valid checkpoint, step {step}; the corrupt files were moved to "
            f"{os.path.dirname(moved[0])}", file=sys.stderr, flush=True)
  run.writer.truncate_after(step)
  return restored, dict(meta), step


def _clip(text: str, limit: int) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def logged(run: Run, step: int, key: str) -> bool:
  """Whether ``metrics.jsonl`` holds a record of ``step`` with ``key``."""
  return any(r.get("step") == step and key in r for r in metrics_lib.read_metrics(run.writer.path))


def keep_records(run: Run, name: str, keep: Callable[[dict], bool]) -> int:
  """Rewrites the JSON-lines file ``name`` of the run with the records ``keep`` accepts; returns how many went.

  For a program's own logs (one record per epoch, say) when it resumes:
  records of steps it is about to repeat would otherwise appear twice.
  Unreadable lines (a write cut short by a kill) are dropped too. The
  rewrite is atomic.
  """
  path = run.path(name)
  if not run.is_main or not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if keep(record):
      kept.append(json.dumps(record) + "\n")
  if len(kept) != len(lines):
    write_text(path, "".join(kept))
  return len(lines) - len(kept)


def replicate(run: Run, tree):
  return parallel.replicate(tree, run.mesh)
