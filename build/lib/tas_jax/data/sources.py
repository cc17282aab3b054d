"""One entry point, :func:`load`, choosing the data source from a string."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

from tas_jax.data import image_tree, streaming, synthetic, tfds_source
from tas_jax.data.core import DataError, Dataset, balanced_subset

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
TFDS_PREFIX = "tfds:"


def _is_local_path(spec: str) -> bool:
  """Whether ``spec`` names an image tree rather than a TFDS dataset.

  It does if it exists, ends with an archive suffix, or starts with ``/``,
  ``.`` or ``~`` (TFDS names never do).
  """
  return (pathlib.Path(spec).expanduser().exists() or image_tree.is_archive(spec)
          or spec.startswith(("/", ".", "~")))


def load(spec: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, num_train_examples: int | None = None,
         download: bool = False, cache_dir: str | os.PathLike | None = None, seed: int = 0,
         on_bad_image: str = "error", streaming: bool | None = None, image_size: int | None = None,
         synthetic_train: int = 5000, synthetic_test: int = 1000) -> Dataset:
  """Loads a dataset with a train and a test split.

  Args:
    spec: ``"synthetic"``; a TFDS name (``cifar10``, ``cifar100``,
      ``imagenet2012``, optionally prefixed ``tfds:``); or the path of an
      image tree or .tar/.tar.gz/.tgz/.zip archive in the
      ``train|test/<class>/<image>`` layout.
    data_dir: TFDS data directory (TFDS's default if None).
    num_train_examples: keep a class-balanced random subset (from ``seed``) of
      this many training examples.
    download: let TFDS download and prepare a missing dataset.
    cache_dir: cache of decoded image trees; default ``$TAS_JAX_CACHE`` or
      ``~/.cache/tas_jax``.
    seed: seed of the synthetic data and of the training subset.
    on_bad_image: ``"error"`` or ``"skip"`` for unreadable files of an image tree.
    streaming: force (True) or forbid (False) streaming; by default datasets
      with images larger than 64x64 are streamed.
    image_size: crop size of streamed datasets (default 224); side of the
      synthetic images (default 32).
    synthetic_train: training examples of the synthetic dataset.
    synthetic_test: test examples of the synthetic dataset.

  Raises:
    DataError: the dataset is missing, not prepared, truncated or unreadable.
  """
  spec = os.fspath(spec)
  if on_bad_image not in image_tree.BAD_IMAGE_POLICIES:
    raise ValueError(f"on_bad_image must be one of {image_tree.BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
  if spec == SYNTHETIC:
    if streaming:
      raise DataError("the synthetic dataset is held in memory; it cannot be streamed")
    dataset = synthetic.make_synthetic(seed, synthetic_train, synthetic_test, image_size or 32)
  elif spec.startswith(TFDS_PREFIX):
    dataset = tfds_source.load_tfds(spec[len(TFDS_PREFIX):], data_dir=data_dir, download=download,
                                    streaming_mode=streaming, image_size=image_size)
  else:
    if not _is_local_path(spec):
      dataset = tfds_source.load_tfds(spec, data_dir=data_dir, download=download, streaming_mode=streaming,
                                      image_size=image_size)
    else:
      dataset = image_tree.load_tree(spec, cache_dir=cache_dir, on_bad_image=on_bad_image, streaming=streaming,
                                     image_size=image_size)
  if num_train_examples is not None:
    dataset = subset_train(dataset, num_train_examples, seed)
  log.info("dataset %s: %d classes, %d train / %d test examples, %dx%d%s", dataset.name, dataset.num_classes,
           dataset.num_examples("train"), dataset.num_examples("test"), dataset.image_size, dataset.image_size,
           " (streamed)" if dataset.streaming else "")
  return dataset


def subset_train(dataset: Dataset, num: int, seed: int) -> Dataset:
  """``dataset`` with a class-balanced random subset of ``num`` training examples."""
  if num <= 0:
    raise DataError(f"num_train_examples must be positive, got {num}")
  if num >= dataset.num_examples("train"):
    return dataset
  keep = balanced_subset(dataset.train_labels, num, seed)
  if dataset.streaming:
    source = streaming.SubsetSource(dataset.train_source, keep)
    return dataclasses.replace(dataset, train_source=source, train_labels=source.labels)
  return dataclasses.replace(dataset, train_images=dataset.train_images[keep], train_labels=dataset.train_labels[keep])
