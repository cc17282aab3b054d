"""The dataset record shared by every source, its error type and small helpers.

A :class:`Dataset` is either held in memory (uint8 arrays, the CIFAR case) or
streamed (``streaming=True``: random-access sources that decode on demand, the
ImageNet case). Both are read through :func:`tas_jax.data.batching.get_batch`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

# METHOD.md §4.3: the constants the official CIFAR transforms normalise with.
CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
# The usual ImageNet statistics; streamed sources use them because computing
# statistics would mean decoding the whole set.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ("train", "test")


class DataError(ValueError):
  """A dataset that cannot be read; the message names what is wrong and where."""


class Source(Protocol):
  """Random-access examples of a streamed split.

  ``image(i)`` returns a PIL image (any size, RGB) so the host-side transforms
  can crop and resize it without an extra copy; ``labels`` holds every label
  without decoding any image.
  """

  labels: np.ndarray

  def __len__(self) -> int:
    ...

  def image(self, index: int) -> Any:
    ...


@dataclasses.dataclass
class Dataset:
  """A classification dataset with a train and a test split.

  Attributes:
    name: where it came from (a TFDS name, an image-tree path, or ``synthetic``).
    num_classes: number of classes; labels are ``0 .. num_classes - 1``.
    class_names: one name per label.
    image_size: side of the square images a batch holds (for a streamed set,
      the crop size the host-side transforms produce).
    train_images: uint8 ``[N, H, W, 3]``; ``None`` when streaming.
    train_labels: int32 ``[N]`` (also set when streaming).
    test_images: uint8 ``[M, H, W, 3]``; ``None`` when streaming.
    test_labels: int32 ``[M]``.
    mean: per-channel mean in [0, 1] units, used to normalise.
    std: per-channel standard deviation in [0, 1] units.
    streaming: images are decoded per batch from ``train_source`` /
      ``test_source`` instead of being held in memory.
    train_source: random-access train examples when streaming.
    test_source: random-access test examples when streaming.
    resize_size: shorter side that evaluation resizes to before its centre
      crop of ``image_size`` (streaming only).
  """

  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_size: int
  train_images: np.ndarray | None
  train_labels: np.ndarray
  test_images: np.ndarray | None
  test_labels: np.ndarray
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  streaming: bool = False
  train_source: Source | None = None
  test_source: Source | None = None
  resize_size: int | None = None

  def num_examples(self, split: str) -> int:
    """Number of examples of ``split`` (``"train"`` or ``"test"``)."""
    return int(len(self.labels(split)))

  def labels(self, split: str) -> np.ndarray:
    """All labels of ``split``."""
    check_split(split)
    return self.train_labels if split == "train" else self.test_labels

  def images(self, split: str) -> np.ndarray:
    """All images of ``split`` (in-memory datasets only)."""
    check_split(split)
    if self.streaming:
      raise ValueError(f"dataset {self.name!r} is streamed: read it with get_batch, not images()")
    return self.train_images if split == "train" else self.test_images

  def source(self, split: str) -> Source:
    """The random-access source of ``split`` (streamed datasets only)."""
    check_split(split)
    if not self.streaming:
      raise ValueError(f"dataset {self.name!r} is held in memory: it has no streaming source")
    return self.train_source if split == "train" else self.test_source


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and std (in [0, 1] units) of uint8 ``[N, H, W, C]`` images.

  Counting the 256 byte values per channel is exact and avoids a float copy of
  the whole array (1.2 GB for CIFAR's training set in float64).
  """
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype}")
  channels = images.shape[-1]
  counts = np.zeros((channels, 256), np.int64)
  flat = images.reshape(-1, channels)
  for start in range(0, flat.shape[0], chunk * 1024):
    part = flat[start:start + chunk * 1024]
    for c in range(channels):
      counts[c] += np.bincount(part[:, c], minlength=256)
  values = np.arange(256, dtype=np.float64) / 255.0
  total = counts.sum(axis=1)
  mean = (counts * values).sum(axis=1) / total
  var = (counts * values**2).sum(axis=1) / total - mean**2
  std = np.sqrt(np.maximum(var, 0.0))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def balanced_subset(labels: np.ndarray, num: int, seed: int) -> np.ndarray:
  """Sorted indices of a class-balanced random subset of ``num`` examples.

  Classes are drawn round-robin: every class gives its k-th randomly chosen
  example before any class gives its (k+1)-th, so class counts differ by at
  most one and a class with too few examples is simply exhausted early.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if num >= n:
    return np.arange(n)
  if num <= 0:
    raise DataError(f"num_train_examples must be positive, got {num}")
  rng = np.random.default_rng([seed, 0x5EB5E7])
  classes = np.unique(labels)
  class_rank = np.empty(classes.shape[0], np.int64)
  class_rank[rng.permutation(classes.shape[0])] = np.arange(classes.shape[0])
  rank = np.empty(n, np.int64)
  class_of = np.searchsorted(classes, labels)
  for k in range(classes.shape[0]):
    members = np.flatnonzero(class_of == k)
    rank[rng.permutation(members)] = np.arange(members.shape[0])
  order = np.lexsort((class_rank[class_of], rank))
  return np.sort(order[:num])


def as_rgb_uint8(array: np.ndarray) -> np.ndarray:
  """``[H, W, 3]`` uint8 from a grey, grey+alpha, RGB or RGBA uint8 array."""
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] in (2, 4):
    array = array[..., :-1]
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array, dtype=np.uint8)


def as_triple(values: Sequence[float]) -> tuple[float, float, float]:
  out = tuple(float(v) for v in values)
  if len(out) != 3:
    raise ValueError(f"expected 3 channel values, got {len(out)}")
  return out  # type: ignore[return-value]
