"""Li et al.'s published ResNet-56-A/B and ResNet-110-A/B: fixed per-stage fractions, sensitive layers skipped."""

from __future__ import annotations

import dataclasses

import numpy as np

from tas_jax.nets import resnet
from tas_jax.core import shapes
from tas_jax.core.shapes import Shape
from tas_jax.baselines.magnitude import Pruned, gather_kept, load_source, top_scores, l1_norms
from tas_jax.baselines.targets import PruneError, macs_ratio



@dataclasses.dataclass(frozen=True)
class LiVariant:
  """One of Li et al.'s CIFAR ResNet variants, as the Rethinking code's prune scripts set it.

  Attributes:
    skip: ids of the convs left whole (the layers found sensitive). Ids count
      every conv of the network from 1, the stem, so the first conv of the
      j-th block (from 0, over the whole network) has id ``2 + 2j``.
    prune_prob: fraction of filters removed from the first conv of each
      block, per stage.
  """

  skip: tuple[int, ...]
  prune_prob: tuple[float, ...]


# cifar/l1-norm-pruning/res56prune.py and res110prune.py of "Rethinking the Value of Network Pruning".
LI_VARIANTS = {
    56: {"A": LiVariant((16, 20, 38, 54), (0.1, 0.1, 0.1)),
         "B": LiVariant((16, 18, 20, 34, 38, 54), (0.6, 0.3, 0.1))},
    110: {"A": LiVariant((36,), (0.5, 0.0, 0.0)),
          "B": LiVariant((36, 38, 74), (0.5, 0.4, 0.3))},
}
VARIANTS = ("A", "B")


def li_variant(base: Shape, variant: str) -> LiVariant:
  """The variant's settings for ``base``, which must be the unpruned CIFAR ResNet-56 or -110."""
  if variant not in VARIANTS:
    raise PruneError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
  depths = " or ".join(f"ResNet-{d}" for d in LI_VARIANTS)
  if base.arch != "cifar" or base.block != "basic" or base.depth not in LI_VARIANTS:
    raise PruneError(f"Li et al.'s variants {', '.join(VARIANTS)} exist for the CIFAR {depths}; the base is a "
                     f"{base.arch} {base.block} ResNet-{base.depth}")
  if base != shapes.full_shape(base):
    raise PruneError(f"Li et al.'s variants prune the unpruned ResNet-{base.depth}; the base is already pruned")
  return LI_VARIANTS[base.depth][variant]


def li_variant_widths(base: Shape, variant: str) -> dict[int, int]:
  """Width entry -> filters kept, for every conv the variant prunes (the others keep their width).

  Only the first conv of a block is a candidate (its output never reaches
  the residual stream); one that is not skipped keeps ``int(n * (1 - p))``
  of its n filters, p its stage's fraction. The scripts tell the stage by id
  ranges (ResNet-56: up to 18, 36, 54) that are exactly the stages.
  """
  v = li_variant(base, variant)
  out = {}
  for j, b in enumerate(base.layout.blocks):
    if 2 + 2 * j in v.skip:
      continue
    e = b.convs[0]
    out[e] = int(base.nominal[e] * (1 - v.prune_prob[b.stage]))
  return out


def li_variant_shape(base: Shape, variant: str) -> Shape:
  """The shape of Li et al.'s ResNet-56/110-A/B (see :func:`li_variant_widths`); no weights needed."""
  widths = list(base.widths)
  for e, k in li_variant_widths(base, variant).items():
    widths[e] = k
  return base.replace(widths=tuple(widths))


def li_variant_prune(source: str | resnet.ResNet, variant: str) -> Pruned:
  """Li et al.'s ResNet-56/110-A/B cut from a trained network: each pruned conv keeps its largest-L1 filters."""
  model, where = load_source(source)
  norms = l1_norms(model)
  kept = [np.arange(w) for w in model.shape.widths]
  for e, k in li_variant_widths(model.shape, variant).items():
    kept[e] = top_scores(norms[e], k)
  net = gather_kept(model, kept)
  return Pruned(net.shape, net, tuple(np.asarray(k) for k in kept), "l1", "layer", "keep", float("nan"),
                macs_ratio(net.shape), where, variant)
