"""MobileNetV2 (inverted residuals), searchable, for CIFAR (32 x 32) and ImageNet (224 x 224).

A block expands its input with a 1x1 conv to its hidden width, filters every
hidden channel with a 3x3 depthwise conv (which therefore reads and writes the
hidden width group), and projects to the stage's width with a 1x1 conv
without ReLU; a stride-1 block whose input is its stage's width adds its
input. Searched: every block's hidden width, every stage's output width (one
group per stage: the blocks of a stage add into one stream), the stem and
the last 1x1 conv; the trailing blocks of every stage of two or more blocks
may be dropped (a depth group per stage). The CIFAR variant keeps the stem and
the second stage at stride 1, as is usual for 32 x 32 images. Its stages are
not scanned: on the CPU that neither shortened the compile (93 s against 92 s)
nor the step (4.80 s against 4.46 s per iteration, batch 64).
"""

from __future__ import annotations

import jax
from flax import nnx

from tas_jax.nets import searchable as S

# (expansion t, width c, blocks n, stride s) per stage.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nnx.Module):

  def __init__(self, cin: S.Width, cout: S.Width, expansion: int, stride: int, *, search: bool, rngs: nnx.Rngs):
    hidden = S.Width(cin.nominal * expansion, search=search, rngs=rngs) if expansion != 1 else cin
    self.expand = S.Conv(cin, hidden, 1, rngs=rngs) if expansion != 1 else None
    self.depthwise = S.Conv(hidden, hidden, 3, stride=stride, depthwise=True, rngs=rngs)
    self.project = S.Conv(hidden, cout, 1, rngs=rngs)
    self.residual = stride == 1 and cin is cout

  def __call__(self, x):
    y = jax.nn.relu6(self.expand(x)) if self.expand is not None else x
    y = self.project(jax.nn.relu6(self.depthwise(y)))
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):
  """``MobileNetV2(imagenet=False)``; ``width_scale`` multiplies every width (MobileNetV2's width multiplier)."""

  def __init__(self, *, imagenet: bool = False, num_classes: int | None = None, in_channels: int = 3,
               width_scale: float = 1.0, last_width: int = 1280, search: bool = True, rngs: nnx.Rngs):
    scale = lambda c: max(1, int(c * width_scale))
    num_classes = num_classes or (1000 if imagenet else 10)
    prev = S.Width(scale(32), search=search, rngs=rngs)
    self.stem = S.Conv(in_channels, prev, 3, stride=2 if imagenet else 1, rngs=rngs)
    stages = []
    for i, (t, c, n, s) in enumerate(STAGES):
      if not imagenet and i == 1:
        s = 1
      out = S.Width(scale(c), search=search, rngs=rngs)
      blocks = []
      for j in range(n):
        blocks.append(InvertedResidual(prev, out, t, s if j == 0 else 1, search=search, rngs=rngs))
        prev = out
      stages.append(S.Stack(blocks, search=search and n > 1, rngs=rngs))
    self.stages = nnx.List(stages)
    last = S.Width(max(last_width, scale(last_width)) if width_scale > 1 else last_width, search=search, rngs=rngs)
    self.last = S.Conv(prev, last, 1, rngs=rngs)
    self.head = S.Dense(last, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu6(self.stem(x))
    for stage in self.stages:
      x = stage(x)
    x = jax.nn.relu6(self.last(x))
    return self.head(x.mean(axis=(1, 2)))
