"""The searchable network families by preset name, with the image size their costs are counted at."""

from __future__ import annotations

import dataclasses
from typing import Callable

from flax import nnx

from tas_jax.nets import mobilenetv2, vgg, vit


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[..., nnx.Module]  # build(num_classes=..., rngs=...)
  image_size: int
  num_classes: int


FAMILIES = {
    "vgg16": Family(lambda **kw: vgg.VGG("vgg16", **kw), 32, 10),
    "vgg19": Family(lambda **kw: vgg.VGG("vgg19", **kw), 32, 10),
    "mobilenetv2": Family(lambda **kw: mobilenetv2.MobileNetV2(imagenet=False, **kw), 32, 10),
    "imagenet-mobilenetv2": Family(lambda **kw: mobilenetv2.MobileNetV2(imagenet=True, **kw), 224, 1000),
    "vit": Family(lambda **kw: vit.ViT(**kw), 32, 10),
}


def build(name: str, num_classes: int | None = None, seed: int = 0, abstract: bool = False) -> nnx.Module:
  """The unpruned searchable network of preset ``name``; ``abstract`` builds shapes only (nothing is computed)."""
  if name not in FAMILIES:
    raise KeyError(f"unknown network family {name!r}; expected one of {sorted(FAMILIES)}")
  fam = FAMILIES[name]
  make = lambda: fam.build(num_classes=num_classes or fam.num_classes, rngs=nnx.Rngs(seed))
  return nnx.eval_shape(make) if abstract else make()
