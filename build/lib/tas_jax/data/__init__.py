"""Input pipeline shared by the search and training engines.

* :func:`load` reads a dataset (synthetic, TFDS, or an image tree/archive) into
  a :class:`Dataset`: uint8 arrays in memory, or streamed sources for large
  images.
* :class:`Batches` gives the global batch of every step; :func:`process_slice`
  this process's part of it; :func:`get_batch` its images and labels;
  :class:`Prefetcher` prepares batches ahead in a thread.
* :func:`search_split` halves a training set per class for the search.
* :func:`augment_cifar`, :func:`augment_imagenet`, :func:`flip_and_normalize`
  and :func:`normalize` run on the device inside jitted steps.
"""

from __future__ import annotations

from tas_jax.data.augment import (apply_color_jitter, apply_crop_flip, apply_flips, apply_lighting, augment_cifar,
                                  augment_imagenet, color_params, crop_flip_params, flip_and_normalize, flip_params,
                                  imagenet_params, normalize)
from tas_jax.data.batching import Batches, Prefetcher, get_batch, process_slice, search_split
from tas_jax.data.cache import cache_root
from tas_jax.data.core import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD,
                               DataError, Dataset, balanced_subset, channel_stats)
from tas_jax.data.sources import load, subset_train

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "Batches", "DataError", "Dataset", "Prefetcher",
    "apply_color_jitter", "apply_crop_flip", "apply_flips", "apply_lighting", "augment_cifar", "augment_imagenet",
    "balanced_subset", "cache_root", "channel_stats", "color_params", "crop_flip_params", "flip_and_normalize",
    "flip_params", "get_batch", "imagenet_params", "load", "normalize", "process_slice", "search_split",
    "subset_train",
]
