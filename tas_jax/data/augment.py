"""On-device augmentation and normalisation (jittable).

CIFAR training augmentation (TAS-SPEC 4.3): zero-pad 4 pixels, crop a random
HxW window, flip horizontally with probability 1/2, then scale to [0, 1] and
normalise per channel. The official transform flips before cropping; flipping
after the crop gives the same distribution (a flipped crop at column offset
``o`` is the crop at ``2 * pad - o`` of the flipped image).

All random draws are made for the whole global batch from one key
(:func:`crop_flip_params`), and JAX's partitionable threefry makes them
independent of how the batch is sharded, so a result depends only on the key
and the images.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

ArrayLike = jax.Array | Sequence[float]


def normalize(images: jax.Array, mean: ArrayLike, std: ArrayLike) -> jax.Array:
  """float32 ``(images / 255 - mean) / std`` of uint8 ``[..., 3]`` images."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) * (1.0 / 255.0) - mean) / std


def crop_flip_params(key: jax.Array, batch_size: int, pad: int = 4) -> tuple[jax.Array, jax.Array]:
  """The random draws of :func:`augment_cifar`.

  Returns:
    offsets: int32 ``[B, 2]`` (row, column) of each crop in the padded image,
      each in ``[0, 2 * pad]``.
    flips: bool ``[B]``, whether each crop is mirrored left-right.
  """
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  return offsets, flips


def flip_params(key: jax.Array, batch_size: int) -> jax.Array:
  """bool ``[B]``: the flips of :func:`flip_and_normalize`."""
  return jax.random.bernoulli(key, 0.5, (batch_size,))


def apply_flips(images: jax.Array, flips: jax.Array) -> jax.Array:
  """Mirrors left-right the images ``[B, H, W, C]`` whose ``flips`` is true."""
  return jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


def apply_crop_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, pad: int = 4) -> jax.Array:
  """Zero-pads ``images`` by ``pad``, crops each at ``offsets`` back to HxW, then applies ``flips``."""
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

  return apply_flips(jax.vmap(crop)(padded, offsets), flips)


def augment_cifar(key: jax.Array, images: jax.Array, mean: ArrayLike, std: ArrayLike, pad: int = 4) -> jax.Array:
  """Random pad-and-crop and flip of uint8 ``[B, H, W, 3]`` images, normalised to float32."""
  offsets, flips = crop_flip_params(key, images.shape[0], pad)
  return normalize(apply_crop_flip(images, offsets, flips, pad), mean, std)


def flip_and_normalize(key: jax.Array, images: jax.Array, mean: ArrayLike, std: ArrayLike) -> jax.Array:
  """Random horizontal flip and normalisation of already-cropped uint8 images (streamed batches)."""
  return normalize(apply_flips(images, flip_params(key, images.shape[0])), mean, std)
