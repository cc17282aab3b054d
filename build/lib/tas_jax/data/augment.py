"""On-device augmentation and normalisation (jittable).

CIFAR training augmentation (METHOD.md §4.3): zero-pad 4 pixels, crop a random
HxW window, flip horizontally with probability 1/2, then scale to [0, 1] and
normalise per channel. The official transform flips before cropping; flipping
after the crop gives the same distribution (a flipped crop at column offset
``o`` is the crop at ``2 * pad - o`` of the flipped image).

ImageNet training augmentation of the official TAS code (its
``imagenet-1k`` transform): random resized crop, colour jitter (brightness,
contrast and saturation factors uniform in [0.6, 1.4], hue shift uniform in
[-0.2, 0.2]), PCA lighting (AlexNet-style, alphastd 0.1, the usual ImageNet
eigenvalues and eigenvectors), horizontal flip. The crop needs the decoded
full-size image, so it stays on the host (:mod:`tas_jax.data.streaming`);
:func:`augment_imagenet` does the rest here. Choices, where the official
PIL/torchvision pipeline leaves room:

* The four jitter operations run in a random order drawn per image, as
  torchvision's ``ColorJitter`` does; brightness multiplies, contrast blends
  with the mean grey level of the image, saturation with each pixel's grey
  level (grey = 0.299 R + 0.587 G + 0.114 B), and hue shifts H of HSV (mod 1);
  each result is clipped to [0, 1].
* Everything runs in float32 on [0, 1] pixels, with no rounding to 8 bits
  between the steps as PIL images would have.
* Lighting adds ``eigvec @ (alpha * eigval)``, alpha ~ N(0, 0.1^2) per image
  and channel, to [0, 1] pixels and clips, the usual AlexNet scale. The
  official code adds it to 0..255 pixel values instead, which moves a pixel by
  at most about a tenth of a grey level before truncation to uint8: there the
  lighting is all but a no-op.
* The flip comes last but commutes with the colour operations (all per pixel
  or through image-wide means), so the distribution is the official one.

All random draws are made for the whole global batch from one key
(:func:`crop_flip_params`, :func:`imagenet_params`), and JAX's partitionable
threefry makes them independent of how the batch is sharded, so a result
depends only on the key and the images.
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


# ----------------------------------------------------------------------------- TAS's ImageNet colour augmentation

JITTER = (0.4, 0.4, 0.4, 0.2)  # brightness, contrast, saturation, hue
LIGHTING_STD = 0.1
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
GREY = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def color_params(key: jax.Array, batch_size: int, jitter: Sequence[float] = JITTER,
                 lighting_std: float = LIGHTING_STD) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The colour draws of :func:`augment_imagenet`.

  Returns:
    factors: float32 ``[B, 4]``: brightness, contrast and saturation factors
      uniform in ``[max(0, 1 - j), 1 + j]`` and a hue shift uniform in
      ``[-j, j]``, ``j`` the matching entry of ``jitter``.
    order: int32 ``[B, 4]``: per image, a uniformly random permutation of the
      four operations; ``order[b, p]`` is the one applied ``p``-th.
    alpha: float32 ``[B, 3]``: the lighting coefficients, N(0, lighting_std^2).
  """
  b, c, s, h = (float(v) for v in jitter)
  lo = jnp.asarray([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], jnp.float32)
  hi = jnp.asarray([1 + b, 1 + c, 1 + s, h], jnp.float32)
  factor_key, order_key, alpha_key = jax.random.split(key, 3)
  factors = jax.random.uniform(factor_key, (batch_size, 4), jnp.float32, lo, hi)
  order = jnp.argsort(jax.random.uniform(order_key, (batch_size, 4)), axis=1).astype(jnp.int32)
  alpha = lighting_std * jax.random.normal(alpha_key, (batch_size, 3), jnp.float32)
  return factors, order, alpha


def _per_image(v: jax.Array) -> jax.Array:
  return v[:, None, None, None]


def grey(x: jax.Array) -> jax.Array:
  """``[B, H, W]`` grey level of ``[B, H, W, 3]`` RGB pixels."""
  return x @ jnp.asarray(GREY, x.dtype)


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(x * _per_image(factor), 0.0, 1.0)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  mean = grey(x).mean(axis=(1, 2))
  f = _per_image(factor)
  return jnp.clip(f * x + (1 - f) * _per_image(mean), 0.0, 1.0)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  f = _per_image(factor)
  return jnp.clip(f * x + (1 - f) * grey(x)[..., None], 0.0, 1.0)


def rgb_to_hsv(x: jax.Array) -> jax.Array:
  """HSV, every component in [0, 1], of RGB pixels in [0, 1] (the formulas of Python's ``colorsys``)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(axis=-1)
  delta = v - x.min(axis=-1)
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1.0), 0.0)
  safe = jnp.where(delta > 0, delta, 1.0)
  rc, gc, bc = (v - r) / safe, (v - g) / safe, (v - b) / safe
  h = jnp.where(r == v, bc - gc, jnp.where(g == v, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(x: jax.Array) -> jax.Array:
  """RGB of HSV pixels (the inverse of :func:`rgb_to_hsv`)."""
  h, s, v = x[..., 0], x[..., 1], x[..., 2]
  sector = jnp.floor(h * 6.0)
  f = h * 6.0 - sector
  i = jnp.mod(sector, 6).astype(jnp.int32)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
  channels = [jnp.select([i == k for k in range(6)], [row[c] for row in table]) for c in range(3)]
  return jnp.stack(channels, axis=-1)


def adjust_hue(x: jax.Array, shift: jax.Array) -> jax.Array:
  hsv = rgb_to_hsv(x)
  h = jnp.mod(hsv[..., 0] + shift[:, None, None], 1.0)
  return hsv_to_rgb(hsv.at[..., 0].set(h))


_COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply_color_jitter(x: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """The four jitter operations on float ``[B, H, W, 3]`` pixels in [0, 1], in each image's ``order``.

  Every position computes all four operations and keeps the one the image's
  order names there: a per-image order costs four times the work of a fixed
  one, which is small beside the network.
  """
  for position in range(4):
    which = order[:, position]
    outs = [op(x, factors[:, k]) for k, op in enumerate(_COLOR_OPS)]
    x = jnp.select([_per_image(which == k) for k in range(4)], outs)
  return x


def apply_lighting(x: jax.Array, alpha: jax.Array) -> jax.Array:
  """AlexNet's PCA lighting: ``x + eigvec @ (alpha * eigval)`` per image, clipped to [0, 1]."""
  eigvec = jnp.asarray(PCA_EIGVEC, jnp.float32)
  shift = (alpha * jnp.asarray(PCA_EIGVAL, jnp.float32)) @ eigvec.T
  return jnp.clip(x + shift[:, None, None, :], 0.0, 1.0)


def imagenet_params(key: jax.Array, batch_size: int):
  """The draws of :func:`augment_imagenet`: ``(factors, order, alpha, flips, crop key)``."""
  color_key, flip_key, crop_key = jax.random.split(key, 3)
  factors, order, alpha = color_params(color_key, batch_size)
  return factors, order, alpha, flip_params(flip_key, batch_size), crop_key


def augment_imagenet(key: jax.Array, images: jax.Array, mean: ArrayLike, std: ArrayLike, crop: bool = False,
                     pad: int = 4) -> jax.Array:
  """TAS's ImageNet training augmentation after the crop: colour jitter, lighting, flip, normalisation.

  ``images`` are uint8 ``[B, H, W, 3]``, already randomly resized and
  cropped on the host; ``crop=True`` (an in-memory dataset) first applies
  the CIFAR pad-and-crop instead. Returns float32 normalised images.
  """
  batch = images.shape[0]
  factors, order, alpha, flips, crop_key = imagenet_params(key, batch)
  if crop:
    offsets, _ = crop_flip_params(crop_key, batch, pad)
    images = apply_crop_flip(images, offsets, jnp.zeros((batch,), bool), pad)
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  x = apply_flips(apply_lighting(apply_color_jitter(x, factors, order), alpha), flips)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
