"""VGG for CIFAR (the networks of Network Slimming and of "Rethinking the Value of Network Pruning"), searchable.

3x3 convs with batch norm and ReLU, 2x2 max pools between stages, global
average pooling and one linear classifier. Every conv's width is searched on
its own (no two convs must match); the depth is fixed, as channel pruning of
VGG keeps its layers.
"""

from __future__ import annotations

import jax
from flax import nnx

from tas_jax.nets import searchable as S

CONFIGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


def _max_pool(x):
  return jax.lax.reduce_window(x, -jax.numpy.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG(nnx.Module):
  """``VGG("vgg16")``: ``model(images)`` maps NHWC images to logits; ``width_scale`` shrinks every width."""

  def __init__(self, name: str = "vgg16", *, num_classes: int = 10, in_channels: int = 3,
               width_scale: float = 1.0, search: bool = True, rngs: nnx.Rngs):
    if name not in CONFIGS:
      raise ValueError(f"unknown VGG {name!r}; expected one of {sorted(CONFIGS)}")
    self.plan = tuple("M" if v == "M" else max(1, int(v * width_scale)) for v in CONFIGS[name])
    layers, prev = [], in_channels
    for v in self.plan:
      if v == "M":
        continue
      w = S.Width(v, search=search, rngs=rngs)
      layers.append(S.Conv(prev, w, 3, rngs=rngs))
      prev = w
    self.convs = nnx.List(layers)
    self.head = S.Dense(prev, num_classes, rngs=rngs)

  def __call__(self, x):
    convs = iter(self.convs)
    for v in self.plan:
      x = _max_pool(x) if v == "M" else jax.nn.relu(next(convs)(x))
    return self.head(x.mean(axis=(1, 2)))
