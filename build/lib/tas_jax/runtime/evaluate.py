"""Top-1 and top-5 accuracy of a network over a split, in batches of one static size."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax import data as data_lib
from tas_jax.runtime import parallel
from tas_jax.runtime.runs import Run, device_batch


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
