"""Deterministic batching by global step, per-process slices, host batches and prefetching.

The position in the data is the global step alone: the batch of step ``s`` is
the ``s % steps_per_epoch``-th slice of epoch ``s // steps_per_epoch``'s
permutation, which is drawn from ``numpy.random.default_rng((seed, epoch))``.
Every process computes the same global batch and takes its contiguous part, so
the data seen does not depend on the number of devices or processes, and a
resumed run needs only its step to continue exactly.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np

from tas_jax.data import streaming
from tas_jax.data.core import Dataset, check_split

T = TypeVar("T")


class Batches:
  """Global batch indices for every step of an endless sequence of epochs.

  Args:
    num_examples: size of the split (or of the index list) batched over.
    batch_size: global batch size; the last incomplete batch of an epoch is dropped.
    seed: seed of the per-epoch permutations.
    shuffle: permute each epoch; otherwise every epoch is ``0 .. n-1`` in order.
    replacement: every batch is drawn uniformly with replacement (seeded by the
      step), as the official search draws its validation-half images.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True,
               replacement: bool = False):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_examples < batch_size:
      raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    self.num_examples = int(num_examples)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.replacement = bool(replacement)
    self.steps_per_epoch = self.num_examples // self.batch_size
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the examples in ``epoch``."""
    if epoch < 0:
      raise ValueError(f"epoch must be non-negative, got {epoch}")
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        if self.shuffle:
          perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
          perm = np.arange(self.num_examples)
        # A prefetcher may still read the previous epoch while the consumer starts the next.
        self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
        self._cache[epoch] = perm
      return perm

  def epoch(self, step: int) -> int:
    return step // self.steps_per_epoch

  def indices(self, step: int) -> np.ndarray:
    """int64 ``[batch_size]`` example indices of the global batch at ``step``."""
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    if self.replacement:
      return np.random.default_rng([self.seed, int(step), 1]).integers(0, self.num_examples, self.batch_size)
    epoch, position = divmod(int(step), self.steps_per_epoch)
    start = position * self.batch_size
    return self.permutation(epoch)[start:start + self.batch_size]


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous part of a global batch.

  Process ``p`` of ``P`` gets ``indices[p * B/P : (p + 1) * B/P]``, so the parts
  of all processes concatenated in process order are the global batch.
  """
  if process_count <= 0:
    raise ValueError(f"process_count must be positive, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  size = len(indices)
  if size % process_count:
    raise ValueError(f"global batch of {size} does not split evenly over {process_count} processes")
  per = size // process_count
  return indices[process_index * per:(process_index + 1) * per]


def get_batch(dataset: Dataset, split: str, indices: np.ndarray, *, seed: int = 0, step: int = 0,
              augment: bool | None = None, flip: bool = True,
              num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images ``[B, H, W, 3]`` and int32 labels ``[B]`` of the examples ``indices``.

  In-memory datasets return the stored pixels (augmentation happens on the
  device, see :mod:`tas_jax.data.augment`); ``seed``, ``step``, ``augment`` and
  ``flip`` are then unused. Streamed datasets decode the images and apply the
  host-side transforms: with ``augment`` (default: ``split == "train"``) a
  random resized crop and, if ``flip``, a random horizontal flip, drawn from
  (seed, step, example index); otherwise resize and centre crop.
  """
  check_split(split)
  indices = np.asarray(indices)
  if dataset.streaming:
    if augment is None:
      augment = split == "train"
    return streaming.streaming_batch(dataset, split, indices, seed=seed, step=step, augment=augment, flip=flip,
                                     num_threads=num_threads)
  images = dataset.images(split)
  return images[indices], dataset.labels(split)[indices].astype(np.int32, copy=False)


def search_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits a training set into the two halves of the architecture search.

  Per class, ``floor(n_c / 2)`` randomly chosen indices go to the first half
  (weights) and the rest to the second (architecture). Both halves are sorted,
  disjoint, and together cover every index (METHOD.md §4.3).

  Returns:
    (train_idx, valid_idx), int64.
  """
  labels = np.asarray(labels).reshape(-1)
  rng = np.random.default_rng([seed, 0x5EA4C4])
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    chosen.append(rng.choice(members, size=members.shape[0] // 2, replace=False))
  mask = np.zeros(labels.shape[0], bool)
  if chosen:
    mask[np.concatenate(chosen)] = True
  return np.flatnonzero(mask).astype(np.int64), np.flatnonzero(~mask).astype(np.int64)


_DONE = object()


class Prefetcher(Generic[T]):
  """Iterates ``fn(step)`` for ``step = start_step, start_step + 1, ...`` computed ahead in a thread.

  Up to ``depth`` results wait in a queue, so preparing the next host batch
  overlaps the device's work on the current one. An exception raised by ``fn``
  is re-raised by the ``next()`` that would have returned its result. Iteration
  ends after ``end_step - 1`` if ``end_step`` is given. Call :meth:`close` (or
  use it as a context manager) to stop the thread early.
  """

  def __init__(self, fn: Callable[[int], T], start_step: int, depth: int = 2, end_step: int | None = None):
    if depth < 1:
      raise ValueError(f"depth must be at least 1, got {depth}")
    self._fn = fn
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._end_step = end_step
    self.step = start_step  # step of the next result next() returns
    self._thread = threading.Thread(target=self._run, args=(start_step,), name="tas_jax-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, step: int) -> None:
    while not self._stop.is_set() and (self._end_step is None or step < self._end_step):
      try:
        item: Any = (True, self._fn(step))
      except BaseException as e:  # noqa: BLE001 - handed to the consumer
        self._put((False, e))
        return
      if not self._put(item):
        return
      step += 1
    self._put(_DONE)

  def __iter__(self) -> Iterator[T]:
    return self

  def __next__(self) -> T:
    while True:
      if self._stop.is_set():
        raise StopIteration
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise StopIteration from None
    if item is _DONE:
      self._stop.set()
      raise StopIteration
    ok, value = item
    if not ok:
      self._stop.set()
      raise value
    self.step += 1
    return value

  def close(self) -> None:
    """Stops the thread; results not yet taken are dropped."""
    self._stop.set()
    self._thread.join(timeout=10)

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
