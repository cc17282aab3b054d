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

import dataclasses
import json
import logging
import os
import shlex
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from tas_jax.runtime import checkpoint as checkpoint_lib
from tas_jax import data as data_lib
from tas_jax.runtime.files import write_text
from tas_jax.runtime import metrics as metrics_lib
from tas_jax.runtime import parallel

log = logging.getLogger("tas_jax")

# Exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint:
# schedulers can requeue on it; errors exit with 2.
PREEMPTED = 3


class RunError(RuntimeError):
  """A run that cannot go on; the message says why and what to do."""


class Diverged(RunError):
  """A non-finite loss; the last good checkpoint is kept."""


# The command line of this program, quoted, for the lines that say how to
# resume; set by the command-line entry points.
_command: str | None = None


def set_command(argv: Sequence[str]) -> None:
  """Records the command that started this program (e.g. ``sys.orig_argv``)."""
  global _command
  _command = shlex.join(argv) if argv else None


def how_to_resume() -> str:
  """How to resume this run: rerun the same command, quoted when it is known."""
  return f"Rerun the same command to resume: {_command}" if _command else "Rerun the same command to resume."


@dataclasses.dataclass
class Run:
  """Process-wide state of one program run."""

  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  writer: metrics_lib.MetricWriter
  is_main: bool
  config_text: str = ""  # config.json as it will be written, once the checkpoints accept this run

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def start(config, workdir: str, distributed: Mapping[str, Any] | None = None) -> Run:
  """Distributed set-up, mesh, work directory, metric writer.

  ``distributed`` holds ``coordinator_address``, ``num_processes`` and
  ``process_id`` for a multi-process run (none needed on TPU pods and SLURM,
  where JAX detects them). ``config.num_devices`` (0 = all) limits the mesh.

  Writes ``config.json`` (the previous one is kept as ``config.prev.json`` if
  the configuration changed in keys that do not affect a resume). In a
  directory that holds checkpoints it is written only once
  :func:`open_checkpoints` has accepted this configuration, so a refused
  command leaves the record of the run that wrote them as it was.
  """
  parallel.initialize_distributed(**{k: v for k, v in (distributed or {}).items() if v is not None})
  n = int(config.get("num_devices", 0) or 0)
  if n and jax.process_count() > 1:
    raise RunError("num_devices applies to single-process runs only")
  if n > jax.device_count():
    raise RunError(f"num_devices={n} but only {jax.device_count()} devices are visible")
  mesh = parallel.make_mesh(jax.devices()[:n] if n else None)
  is_main = parallel.is_main_process()
  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  log.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(), jax.device_count(),
           jax.devices()[0].platform)
  run = Run(config, workdir, mesh, writer, is_main, json.dumps(config_dict(config), indent=1, sort_keys=True))
  if not os.path.isdir(run.path("checkpoints")):
    record_config(run)
  return run


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


def fingerprint(config, keys) -> dict:
  d = config_dict(config)
  return {k: d.get(k) for k in keys}


BAD_IMAGE_POLICIES = ("error", "skip")


def load_data(config) -> data_lib.Dataset:
  """The dataset a config names (``dataset``, ``data_dir``, ``download``, ``num_train_examples``).

  ``on_bad_image`` (default ``"error"``) decides what an unreadable file of an
  image tree does: ``"error"`` stops the run naming the file, ``"skip"``
  leaves it out with a warning.
  """
  policy = config.get("on_bad_image", "error") or "error"
  if policy not in BAD_IMAGE_POLICIES:
    raise RunError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {policy!r}")
  return data_lib.load(config.dataset, data_dir=config.get("data_dir") or None,
                       num_train_examples=config.get("num_train_examples") or None,
                       download=bool(config.get("download", False)), seed=int(config.get("data_seed", 0)),
                       on_bad_image=policy)


def device_batch(run: Run, dataset: data_lib.Dataset, split: str, indices: np.ndarray, step: int = 0,
                 augment: bool | None = None):
  """This process's part of a global batch, assembled into sharded global arrays.

  ``augment`` applies to streamed datasets only (host-side crops); in-memory
  images are augmented on device by the step.
  """
  local = data_lib.process_slice(indices, jax.process_index(), jax.process_count())
  # Streamed batches are flipped on device with the in-memory ones, not on the host too.
  images, labels = data_lib.get_batch(dataset, split, local, seed=int(run.config.seed), step=step, augment=augment,
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
    ckpt = checkpoint_lib.Checkpointer(run.path("checkpoints"), max_to_keep=int(run.config.get("keep_checkpoints", 2)),
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
