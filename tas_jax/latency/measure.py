"""Measured inference latency of pruned networks on the current device.

MACs say little about speed on accelerators (METHOD.md §7.3): a network with
half the MACs is often far less than twice as fast, so the toolkit reports
measured time beside the counts. The protocol:
build the network of a shape (eval mode, random weights: time does not depend
on their values), jit its forward for one batch size, run it once to compile
and ``warmup`` more times, then time ``runs`` calls, each waited for with
``block_until_ready``, and report the median with the minimum and maximum.
Networks that are compared are timed interleaved (:func:`compare_latency`).
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tas_jax.nets import resnet
from tas_jax.core.shapes import Shape


def _compiled(shape: Shape, batch_size: int, dtype, seed: int):
  """A zero-argument call running the eval-mode forward of ``shape``'s network on one batch, and its compile time."""
  model = resnet.build(shape, seed, dtype)
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    return nnx.merge(graphdef, state)(images)

  images = jax.random.normal(jax.random.key(seed), (batch_size, shape.image_size, shape.image_size,
                                                     shape.in_channels), jnp.float32)
  t = time.perf_counter()
  jax.block_until_ready(forward(state, images))
  return (lambda: jax.block_until_ready(forward(state, images))), time.perf_counter() - t


def compare_latency(shapes: Sequence[Shape], batch_size: int = 1, runs: int = 20, *, warmup: int = 3, dtype=None,
                    seed: int = 0) -> list[dict]:
  """Eval-mode forward times of several networks, measured interleaved so that they share the machine's state.

  Every network is compiled and warmed first; then each of the ``runs``
  rounds times one call of every network in turn. Timing them one after the
  other instead lets clock boosts, caches and other processes favour one of
  them (the same network measured twice in a row can differ by a factor of
  two on a shared CPU). Returns one :func:`measure_latency` record per shape,
  in order; the same shape given twice is measured once.
  """
  if batch_size < 1 or runs < 1 or warmup < 0:
    raise ValueError("need batch_size >= 1, runs >= 1 and warmup >= 0")
  distinct = list(dict.fromkeys(shapes))
  calls = [_compiled(shape, batch_size, dtype, seed) for shape in distinct]
  for call, _ in calls:
    for _ in range(warmup):
      call()
  times = [[] for _ in distinct]
  for _ in range(runs):
    for (call, _), out in zip(calls, times):
      t = time.perf_counter()
      call()
      out.append(time.perf_counter() - t)
  device = str(jax.devices()[0].device_kind)
  records = {}
  for shape, (_, compile_s), ts in zip(distinct, calls, times):
    median = statistics.median(ts)
    records[shape] = {"batch_size": batch_size, "runs": runs, "median_ms": 1e3 * median, "min_ms": 1e3 * min(ts),
                      "max_ms": 1e3 * max(ts), "images_per_s": batch_size / median, "compile_s": compile_s,
                      "device": device}
  return [records[shape] for shape in shapes]


def measure_latency(shape: Shape, batch_size: int = 1, runs: int = 20, *, warmup: int = 3, dtype=None,
                    seed: int = 0) -> dict:
  """Eval-mode forward time of the network of ``shape`` for one batch on the default device.

  Returns ``{"batch_size", "runs", "median_ms", "min_ms", "max_ms",
  "images_per_s", "compile_s", "device"}``; ``images_per_s`` is
  ``batch_size / median``. Input: float32 ``[batch_size, S, S, C]`` at the
  shape's image size; ``dtype`` (e.g. ``jnp.bfloat16``) is the compute dtype.
  """
  return compare_latency([shape], batch_size, runs, warmup=warmup, dtype=dtype, seed=seed)[0]
