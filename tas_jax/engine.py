"""What the search and training programs share: run set-up, device batches, and the step loop.

A run lives in a work directory: ``config.json``, ``checkpoints/``,
``metrics.jsonl``, TensorBoard events in ``tb/``, and whatever the program
writes. Rerunning the same command resumes from the newest valid checkpoint;
a checkpoint of another configuration is refused. Position in the data is the
global step, and every random draw of a step comes from ``fold_in(seed,
step)``, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax import checkpoint as checkpoint_lib
from tas_jax import data as data_lib
from tas_jax import metrics as metrics_lib
from tas_jax import parallel
from tas_jax import preemption

log = logging.getLogger("tas_jax")


class RunError(RuntimeError):
  """A run that cannot go on; the message says why and what to do."""


class Diverged(RunError):
  """A non-finite loss; the last good checkpoint is kept."""


@dataclasses.dataclass
class Run:
  """Process-wide state of one program run."""

  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  writer: metrics_lib.MetricWriter
  is_main: bool

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
  the configuration changed in keys that do not affect a resume).
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
  if is_main:
    path = os.path.join(workdir, "config.json")
    text = json.dumps(config_dict(config), indent=1, sort_keys=True)
    if os.path.exists(path):
      with open(path) as f:
        old = f.read()
      if old != text:
        _atomic_write(os.path.join(workdir, "config.prev.json"), old)
    _atomic_write(path, text)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  log.info("process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(), jax.device_count(),
           jax.devices()[0].platform)
  return Run(config, workdir, mesh, writer, is_main)


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj) -> None:
  _atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=metrics_lib.to_json_value) + "\n")


def fingerprint(config, keys) -> dict:
  d = config_dict(config)
  return {k: d.get(k) for k in keys}


def load_data(config) -> data_lib.Dataset:
  """The dataset a config names (``dataset``, ``data_dir``, ``download``, ``num_train_examples``)."""
  return data_lib.load(config.dataset, data_dir=config.get("data_dir") or None,
                       num_train_examples=config.get("num_train_examples") or None,
                       download=bool(config.get("download", False)), seed=int(config.get("data_seed", 0)))


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


def open_checkpoints(run: Run, fingerprint: Mapping[str, Any]) -> checkpoint_lib.Checkpointer:
  try:
    return checkpoint_lib.Checkpointer(run.path("checkpoints"), max_to_keep=int(run.config.get("keep_checkpoints", 2)),
                                       fingerprint=dict(fingerprint))
  except checkpoint_lib.CheckpointError as e:
    raise RunError(f"{e} (use another --workdir, or rerun with the configuration that wrote it)") from None


def restore(run: Run, ckpt: checkpoint_lib.Checkpointer, state):
  """Resume from the newest valid checkpoint, or keep ``state`` if there is none.

  Returns ``(state, meta, step)``; damaged newer checkpoints are reported and skipped.
  """
  if ckpt.latest_step() is None:
    return state, {}, 0
  try:
    restored, meta, step = ckpt.restore_latest_valid(state)
  except checkpoint_lib.CheckpointError as e:
    raise RunError(str(e)) from None
  if restored is None:
    raise RunError(f"no checkpoint in {ckpt.directory} could be restored; move it away to start afresh")
  for bad in getattr(ckpt, "skipped_steps", []):
    log.warning("checkpoint %s is damaged and was skipped", bad)
  run.writer.truncate_after(step)
  return restored, meta, step


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
  ends. A non-finite loss stops the run without saving, keeping the last good
  checkpoint. SIGTERM/SIGINT save and exit with a line that says how to resume.
  """

  def __init__(self, run: Run, *, total_steps: int, steps_per_epoch: int, log_every: int, checkpoint_every: int,
               save: Callable, on_epoch: Callable | None = None, describe: Callable[[int], dict] | None = None,
               resume_hint: str = "", stop_after: int = 0):
    self.run, self.total, self.spe = run, total_steps, steps_per_epoch
    self.stop_after = stop_after
    self.log_every, self.checkpoint_every = max(1, log_every), max(0, checkpoint_every)
    self.save, self.on_epoch, self.describe = save, on_epoch, describe or (lambda step: {})
    self.resume_hint = resume_hint

  def __call__(self, state, start_step: int, step_fn: Callable):
    run = self.run
    progress = metrics_lib.Progress(self.total, initial=start_step, desc=os.path.basename(run.workdir.rstrip("/")),
                                    enabled=run.is_main)
    epoch_metrics: list = []
    saved_at = start_step
    step = start_step
    end = min(self.total, start_step + self.stop_after) if self.stop_after else self.total
    with preemption.PreemptionGuard() as guard:
      while step < end:
        state, m = step_fn(state, step)
        epoch_metrics.append(m)
        step += 1
        progress.update(1)
        end_of_epoch = step % self.spe == 0 or step == self.total
        if step % self.log_every == 0 or end_of_epoch:
          values = host_scalars(m)
          if not finite(values):
            progress.close()
            raise Diverged(f"non-finite loss at step {step} ({_fmt(values)}); the last good checkpoint "
                           f"(step {saved_at}) is kept; lower the learning rate or check the data")
          values.update(self.describe(step - 1))
          run.writer.write(step, values)
          progress.set_postfix({k: values[k] for k in list(values)[:3]})
        if end_of_epoch:
          epoch = (step - 1) // self.spe
          averaged = host_scalars(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *epoch_metrics))
          epoch_metrics = []
          if not finite(averaged):
            progress.close()
            raise Diverged(f"non-finite loss in epoch {epoch} (step {step}); the last good checkpoint "
                           f"(step {saved_at}) is kept")
          extra = self.on_epoch(state, epoch, averaged) if self.on_epoch else {}
          run.writer.write(step, {f"epoch_{k}": v for k, v in averaged.items()}, epoch=epoch, **(extra or {}))
        stop = guard.should_stop() if (step % 10 == 0 or end_of_epoch) else False
        if (end_of_epoch or stop or step == end or
            (self.checkpoint_every and step % self.checkpoint_every == 0)):
          if not finite(host_scalars(m)):  # never let a diverged state replace a good checkpoint
            progress.close()
            raise Diverged(f"non-finite loss at step {step}; the last good checkpoint (step {saved_at}) is kept")
          self.save(state, step)
          saved_at = step
        if stop:
          progress.close()
          msg = guard.resume_message(step, run.workdir) if hasattr(guard, "resume_message") else ""
          print(f"stopped by {guard.signal_name} at step {step}/{self.total}; checkpoint saved. "
                f"{self.resume_hint or msg}", file=sys.stderr)
          raise SystemExit(3)
    progress.close()
    self.finished = end >= self.total
    if end < self.total:
      print(f"stopped after {self.stop_after} steps at step {end}/{self.total}; checkpoint saved. "
            f"{self.resume_hint}", file=sys.stderr)
    return state


def _fmt(values: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={v:.4g}" for k, v in list(values.items())[:6])


def timed(fn, *args):
  t = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t


class Evaluator:
  """Top-1 and top-5 accuracy of ``logits_fn(state, images_uint8)`` over examples of a split.

  Batches have one static size (the last one padded and masked), so the
  jitted evaluation compiles once.
  """

  def __init__(self, run: Run, dataset: data_lib.Dataset, split: str, indices: np.ndarray, batch_size: int,
               logits_fn: Callable):
    self.run, self.dataset, self.split = run, dataset, split
    self.indices = np.asarray(indices)
    self.batch_size = batch_size
    repl = parallel.replicated(run.mesh)

    def counts(state, images, labels, valid):
      logits = logits_fn(state, images).astype(jnp.float32)
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
      total = total + self._counts(state, b["images"], b["labels"], v)
    hits = np.asarray(jax.device_get(total))
    return float(hits[0] / n), float(hits[1] / n)
