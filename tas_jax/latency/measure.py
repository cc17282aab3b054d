"""Measured inference latency of pruned networks on the current device.

MACs say little about speed on accelerators (METHOD.md §7.3): a network with
half the MACs is often far less than twice as fast, so the toolkit reports
measured time beside the counts. The protocol:
build the network of a shape (eval mode, random weights: time does not depend
on their values), jit its forward for one batch size, run it once to compile
and ``warmup`` more times, then time ``runs`` calls, each waited for with
``block_until_ready``, and report the median.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from tas_jax.nets import resnet
from tas_jax.core.shapes import Shape


def measure_latency(shape: Shape, batch_size: int = 1, runs: int = 20, *, warmup: int = 3, dtype=None,
                    seed: int = 0) -> dict:
  """Eval-mode forward time of the network of ``shape`` for one batch on the default device.

  Returns ``{"batch_size", "runs", "median_ms", "min_ms", "max_ms",
  "images_per_s", "compile_s", "device"}``; ``images_per_s`` is
  ``batch_size / median``. Input: float32 ``[batch_size, S, S, C]`` at the
  shape's image size; ``dtype`` (e.g. ``jnp.bfloat16``) is the compute dtype.
  """
  if batch_size < 1 or runs < 1 or warmup < 0:
    raise ValueError("need batch_size >= 1, runs >= 1 and warmup >= 0")
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
  compile_s = time.perf_counter() - t
  for _ in range(warmup):
    jax.block_until_ready(forward(state, images))
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(forward(state, images))
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  return {"batch_size": batch_size, "runs": runs, "median_ms": 1e3 * median, "min_ms": 1e3 * min(times),
          "max_ms": 1e3 * max(times), "images_per_s": batch_size / median, "compile_s": compile_s,
          "device": str(jax.devices()[0].device_kind)}
