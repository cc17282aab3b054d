"""Streamed datasets: random-access sources and the host-side ImageNet transforms.

Images too large to hold in memory are decoded per batch. Training batches get
the standard ImageNet augmentation (random resized crop, scale (0.08, 1), ratio
(3/4, 4/3), then a horizontal flip); evaluation batches are resized so the
shorter side is ``resize_size`` and centre-cropped to ``image_size``
(256 -> 224 by default).

The randomness of an example comes from ``numpy.random.default_rng((seed,
step, index))``, where ``index`` is the example's index in its split, so a
batch depends only on (seed, step, indices) and not on how the global batch is
split across processes or threads.
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import math
import os
import pathlib
import threading
import zipfile
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from tas_jax.data.core import DataError, Dataset, Source, as_rgb_uint8, as_triple

log = logging.getLogger(__name__)

DEFAULT_CROP = 224
# Evaluation resizes to 256 before a 224 centre crop; other crop sizes keep the ratio.
EVAL_RESIZE_RATIO = 256 / 224
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
POOL_SIZE = min(8, os.cpu_count() or 1)


class ByteReader(Protocol):
  """Reads the encoded bytes of one file of a tree."""

  def read(self, key: Any) -> bytes:
    ...


class DirReader:
  """Files under a directory; keys are relative paths."""

  def __init__(self, root: pathlib.Path):
    self.root = pathlib.Path(root)

  def read(self, key: str) -> bytes:
    return (self.root / key).read_bytes()


class ZipReader:
  """Members of a zip archive; keys are member names.

  One ``ZipFile`` is shared: its reads serialise on the archive's own lock.
  """

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    self._zip = None
    self._lock = threading.Lock()

  def read(self, key: str) -> bytes:
    if self._zip is None:
      with self._lock:
        if self._zip is None:
          self._zip = zipfile.ZipFile(self.path)
    return self._zip.read(key)


class TarReader:
  """Members of an uncompressed tar; keys are (data offset, size) found when indexing."""

  def __init__(self, path: pathlib.Path):
    self.path = pathlib.Path(path)
    self._fd: int | None = None
    self._lock = threading.Lock()

  def read(self, key: tuple[int, int]) -> bytes:
    offset, size = key
    if self._fd is None:
      with self._lock:
        if self._fd is None:
          self._fd = os.open(self.path, os.O_RDONLY)
    # pread takes no file position, so threads need no lock around it.
    data = os.pread(self._fd, size, offset)
    if len(data) != size:
      raise DataError(f"archive {self.path} is truncated: {size} bytes expected at offset {offset}, got {len(data)}")
    return data


class FileSource:
  """A split of an image tree: one encoded file per example, decoded on demand."""

  def __init__(self, reader: ByteReader, names: Sequence[str], keys: Sequence[Any], labels: np.ndarray,
               on_bad_image: str = "error"):
    if not (len(names) == len(keys) == len(labels)):
      raise ValueError("names, keys and labels must have one entry per example")
    self.reader = reader
    self.names = list(names)
    self.keys = list(keys)
    self.labels = np.asarray(labels, np.int32)
    self.on_bad_image = on_bad_image
    self._warned: set[int] = set()

  def __len__(self) -> int:
    return len(self.keys)

  def image(self, index: int) -> Image.Image:
    # A bad file under "skip" is replaced by the next readable one, so batches keep their size.
    for attempt in range(len(self)):
      i = (index + attempt) % len(self)
      try:
        with Image.open(io.BytesIO(self.reader.read(self.keys[i]))) as img:
          return img.convert("RGB")
      except DataError:
        raise
      except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        if self.on_bad_image == "error":
          raise DataError(f"unreadable image {self.names[i]} ({type(e).__name__}: {e}); "
                          "pass on_bad_image='skip' to replace it") from e
        if i not in self._warned:
          self._warned.add(i)
          log.warning("unreadable image %s replaced by the next one (%d so far)", self.names[i], len(self._warned))
    raise DataError("no readable image in this split")


class ArraySource:
  """A split whose examples come from a random-access sequence of dicts (a TFDS data source)."""

  def __init__(self, records: Any, labels: np.ndarray, image_key: str = "image"):
    self.records = records
    self.labels = np.asarray(labels, np.int32)
    self.image_key = image_key

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def image(self, index: int) -> Image.Image:
    return Image.fromarray(as_rgb_uint8(np.asarray(self.records[int(index)][self.image_key])))


class SubsetSource:
  """The examples ``indices`` of another source."""

  def __init__(self, base: Source, indices: np.ndarray):
    self.base = base
    self.indices = np.asarray(indices, np.int64)
    self.labels = np.asarray(base.labels)[self.indices]

  def __len__(self) -> int:
    return int(self.indices.shape[0])

  def image(self, index: int) -> Image.Image:
    return self.base.image(int(self.indices[index]))


def streaming_dataset(*, name: str, class_names: Sequence[str], train_source: Source, test_source: Source,
                      image_size: int | None, mean: Sequence[float], std: Sequence[float]) -> Dataset:
  """A streamed :class:`Dataset` over two sources; ``image_size`` is the crop size (default 224)."""
  size = DEFAULT_CROP if image_size is None else int(image_size)
  if size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}")
  return Dataset(
      name=name, num_classes=len(class_names), class_names=tuple(class_names), image_size=size,
      train_images=None, train_labels=np.asarray(train_source.labels, np.int32),
      test_images=None, test_labels=np.asarray(test_source.labels, np.int32),
      mean=as_triple(mean), std=as_triple(std), streaming=True,
      train_source=train_source, test_source=test_source,
      resize_size=int(round(size * EVAL_RESIZE_RATIO)))


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """(left, top, width, height) of a random crop covering ``scale`` of the area with aspect in ``ratio``.

  Ten tries at a random area and log-uniform aspect ratio; if none fits, a
  centre crop of the whole image clamped to ``ratio`` (as torchvision does).
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_transform(img: Image.Image, rng: np.random.Generator, size: int, flip: bool = True) -> np.ndarray:
  """Random resized crop to ``size`` x ``size``, then (if ``flip``) a random horizontal flip."""
  left, top, w, h = random_resized_crop_box(rng, img.size[0], img.size[1])
  out = np.asarray(img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR))
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def eval_transform(img: Image.Image, size: int, resize_size: int) -> np.ndarray:
  """Resize the shorter side to ``resize_size``, then take the centre ``size`` x ``size`` crop."""
  if resize_size < size:
    raise ValueError(f"resize_size {resize_size} is smaller than the crop size {size}")
  width, height = img.size
  if width <= height:
    new_w, new_h = resize_size, int(resize_size * height / width)
  else:
    new_w, new_h = int(resize_size * width / height), resize_size
  img = img.resize((new_w, new_h), Image.BILINEAR)
  left = int(round((new_w - size) / 2))
  top = int(round((new_h - size) / 2))
  return np.asarray(img.crop((left, top, left + size, top + size)))


_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      # Pillow releases the GIL while decoding and resizing, so threads scale.
      _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=POOL_SIZE,
                                                    thread_name_prefix="tas_jax-decode")
    return _POOL


def streaming_batch(dataset: Dataset, split: str, indices: np.ndarray, *, seed: int, step: int, augment: bool,
                    flip: bool = True, num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Decodes and transforms the examples ``indices`` of a streamed split.

  Returns uint8 ``[B, S, S, 3]`` images (``S = dataset.image_size``) and int32
  labels. ``num_threads=1`` decodes in the calling thread; otherwise a shared
  pool of :data:`POOL_SIZE` threads does.
  """
  source = dataset.source(split)
  indices = np.asarray(indices, np.int64).reshape(-1)
  size = dataset.image_size
  resize_size = dataset.resize_size or int(round(size * EVAL_RESIZE_RATIO))

  def one(index: int) -> np.ndarray:
    img = source.image(index)
    if augment:
      return train_transform(img, np.random.default_rng([seed, step, index]), size, flip)
    return eval_transform(img, size, resize_size)

  threads = POOL_SIZE if num_threads is None else num_threads
  if threads > 1 and indices.shape[0] > 1:
    images = list(_pool().map(one, (int(i) for i in indices)))
  else:
    images = [one(int(i)) for i in indices]
  if not images:
    return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32)
  return np.stack(images), np.asarray(source.labels, np.int32)[indices]
