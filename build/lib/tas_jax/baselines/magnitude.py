"""Magnitude pruning of a trained network: L1-norm filter pruning (Li et al.) and Network Slimming (Liu et al.).

Filters are ranked by the L1 norm of their kernels or by the magnitude of
their batch-norm scale; either every prunable conv keeps the same fraction
(``scope="layer"``) or one threshold over all of them decides
(``scope="global"``). The kept filters' weights are carried over by
:func:`tas_jax.nets.surgery.gather`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from tas_jax.runtime import runs
from tas_jax.nets import resnet, surgery
from tas_jax.core import shapes
from tas_jax.runtime import models
from tas_jax.core.shapes import Shape
from tas_jax.baselines.targets import DEFAULT_TOLERANCE, PruneError, RESIDUAL, SCOPES, check_target, macs_ratio
from tas_jax.baselines.uniform_shapes import closest



@dataclasses.dataclass(frozen=True, eq=False)
class Pruned:
  """A pruned network with inherited weights.

  Attributes:
    shape: the pruned shape.
    model: the pruned network, eval mode, carrying the source's weights at the kept channels.
    kept: for every entry of ``shape.widths``, the kept output channels of
      that conv in the source network, ascending (the source's own channels
      for entries of blocks the source drops).
    method: ``l1`` or ``slimming``.
    scope: ``layer`` or ``global``.
    residual: ``keep`` or ``group``.
    level: the fraction (layer scope) or threshold (global scope) found;
      NaN for a published variant, whose fractions are fixed per stage.
    ratio: MAC ratio of ``shape`` to the unpruned network.
    source: where the source network came from (a run directory) or "".
    variant: the published variant (``A``/``B``, see :func:`li_variant_prune`) or "".
  """

  shape: Shape
  model: resnet.ResNet
  kept: tuple[np.ndarray, ...]
  method: str
  scope: str
  residual: str
  level: float
  ratio: float
  source: str = ""
  variant: str = ""


def conv_modules(model: resnet.ResNet) -> dict[int, resnet.ConvBN]:
  """The conv of every width entry the network builds (stem and kept blocks' convs), by entry index."""
  out = {0: model.stem}
  kept = [b for b in model.shape.layout.blocks if b.index < model.shape.blocks[b.stage]]
  for spec, block in zip(kept, model.blocks):
    for e, conv in zip(spec.convs, block.convs):
      out[e] = conv
  return out


def units(model: resnet.ResNet, residual: str = "keep") -> list[tuple[int, ...]]:
  """The prunable units of a network: width entries that share one kept channel set.

  ``keep``: every inner conv of a kept block alone. ``group``: those, plus the
  residual groups: the stem with the last convs of the blocks it reaches
  through identity shortcuts, then each block with a projection shortcut with
  the last convs of the identity blocks after it.
  """
  if residual not in RESIDUAL:
    raise PruneError(f"residual must be one of {', '.join(RESIDUAL)}, got {residual!r}")
  shape = model.shape
  kept = [b for b in shape.layout.blocks if b.index < shape.blocks[b.stage]]
  inner = [(e,) for b in kept for e in b.convs[:-1]]
  if residual == "keep":
    return inner
  groups, current = [], [0]
  for spec, block in zip(kept, model.blocks):
    if block.shortcut is not None:
      groups.append(tuple(current))
      current = []
    current.append(spec.convs[-1])
  groups.append(tuple(current))
  return inner + groups


def l1_norms(model: resnet.ResNet) -> dict[int, np.ndarray]:
  """Li et al.'s filter score: the L1 norm of every output filter's kernel, per width entry."""
  return {e: np.abs(np.asarray(c.conv.kernel[...], np.float64)).sum(axis=(0, 1, 2))
          for e, c in conv_modules(model).items()}


def bn_scales(model: resnet.ResNet) -> dict[int, np.ndarray]:
  """Network Slimming's channel score: ``|gamma|`` of every conv's batch norm, per width entry."""
  out = {}
  for e, c in conv_modules(model).items():
    if c.bn is None:
      raise PruneError(f"conv #{e} has no batch norm to score its channels by")
    out[e] = np.abs(np.asarray(c.bn.scale[...], np.float64))
  return out


def _unit_scores(groups, scores: dict[int, np.ndarray], normalise: bool) -> list[np.ndarray]:
  out = []
  for g in groups:
    # L1 norms grow with a layer's fan-in; dividing by the layer's mean makes them comparable across layers.
    member = [scores[e] / max(scores[e].mean(), 1e-30) if normalise else scores[e] for e in g]
    out.append(np.mean(member, axis=0))
  return out


def top_scores(score: np.ndarray, k: int) -> np.ndarray:
  order = np.argsort(-score, kind="stable")
  return np.sort(order[:max(1, min(k, len(score)))])


def _kept_sets(model: resnet.ResNet, groups, unit_scores, scope: str, level: float) -> list[np.ndarray]:
  kept = [np.arange(w) for w in model.shape.widths]
  for g, s in zip(groups, unit_scores):
    if scope == "layer":
      idx = top_scores(s, math.floor(level * len(s) + 1e-9))
    else:
      idx = np.flatnonzero(s >= level)
      if not len(idx):
        idx = top_scores(s, 1)  # never prune a conv away entirely
    for e in g:
      kept[e] = idx
  return kept


def _prune(model: resnet.ResNet, scores: dict[int, np.ndarray], target: float, tolerance: float, scope: str,
           residual: str, method: str, normalise: bool, source: str) -> Pruned:
  check_target(target, tolerance)
  if scope not in SCOPES:
    raise PruneError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
  groups = units(model, residual)
  if not groups:
    raise PruneError("the network has no prunable conv")
  unit_scores = _unit_scores(groups, scores, normalise)
  if scope == "layer":
    # floor(f * n) changes only at f = k / n: those fractions are every distinct result.
    levels = sorted({k / len(s) for s in unit_scores for k in range(1, len(s) + 1)})
  else:  # lower thresholds keep more, so descending thresholds give ascending MACs
    levels = sorted(set(np.concatenate(unit_scores).tolist()), reverse=True)

  def make(level):
    kept = _kept_sets(model, groups, unit_scores, scope, level)
    shape = model.shape.replace(widths=tuple(len(k) for k in kept))
    return kept, shape

  what = f"{method} pruning ({scope} scope, residual {residual}) of this network"
  level, kept, shape, ratio = closest(levels, make, target, tolerance, what)
  net = gather_kept(model, kept)
  return Pruned(shape, net, tuple(np.asarray(k) for k in kept), method, scope, residual, float(level), ratio, source)


def l1_prune(source: str | resnet.ResNet, target_flops_ratio: float, tolerance: float = DEFAULT_TOLERANCE, *,
             scope: str = "layer", residual: str = "keep") -> Pruned:
  """Li et al.'s L1-norm filter pruning of a trained network (a training run directory or a network).

  ``scope="layer"``: every prunable unit keeps ``max(1, floor(f * n))`` of its
  n filters, those of largest L1 norm, with one f for all. ``scope="global"``:
  filters whose L1 norm, divided by their layer's mean, reaches one threshold
  are kept (at least one per layer). Units per ``residual``, see :func:`units`.
  """
  model, where = load_source(source)
  return _prune(model, l1_norms(model), target_flops_ratio, tolerance, scope, residual, "l1", True, where)


def slimming_prune(source: str | resnet.ResNet, target_flops_ratio: float, tolerance: float = DEFAULT_TOLERANCE, *,
                   scope: str = "global", residual: str = "keep") -> Pruned:
  """Network Slimming's pruning of a (sparsity-trained) network: one global threshold on ``|gamma|``.

  The threshold over the batch-norm scales of all prunable convs is chosen by
  bisection to hit the MAC target (Liu et al. fix a channel percentage
  instead: :func:`slimming_percent`); every conv keeps at least its largest-scale channel.
  ``scope="layer"`` ranks channels by ``|gamma|`` within each conv and keeps
  the same fraction everywhere.
  """
  model, where = load_source(source)
  return _prune(model, bn_scales(model), target_flops_ratio, tolerance, scope, residual, "slimming", False, where)


def slimming_percent(source: str | resnet.ResNet, prune_percent: float, *, residual: str = "keep") -> Pruned:
  """Network Slimming's own rule: remove a fixed fraction of all prunable channels by one threshold on ``|gamma|``.

  The threshold is the ``int(total * prune_percent)``-th smallest scale over
  the channels of every prunable unit (:func:`units`), and a channel is kept
  when its scale exceeds it, as the Rethinking code's ``--percent`` does (0.4
  for ResNet-164, 0.7 for VGG-19 on CIFAR-10); every conv keeps at least its
  largest-scale channel. Unlike :func:`slimming_prune` the MACs are whatever
  this leaves. The Rethinking code counts every batch norm of its
  pre-activation networks; here only the units' channels count, since the
  residual stream keeps its width under ``residual="keep"``.
  """
  if not 0.0 < prune_percent < 1.0:
    raise PruneError(f"prune_percent must lie in (0, 1), got {prune_percent}")
  model, where = load_source(source)
  groups = units(model, residual)
  if not groups:
    raise PruneError("the network has no prunable conv")
  unit_scores = _unit_scores(groups, bn_scales(model), False)
  ranked = np.sort(np.concatenate(unit_scores))
  threshold = float(ranked[int(len(ranked) * prune_percent)])
  kept = [np.arange(w) for w in model.shape.widths]
  for g, s in zip(groups, unit_scores):
    idx = np.flatnonzero(s > threshold)
    for e in g:
      kept[e] = idx if len(idx) else top_scores(s, 1)
  net = gather_kept(model, kept)
  return Pruned(net.shape, net, tuple(np.asarray(k) for k in kept), "slimming", "global", residual, threshold,
                macs_ratio(net.shape), where)


def load_source(source: str | resnet.ResNet) -> tuple[resnet.ResNet, str]:
  if isinstance(source, resnet.ResNet):
    return source, ""
  if not os.path.isdir(source):
    raise PruneError(f"base run {source} does not exist")
  try:
    _, model = models.load_model(source)
  except runs.RunError as e:
    raise PruneError(str(e)) from None
  return model, source


def gather_kept(model: resnet.ResNet, kept) -> resnet.ResNet:
  try:
    return surgery.gather(model, kept)
  except shapes.ShapeError as e:
    raise PruneError(str(e)) from None
