"""The step loop shared by the search and training programs: logging, epoch averages, checkpoints, preemption.

What the policies are (checkpoints, non-finite losses, signals, exit codes)
is written down in docs/RELIABILITY.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax.runtime import preemption
from tas_jax.runtime import metrics as metrics_lib
from tas_jax.runtime.runs import PREEMPTED, Diverged, Run, resume_hint

log = logging.getLogger("tas_jax")


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

  The console: the progress bar (plain lines in logs) shows the ``headline``
  metrics, and its ETA comes from the steady-state step time (the first
  step, which compiles, is reported once on its own); ``epoch_line(epoch,
  record)`` turns each epoch's record (the ``epoch_`` averages and what
  ``on_epoch`` returned) into one summary line.
  """

  def __init__(self, run: Run, *, total_steps: int, steps_per_epoch: int, log_every: int, checkpoint_every: int,
               save: Callable, on_epoch: Callable | None = None, describe: Callable[[int], dict] | None = None,
               stop_after: int = 0, resumed: Mapping[str, Any] | None = None, headline: Sequence[str] = (),
               epoch_line: Callable[[int, dict], str] | None = None):
    self.run, self.total, self.spe = run, total_steps, steps_per_epoch
    self.headline, self.epoch_line = tuple(headline), epoch_line
    self.stop_after = stop_after
    self.log_every, self.checkpoint_every = max(1, log_every), max(0, checkpoint_every)
    self.save, self.on_epoch, self.describe = save, on_epoch, describe or (lambda step: {})
    self.resume_hint = resume_hint(run.command)
    self.resumed = dict(resumed or {})  # the carry of the checkpoint the run resumes from

  def __call__(self, state, start_step: int, step_fn: Callable):
    run = self.run
    progress = metrics_lib.Progress(self.total, initial=start_step, desc=os.path.basename(run.workdir.rstrip("/")),
                                    enabled=run.is_main)
    # Epoch averages are running float32 sums on the device, added in step
    # order; a checkpoint inside an epoch carries the sums so far, so a
    # resumed run averages exactly what an uninterrupted one does.
    epoch_sums, epoch_count, carried = None, 0, None
    resumed = self.resumed
    if resumed.get("step") == start_step and start_step % self.spe:
      carried, epoch_count = dict(resumed.get("sums") or {}), int(resumed.get("count", 0))
    # A resumed run starts at its checkpoint; a fresh one has none yet.
    saved_at = start_step if start_step else None
    finite_at = start_step  # the last step whose metrics were seen finite
    step = start_step
    first_epoch_end = True
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
          shown = [k for k in self.headline if k in values] or list(values)[:3]
          progress.set_postfix({k: values[k] for k in shown})
        if end_of_epoch:
          epoch_end_t0 = time.monotonic()
          epoch = (step - 1) // self.spe
          averaged = {k: v / epoch_count for k, v in host_scalars(epoch_sums).items()}
          epoch_sums, epoch_count = None, 0
          if not finite(averaged):
            progress.close()
            raise self._diverged(f"non-finite loss in epoch {epoch}, which ended at step {step} "
                                 f"({_fmt(_non_finite_first(averaged))})", finite_at, saved_at)
          extra = self.on_epoch(state, epoch, averaged) if self.on_epoch else {}
          record = {f"epoch_{k}": v for k, v in averaged.items()}
          run.writer.write(step, record, epoch=epoch, **(extra or {}))
          if self.epoch_line is not None:
            progress.write(self.epoch_line(epoch, {**record, **(extra or {})}))
        stop = guard.should_stop() if (step % 10 == 0 or end_of_epoch) else False
        if (end_of_epoch or stop or step == end or
            (self.checkpoint_every and step % self.checkpoint_every == 0)):
          last = host_scalars(m)
          if not finite(last):  # never let a diverged state replace a good checkpoint
            progress.close()
            raise self._diverged(f"non-finite loss at step {step} ({_fmt(_non_finite_first(last))})",
                                 finite_at, saved_at)
          carry = ({"step": step, "count": epoch_count, "sums": host_scalars(epoch_sums)}
                   if epoch_count else None)
          self.save(state, step, carry)
          saved_at = step
        if end_of_epoch and first_epoch_end:  # its evaluation and checkpoint compile: no part of the ETA
          progress.exclude(time.monotonic() - epoch_end_t0)
          first_epoch_end = False
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


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How often a loop logs and checkpoints, and after how many steps of this invocation it stops (0: never)."""

  log_every: int
  checkpoint_every: int
  stop_after: int = 0


def make_loop(run: Run, cadence: Cadence, *, total_steps: int, steps_per_epoch: int, save: Callable,
              on_epoch: Callable | None = None, resumed: Mapping[str, Any] | None = None, headline: Sequence[str] = (),
              epoch_line: Callable[[int, dict], str] | None = None) -> Loop:
  """The step loop of a program at the given cadence.

  ``save(state, step, carry)`` writes a checkpoint; ``carry`` (None at an epoch
  boundary) is what the loop needs to continue exactly from that step, to be
  stored with it (:func:`tas_jax.runtime.runs.checkpoint_meta`) and handed back
  as ``resumed`` when the run resumes from it.
  """
  return Loop(run, total_steps=total_steps, steps_per_epoch=steps_per_epoch, log_every=cadence.log_every,
              checkpoint_every=cadence.checkpoint_every, save=save, on_epoch=on_epoch,
              describe=lambda step: {"epoch": step // steps_per_epoch}, stop_after=cadence.stop_after,
              resumed=resumed, headline=headline, epoch_line=epoch_line)


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
