"""TFDS datasets read offline through ``tfds.data_source`` (ArrayRecord, no TensorFlow).

Small-image datasets (CIFAR) are decoded into memory; datasets whose images
are larger than 64x64 or of varying size (ImageNet) are streamed from the
random-access data source.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from tas_jax.data import streaming
from tas_jax.data.core import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD,
                               DataError, Dataset, as_rgb_uint8, channel_stats)

log = logging.getLogger(__name__)

MAX_IN_MEMORY_SIDE = 64
_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet2012": (IMAGENET_MEAN, IMAGENET_STD),
}
# Splits used as "test" where a dataset has no labelled test split.
_EVAL_SPLIT = {"imagenet2012": "validation"}
_CHUNK = 1024


def _base_name(name: str) -> str:
  return name.split(":")[0].split("/")[0]


def _one_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip().splitlines()
  line = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
  return line if len(line) <= limit else line[:limit - 3] + "..."


def _open(name: str, split: str, data_dir: str | None, download: bool) -> Any:
  """``tfds.data_source`` with every failure turned into a one-line :class:`DataError`."""
  import tensorflow_datasets as tfds

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # noqa: BLE001 - TFDS reports a missing dataset in many ways
    root = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.get_default_data_dir()
    try:
      where = os.fspath(tfds.builder(name, data_dir=data_dir).data_dir)
    except Exception:  # noqa: BLE001 - an unknown name has no builder
      where = os.path.join(root, _base_name(name))
    hint = "" if "/" not in name else f" (and no local path {name!r} exists)"
    if type(e).__name__ == "DatasetNotFoundError":
      raise DataError(f"{name!r} is neither 'synthetic', an existing image tree or archive, nor a TFDS dataset name "
                      f"[{_one_line(e)}]") from e
    if download:
      raise DataError(f"could not download and prepare TFDS dataset {name!r} split {split!r} into {root}{hint}: "
                      f"{_one_line(e)}") from e
    raise DataError(f"TFDS dataset {name!r} split {split!r} is not prepared as array_record in {where}{hint}; "
                    f"pass download=True, or prepare it in {root} (file_format='array_record') "
                    f"[{_one_line(e)}]") from e


def _read_all(records: Any, keys: tuple[str, ...]) -> list[dict[str, Any]]:
  n = len(records)
  out: list[dict[str, Any]] = []
  for start in range(0, n, _CHUNK):
    chunk = list(range(start, min(n, start + _CHUNK)))
    try:
      items = records.__getitems__(chunk)
    except Exception:  # noqa: BLE001 - some sources (mocks) only support single reads
      items = [records[i] for i in chunk]
    out.extend({k: item[k] for k in keys} for item in items)
  return out


def _labels(records: Any, label_key: str) -> np.ndarray:
  return np.asarray([int(r[label_key]) for r in _read_all(records, (label_key,))], np.int32)


def _label_records(name: str, split: str, data_dir: str | None, fallback: Any) -> Any:
  """A source that skips image decoding, to read labels fast; ``fallback`` where that fails."""
  import tensorflow_datasets as tfds

  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                               decoders={"image": tfds.decode.SkipDecoding()})
    if len(records):
      records[0]
    return records
  except Exception:  # noqa: BLE001 - e.g. mocked sources cannot skip decoding without TensorFlow
    return fallback


def load_tfds(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
              streaming_mode: bool | None = None, image_size: int | None = None) -> Dataset:
  """Loads the train and test (or validation) splits of a TFDS image-classification dataset.

  Args:
    name: TFDS name, optionally with config/version (``cifar10``, ``imagenet2012``).
    data_dir: TFDS data directory; ``None`` is TFDS's own default.
    download: let TFDS download and prepare a missing dataset.
    streaming_mode: ``None`` streams when images are larger than 64x64 or of varying size.
    image_size: crop size of a streamed dataset (default 224).
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  base = _base_name(name)
  train = _open(name, "train", data_dir, download)
  test = _open(name, _EVAL_SPLIT.get(base, "test"), data_dir, download)
  features = train.dataset_info.features
  if "image" not in features or "label" not in features:
    raise DataError(f"TFDS dataset {name!r} has no 'image' and 'label' features: {sorted(features.keys())}")
  class_names = tuple(features["label"].names)
  shape = tuple(features["image"].shape)
  large = any(s is None or s > MAX_IN_MEMORY_SIDE for s in shape[:2])
  if streaming_mode or (streaming_mode is None and large):
    mean, std = _STATS.get(base, (IMAGENET_MEAN, IMAGENET_STD))
    sources = {}
    for split, records in (("train", train), ("test", test)):
      labels = _labels(_label_records(name, records.split, data_dir, records), "label")
      sources[split] = streaming.ArraySource(records, labels)
    return streaming.streaming_dataset(name=name, class_names=class_names, train_source=sources["train"],
                                       test_source=sources["test"], image_size=image_size, mean=mean, std=std)
  start = time.perf_counter()
  arrays = {}
  for split, records in (("train", train), ("test", test)):
    items = _read_all(records, ("image", "label"))
    arrays[f"{split}_images"] = np.stack([as_rgb_uint8(np.asarray(r["image"])) for r in items])
    arrays[f"{split}_labels"] = np.asarray([int(r["label"]) for r in items], np.int32)
  log.info("read %s from TFDS in %.1f s", name, time.perf_counter() - start)
  height, width = arrays["train_images"].shape[1:3]
  if height != width:
    raise DataError(f"TFDS dataset {name!r} has {width}x{height} images: in-memory datasets need square images")
  if image_size is not None and image_size != height:
    raise DataError(f"TFDS dataset {name!r} holds {width}x{height} images; "
                    "image_size applies to streamed datasets only")
  if base in _STATS:
    mean, std = _STATS[base]
  else:
    mean, std = channel_stats(arrays["train_images"])
  return Dataset(name=name, num_classes=len(class_names), class_names=class_names, image_size=int(height),
                 mean=tuple(mean), std=tuple(std), **arrays)
