"""A procedurally generated, learnable 10-class 32x32 RGB task for demos and tests.

Class ``c`` is a sinusoidal grating with one of five orientations (``c % 5``)
whose colour swings along one of two colour axes (``c // 5``: red-cyan or
blue-yellow). Each image draws its own frequency, phase (a random shift along
the grating), amplitude, orientation jitter, a soft window at a random place,
a weaker distractor grating of random orientation and colour, a base colour and
pixel noise. The base colour is drawn independently of the
class, so the mean colour of an image says (almost) nothing about its label:
a model has to see the orientation and colour axis of the pattern, which a
small CNN learns in a few hundred steps.
"""

from __future__ import annotations

import numpy as np

from tas_jax.data.core import Dataset, channel_stats

NUM_CLASSES = 10
_ORIENTATIONS = 5
# Two non-collinear colour axes; a grating's sign flips with its phase, so an
# axis and its negation would be the same class.
_COLOUR_AXES = np.asarray([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]], np.float32)
_AXIS_NAMES = ("redcyan", "blueyellow")


def class_names() -> tuple[str, ...]:
  return tuple(f"grating{180 * (c % _ORIENTATIONS) // _ORIENTATIONS:03d}-{_AXIS_NAMES[c // _ORIENTATIONS]}"
               for c in range(NUM_CLASSES))


def generate(rng: np.random.Generator, labels: np.ndarray, image_size: int = 32) -> np.ndarray:
  """uint8 ``[N, S, S, 3]`` images of the classes ``labels``, drawn from ``rng``."""
  n = labels.shape[0]

  def draw(low: float, high: float, shape=None) -> np.ndarray:
    return rng.uniform(low, high, n if shape is None else shape).astype(np.float32)

  coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
  yy, xx = np.meshgrid(coords, coords, indexing="ij")
  def grating(theta: np.ndarray, cycles: np.ndarray, phase: np.ndarray) -> np.ndarray:
    along = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
    return np.sin(2 * np.pi * cycles[:, None, None] * along + phase[:, None, None])

  theta = (np.pi / _ORIENTATIONS) * (labels % _ORIENTATIONS).astype(np.float32) + draw(-0.2, 0.2)
  wave = grating(theta, draw(2.5, 4.5), draw(0.0, 2 * np.pi))
  centre = draw(0.2, 0.8, (n, 2))
  width = draw(0.25, 0.5)
  dist2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
  window = 0.35 + 0.65 * np.exp(-dist2 / (2 * width[:, None, None] ** 2))
  axis = _COLOUR_AXES[labels // _ORIENTATIONS]
  pattern = (draw(22.0, 45.0)[:, None, None] * wave * window)[..., None] * axis[:, None, None, :]
  # A weaker grating of random orientation and colour that carries no label.
  d_colour = rng.normal(0.0, 1.0, (n, 3)).astype(np.float32)
  d_colour *= draw(8.0, 20.0, (n, 1)) / np.linalg.norm(d_colour, axis=1, keepdims=True)
  distractor = grating(draw(0.0, np.pi), draw(1.5, 5.0), draw(0.0, 2 * np.pi))[..., None] * d_colour[:, None, None, :]
  base = draw(70.0, 185.0, (n, 1, 1, 3))
  noise = 20.0 * rng.standard_normal((n, image_size, image_size, 3), dtype=np.float32)
  return np.clip(np.rint(base + pattern + distractor + noise), 0, 255).astype(np.uint8)


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)


def make_synthetic(seed: int = 0, num_train: int = 5000, num_test: int = 1000, image_size: int = 32) -> Dataset:
  """The synthetic dataset; the same ``seed`` always gives the same arrays."""
  if num_train < NUM_CLASSES or num_test < 1:
    raise ValueError(f"need at least {NUM_CLASSES} train and 1 test example, got {num_train} and {num_test}")
  # Independent streams per split, so the test set does not change with num_train.
  train_rng = np.random.default_rng([seed, 0])
  test_rng = np.random.default_rng([seed, 1])
  train_labels = _balanced_labels(train_rng, num_train)
  test_labels = _balanced_labels(test_rng, num_test)
  train_images = generate(train_rng, train_labels, image_size)
  test_images = generate(test_rng, test_labels, image_size)
  mean, std = channel_stats(train_images)
  return Dataset(
      name=f"synthetic(seed={seed})", num_classes=NUM_CLASSES, class_names=class_names(), image_size=image_size,
      train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels,
      mean=mean, std=std)
