"""What the search and training programs share: run set-up, device batches, and the step loop.

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
import math
import os
import shlex
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax import checkpoint as checkpoint_lib
from tas_jax import data as data_lib
from tas_jax import metrics as metrics_lib
from tas_jax import parallel
from tas_jax import preemption

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
  # What the Loop needs beyond the state to continue exactly (the running sums
  # of a partly done epoch): restored with a checkpoint, saved with the next.
  resumed_loop: dict | None = None
  loop_carry: dict | None = None

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


def write_text(path: str, text: str) -> None:
  """Replaces ``path`` with ``text`` atomically: a reader sees the old file or the new one, never a part."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=metrics_lib.to_json_value) + "\n")


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


class _RunCheckpointer(checkpoint_lib.Checkpointer):
  """A Checkpointer that saves the Loop's carry of the step with the caller's meta."""

  def __init__(self, run: Run, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._run = run

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    carry = self._run.loop_carry
    if carry is not None and carry.get("step") == int(step):
      meta = {**(meta or {}), LOOP_META: carry}
    return super().save(step, state, meta, force)


def open_checkpoints(run: Run, fingerprint: Mapping[str, Any]) -> checkpoint_lib.Checkpointer:
  """The run's Checkpointer; refuses checkpoints written under another fingerprint.

  Only once they are accepted is ``config.json`` brought up to date.
  """
  try:
    ckpt = _RunCheckpointer(run, run.path("checkpoints"), max_to_keep=int(run.config.get("keep_checkpoints", 2)),
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
  meta = dict(meta)
  run.resumed_loop = meta.pop(LOOP_META, None)
  return restored, meta, step


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


def finite(values: Mapping[str, Any]) -> bool:
  return all(math.isfinite(float(v)) for v in values.values() if np.ndim(v) == 0)


def host_scalars(values: Mapping[str, Any]) -> dict:
  return {k: float(v) for k, v in jax.device_get(dict(values)).items() if np.ndim(v) == 0}


class Loop:
  """Drives ``step_fn`` from a resumed step to ``total_steps`` with logging, checkpoints and preemption.

  ``step_fn(state, step) -> (state, metrics)`` is called for every global
  step; ``on_epoch(state, epoch, epoch_metrics)`` at every epoch end (its
  returned dict is logged); ``save(state, step)`` persists a checkpoint.
  Metrics are pulled to the host only every ``log_every`` steps and at epoch
  ends. A non-finite loss stops the run (:class:`Diverged`) without saving or
  logging it, keeping the last good checkpoint. SIGTERM/SIGINT finish the
  step, save and exit with code 3 and a line that says how to resume; the
  stop request is polled every 10 steps, at epoch ends and after the last step.
  """

  def __init__(self, run: Run, *, total_steps: int, steps_per_epoch: int, log_every: int, checkpoint_every: int,
               save: Callable, on_epoch: Callable | None = None, describe: Callable[[int], dict] | None = None,
               resume_hint: str = "", stop_after: int = 0):
    self.run, self.total, self.spe = run, total_steps, steps_per_epoch
    self.stop_after = stop_after
    self.log_every, self.checkpoint_every = max(1, log_every), max(0, checkpoint_every)
    self.save, self.on_epoch, self.describe = save, on_epoch, describe or (lambda step: {})
    # The exact command beats a generic hint from the caller.
    self.resume_hint = resume_hint if resume_hint and not _command else how_to_resume()

  def __call__(self, state, start_step: int, step_fn: Callable):
    run = self.run
    progress = metrics_lib.Progress(self.total, initial=start_step, desc=os.path.basename(run.workdir.rstrip("/")),
                                    enabled=run.is_main)
    # Epoch averages are running float32 sums on the device, added in step
    # order; a checkpoint inside an epoch carries the sums so far, so a
    # resumed run averages exactly what an uninterrupted one does.
    epoch_sums, epoch_count, carried = None, 0, None
    resumed = run.resumed_loop or {}
    if resumed.get("step") == start_step and start_step % self.spe:
      carried, epoch_count = dict(resumed.get("sums") or {}), int(resumed.get("count", 0))
    # A resumed run starts at its checkpoint; a fresh one has none yet.
    saved_at = start_step if start_step else None
    finite_at = start_step  # the last step whose metrics were seen finite
    step = start_step
    end = min(self.total, start_step + self.stop_after) if self.stop_after else self.total
    with preemption.PreemptionGuard() as guard:
      while step < end:
        state, m = step_fn(state, step)
        if carried is not None:
          epoch_sums = _resume_sums(carried, m)
          epoch_count = epoch_count if epoch_sums is not None else 0
          carried = None
        epoch_sums = m if epoch_sums is None else _add(epoch_sums, m)
        epoch_count += 1
        step += 1
        progress.update(1)
        end_of_epoch = step % self.spe == 0 or step == self.total
        if step % self.log_every == 0 or end_of_epoch:
          values = host_scalars(m)
          if not finite(values):
            progress.close()
            raise self._diverged(f"non-finite loss at step {step} ({_fmt(_non_finite_first(values))})",
                                 finite_at, saved_at)
          finite_at = step
          values.update(self.describe(step - 1))
          run.writer.write(step, values)
          progress.set_postfix({k: values[k] for k in list(values)[:3]})
        if end_of_epoch:
          epoch = (step - 1) // self.spe
          averaged = {k: v / epoch_count for k, v in host_scalars(epoch_sums).items()}
          epoch_sums, epoch_count = None, 0
          if not finite(averaged):
            progress.close()
            raise self._diverged(f"non-finite loss in epoch {epoch}, which ended at step {step} "
                                 f"({_fmt(_non_finite_first(averaged))})", finite_at, saved_at)
          extra = self.on_epoch(state, epoch, averaged) if self.on_epoch else {}
          run.writer.write(step, {f"epoch_{k}": v for k, v in averaged.items()}, epoch=epoch, **(extra or {}))
        stop = guard.should_stop() if (step % 10 == 0 or end_of_epoch) else False
        if (end_of_epoch or stop or step == end or
            (self.checkpoint_every and step % self.checkpoint_every == 0)):
          last = host_scalars(m)
          if not finite(last):  # never let a diverged state replace a good checkpoint
            progress.close()
            raise self._diverged(f"non-finite loss at step {step} ({_fmt(_non_finite_first(last))})",
                                 finite_at, saved_at)
          run.loop_carry = ({"step": step, "count": epoch_count, "sums": host_scalars(epoch_sums)}
                            if epoch_count else None)
          self.save(state, step)
          saved_at = step
        if stop:
          self._preempted(progress, guard, step)
      # A signal after the last poll: the last step is saved, but what follows
      # (evaluation, final outputs) may outlast the scheduler's grace period.
      if step > start_step and guard.should_stop():
        self._preempted(progress, guard, step)
    progress.close()
    self.finished = end >= self.total
    if end < self.total and run.is_main:
      print(f"stopped after {self.stop_after} steps at step {end}/{self.total}; checkpoint of step {end} saved. "
            f"{self.resume_hint}", file=sys.stderr, flush=True)
    return state

  def _preempted(self, progress, guard, step: int):
    progress.close()
    if self.run.is_main:
      print(f"stopped by {guard.signal_name} at step {step}/{self.total}; checkpoint of step {step} saved. "
            f"{self.resume_hint}", file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED)

  def _diverged(self, what: str, finite_at: int, saved_at: int | None) -> Diverged:
    seen = f"the last finite check was at step {finite_at}" if finite_at else "no finite check before it"
    kept = (f"the last good checkpoint, step {saved_at}, is kept" if saved_at is not None
            else "no checkpoint was written (the run had not saved yet)")
    return Diverged(f"{what}; {seen}; {kept}. Lower the learning rate or check the data, in another --workdir "
                    "(the learning rate is part of the checkpoints' fingerprint)")


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _resume_sums(carried: Mapping[str, float], metrics):
  """The epoch sums of a checkpoint as arrays of the metrics' dtypes (float32 values round-trip exactly)."""
  if set(carried) != {k for k, v in metrics.items() if np.ndim(v) == 0}:
    log.warning("the checkpoint's epoch sums do not match this run's metrics; this epoch's averages start afresh")
    return None
  return {k: jnp.asarray(carried[k], dtype=v.dtype) if k in carried else jnp.zeros_like(v) for k, v in metrics.items()}


def _fmt(values: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in list(values.items())[:6])


def _non_finite_first(values: Mapping[str, float]) -> dict:
  """The values with the non-finite ones first, so a shortened list still names them."""
  return dict(sorted(values.items(), key=lambda kv: math.isfinite(kv[1])))


def timed(fn, *args):
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t


class Evaluator:
  """Top-1 and top-5 accuracy of ``logits_fn(state, images_uint8)`` over examples of a split.

  Batches have one static size (the last one padded and masked), so the
  jitted evaluation compiles once. With ``with_index`` the function also gets
  the batch's position, ``logits_fn(state, images, index)``, for evaluations
  that draw randomness per batch.
  """

  def __init__(self, run: Run, dataset: data_lib.Dataset, split: str, indices: np.ndarray, batch_size: int,
               logits_fn: Callable, with_index: bool = False):
    self.run, self.dataset, self.split = run, dataset, split
    self.indices = np.asarray(indices)
    self.batch_size = batch_size
    repl = parallel.replicated(run.mesh)

    def counts(state, images, labels, valid, index):
      logits = (logits_fn(state, images, index) if with_index else logits_fn(state, images)).astype(jnp.float32)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      hit1 = (top5[:, 0] == labels) & valid
      hit5 = (top5 == labels[:, None]).any(-1) & valid
      return jnp.stack([hit1.sum(), hit5.sum()])

    self._counts = jax.jit(counts, out_shardings=repl)

  def __call__(self, state) -> tuple[float, float]:
    n = len(self.indices)
    if n == 0:
      return float("nan"), float("nan")
    total = jnp.zeros(2, jnp.int32)
    for start in range(0, n, self.batch_size):
      idx = self.indices[start:start + self.batch_size]
      valid = np.zeros(self.batch_size, bool)
      valid[: len(idx)] = True
      idx = np.concatenate([idx, np.full(self.batch_size - len(idx), idx[0])])
      b = device_batch(self.run, self.dataset, self.split, idx, augment=False)
      v = parallel.global_batch(self.run.mesh, data_lib.process_slice(valid, jax.process_index(), jax.process_count()))
      total = total + self._counts(state, b["images"], b["labels"], v, jnp.int32(start))
    hits = np.asarray(jax.device_get(total))
    return float(hits[0] / n), float(hits[1] / n)


def make_loop(run: Run, config, *, total_steps: int, steps_per_epoch: int, save: Callable,
              on_epoch: Callable | None = None) -> Loop:
  """The step loop of a program, with the cadences and the early stop its config names."""
  return Loop(run, total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=int(config.log_every_steps),
              checkpoint_every=int(config.checkpoint_every_steps), save=save, on_epoch=on_epoch,
              describe=lambda step: {"epoch": step // steps_per_epoch},
              resume_hint="Rerun the same command to resume.",
              stop_after=int(config.get("stop_after_steps", 0) or 0))


def drive(run: Run, loop: Loop, state, start: int, step_fn: Callable, prefetch, ckpt):
  """Run ``loop`` from ``start``; the final state, or None when it stopped early (outputs closed)."""
  try:
    state = loop(state, start, step_fn)
  finally:
    prefetch.close()
    ckpt.wait()
  if not loop.finished:
    run.writer.close()
    ckpt.close()
    return None
  return state
