"""Pruning baselines: shapes at a MAC target from uniform scaling, random sampling, L1-norm and Network Slimming.

Every producer returns a :class:`~tas_jax.shapes.Shape` whose MACs
(:func:`tas_jax.cost.count`) lie within ``tolerance`` (absolute, on the ratio)
of ``target_flops_ratio`` times the MACs of the unpruned network of the same
family, or raises :class:`PruneError` saying which ratios are reachable.

* :func:`uniform`: one width ratio r for every conv, ``max(1, floor(r *
  nominal))``, optionally fewer blocks per stage; r is found by bisection over
  the ratios where some width changes, so the search is exact.
* :func:`random_shape`: shapes drawn uniformly from the TAS search space
  (:func:`tas_jax.shapes.search_space`), rejected until inside the band. Draws
  are counted in large batches with the on-device counter
  (:func:`tas_jax.cost.discrete_cost`). The space's MAC ratios concentrate
  around a quarter of the unpruned network, so a band far above that is
  practically never hit; ``sampler="walk"`` then climbs into the band and runs
  a random walk that stays in it (Metropolis with a uniform target over the
  in-band shapes), an approximately uniform draw of the same distribution.
* :func:`l1_prune` (Li et al. 2017) and :func:`slimming_prune` (Liu et al.
  2017) prune a trained network: filters are ranked by the L1 norm of their
  kernels or by the magnitude of their batch-norm scale, and either every
  prunable conv keeps the same fraction (``scope="layer"``) or one threshold
  over all of them decides (``scope="global"``); the fraction or threshold is
  found by bisection on the exact counter. They return a :class:`Pruned`: the
  shape and the pruned network carrying the kept filters' weights (every
  conv's kernel gathered by the kept indices of its input and output
  channels), ready for fine-tuning.
* Two rules as the papers apply them, with no MAC target:
  :func:`li_variant_prune` cuts Li et al.'s published ResNet-56-A/B and
  ResNet-110-A/B (fixed per-stage fractions of each block's first conv,
  sensitive layers skipped; :func:`li_variant_shape` gives the shape without
  weights), and :func:`slimming_percent` removes a fixed fraction of all
  channels by one threshold on ``|gamma|``, as Network Slimming does.

Residual-coupled widths. A block's last conv, the stem and the identity
shortcuts all write the same residual channels, so they cannot drop channels
independently without changing what the network computes. Two policies:

* ``residual="keep"`` (default; what Li et al. do for ResNet-56/110): only the
  convs inside a block (conv_a of a basic block; conv_1x1 and conv_3x3 of a
  bottleneck) are pruned; the stem and every block's output keep their width.
* ``residual="group"``: the residual stream is pruned too, with one kept
  channel set shared by every conv writing the same stream (the stem and the
  last conv of the blocks up to the next projection shortcut, i.e. one group
  per stage), ranked by the members' scores averaged. Identity shortcuts then
  still connect the same channels, and a projection shortcut is gathered like
  a conv.

Either way the pruned network is the source restricted to the kept channels.
The one exception: if the pruned widths of a stride-1 projection's two sides
happen to coincide (a bottleneck network's first block, in group mode), the
pruned network has an identity there, as every network built from a shape
does.

Network Slimming trains with an L1 penalty on batch-norm scales first.
:func:`bn_l1_penalty` gives the penalty for a loss, :func:`bn_l1_subgradient`
the equivalent optax transformation (``strength * sign(gamma)`` added to the
scales' gradients, as the authors' code does), and a training config carrying
``bn_l1 > 0`` asks for it. The training engine (:mod:`tas_jax.train`) has no
hook for an extra gradient term, so :func:`sparsity_train` runs that training
with the engine's own pieces (plan, step, checkpoints, loop, evaluation,
saved model), swapping only the optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tas_jax import cost as cost_lib
from tas_jax import data as data_lib
from tas_jax import engine
from tas_jax import resnet
from tas_jax import shapes
from tas_jax import train
from tas_jax.shapes import Shape

log = logging.getLogger("tas_jax")

METHODS = ("uniform", "random", "l1", "slimming")
SCOPES = ("layer", "global")
RESIDUAL = ("keep", "group")
SAMPLERS = ("rejection", "walk")
DEFAULT_TOLERANCE = 0.02
DEFAULT_SPARSITY = 1e-5  # Network Slimming's s for ResNet-164 and DenseNet-40 (PRUNING-BASELINES 1.2)
WEIGHTS_SUFFIX = ".model"


class PruneError(ValueError):
  """A pruning request that cannot be met; the message says why and what is reachable."""


def macs_ratio(shape: Shape) -> float:
  """MACs of ``shape`` over MACs of the unpruned network of its family."""
  return cost_lib.count(shape).macs / cost_lib.count(shapes.full_shape(shape)).macs


def check_target(target_flops_ratio: float, tolerance: float = DEFAULT_TOLERANCE) -> None:
  if not 0.0 < target_flops_ratio < 1.0:
    raise PruneError(f"target_flops_ratio must lie in (0, 1), got {target_flops_ratio}")
  if not 0.0 <= tolerance < 1.0:
    raise PruneError(f"tolerance must lie in [0, 1), got {tolerance}")


def in_band(ratio: float, target: float, tolerance: float) -> bool:
  return abs(ratio - target) <= tolerance + 1e-12


def _closest(candidates: Sequence, make: Callable, target: float, tolerance: float, what: str):
  """Bisection over ``candidates``, along which the MAC ratio of ``make(c)`` never decreases.

  ``make(c)`` returns ``(payload, shape)``. Returns ``(candidate, payload,
  shape, ratio)`` of the candidate nearest the target, or raises
  :class:`PruneError` naming the reachable range or the nearest ratios.
  """
  cache: dict[int, tuple] = {}

  def at(i: int):
    if i not in cache:
      payload, shape = make(candidates[i])
      cache[i] = (candidates[i], payload, shape, macs_ratio(shape))
    return cache[i]

  lo, hi = 0, len(candidates) - 1
  low_ratio, high_ratio = at(lo)[3], at(hi)[3]
  if target - tolerance > high_ratio + 1e-12 or target + tolerance < low_ratio - 1e-12:
    raise PruneError(f"target MAC ratio {target} is out of reach for {what}: reachable ratios lie in "
                     f"[{low_ratio:.4f}, {high_ratio:.4f}]")
  if at(hi)[3] < target:
    best = [at(hi)]
  elif at(lo)[3] >= target:
    best = [at(lo)]
  else:
    while hi - lo > 1:  # invariant: ratio(lo) < target <= ratio(hi)
      mid = (lo + hi) // 2
      if at(mid)[3] < target:
        lo = mid
      else:
        hi = mid
    best = [at(lo), at(hi)]
  found = min(best, key=lambda r: abs(r[3] - target))
  if not in_band(found[3], target, tolerance):
    near = " and ".join(f"{r[3]:.4f}" for r in best)
    raise PruneError(f"no {what} lies within {tolerance} of MAC ratio {target}: the nearest reachable ratios are "
                     f"{near}; widen the tolerance or pick another target")
  return found


# ----------------------------------------------------------------------------- uniform

def stage_blocks(base: Shape, depth_ratio: float) -> tuple[int, ...]:
  """Blocks kept per stage for a depth ratio: ``max(1, round(ratio * n))`` of each stage's n."""
  if not 0.0 < depth_ratio <= 1.0:
    raise PruneError(f"depth_ratio must lie in (0, 1], got {depth_ratio}")
  return tuple(max(1, min(n, math.floor(depth_ratio * n + 0.5))) for n in base.layers)


def uniform_shape(base: Shape, width_ratio: float, blocks: Sequence[int] | None = None) -> Shape:
  """Every conv at ``max(1, floor(width_ratio * nominal))`` channels, ``blocks`` kept per stage (default all)."""
  full = shapes.full_shape(base)
  # The tiny offset keeps floor(k/n * n) == k despite the float product.
  widths = tuple(max(1, math.floor(width_ratio * n + 1e-9)) for n in full.nominal)
  return full.replace(widths=widths, blocks=tuple(blocks) if blocks is not None else full.layers)


def uniform(base: Shape, target_flops_ratio: float, tolerance: float = DEFAULT_TOLERANCE, *,
            depth_ratio: float | None = None, blocks: Sequence[int] | None = None) -> Shape:
  """The uniformly scaled network nearest ``target_flops_ratio`` (see the module docstring).

  ``blocks`` (blocks kept per stage) or ``depth_ratio`` (see
  :func:`stage_blocks`) make it shallower; widths are then scaled to make up
  the rest of the target. The width ratio found can be read back as
  ``shape.widths[i] / shape.nominal[i]``, up to the floor.
  """
  check_target(target_flops_ratio, tolerance)
  if blocks is not None and depth_ratio is not None:
    raise PruneError("give blocks or depth_ratio, not both")
  if depth_ratio is not None:
    blocks = stage_blocks(base, depth_ratio)
  if blocks is not None:
    try:
      shapes.full_shape(base).replace(blocks=tuple(blocks))
    except shapes.ShapeError as e:
      raise PruneError(str(e)) from None
  # A width changes only where ratio * nominal crosses an integer: those ratios are every distinct shape.
  ratios = sorted({k / n for n in set(base.nominal) for k in range(1, n + 1)})
  _, _, shape, _ = _closest(ratios, lambda r: (r, uniform_shape(base, r, blocks)), target_flops_ratio, tolerance,
                            "a uniform shape" + (f" with blocks {list(blocks)}" if blocks is not None else ""))
  return shape


# ----------------------------------------------------------------------------- random

@functools.lru_cache(maxsize=8)
def _batch_counter(base: Shape, search_depth: bool):
  space = shapes.search_space(base, search_depth=search_depth)
  fn = jax.jit(jax.vmap(lambda w, d: cost_lib.discrete_cost(space, w, d)))
  return space, fn


def _draw(rng: np.random.Generator, counts: np.ndarray, n: int) -> np.ndarray:
  return np.minimum((rng.random((n, len(counts))) * counts).astype(np.int32), counts - 1)


def random_shape(base: Shape, target_flops_ratio: float, tolerance: float = DEFAULT_TOLERANCE, *, seed: int = 0,
                 max_tries: int = 1_000_000, sampler: str = "rejection", search_depth: bool = True,
                 walk_steps: int | None = None) -> Shape:
  """A shape of the TAS search space drawn uniformly among those within the band (see the module docstring).

  ``sampler="rejection"`` draws candidate indices uniformly and independently
  per conv and stage (the widths of blocks a draw drops are drawn too, and
  ignored), in batches, and returns the first draw inside the band; after
  ``max_tries`` draws it gives up. ``sampler="walk"`` climbs from a uniform
  draw into the band, then makes ``walk_steps`` (default 20 per conv and
  stage) proposals that each redraw one conv's width or one stage's depth and
  are taken when the result stays in the band. ``search_depth=False`` keeps
  every block. Deterministic in ``seed``.
  """
  check_target(target_flops_ratio, tolerance)
  if sampler not in SAMPLERS:
    raise PruneError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
  if max_tries < 1:
    raise PruneError(f"max_tries must be at least 1, got {max_tries}")
  full = shapes.full_shape(base)
  space, counter = _batch_counter(full, search_depth)
  wcount, dcount = space.width_mask.sum(1), space.depth_mask.sum(1)
  smallest = space.shape_from_indices(np.zeros(len(wcount), int), np.zeros(len(dcount), int))
  low = macs_ratio(smallest)
  if target_flops_ratio + tolerance < low - 1e-12:
    raise PruneError(f"target MAC ratio {target_flops_ratio} is out of reach for the search space: reachable "
                     f"ratios lie in [{low:.4f}, 1.0000]")
  rng = np.random.default_rng(seed)
  if sampler == "walk":
    return _walk(space, target_flops_ratio, tolerance, rng, max_tries, walk_steps)
  full_macs = cost_lib.count(full).macs
  lo_macs = (target_flops_ratio - tolerance) * full_macs
  hi_macs = (target_flops_ratio + tolerance) * full_macs
  tried, batch, seen = 0, 4096, []
  while tried < max_tries:
    n = min(batch, max_tries - tried)
    # Always a full batch, so the counter compiles once; only the first n draws count.
    wi, di = _draw(rng, wcount, batch), _draw(rng, dcount, batch)
    pair = np.asarray(counter(wi, di)).astype(np.int64)[:n]
    macs = pair[:, 0] * 65536 + pair[:, 1]
    hits = np.flatnonzero((macs >= lo_macs - 1e-6) & (macs <= hi_macs + 1e-6))
    seen.append(macs / full_macs)
    tried += n
    if len(hits):
      shape = space.shape_from_indices(wi[hits[0]], di[hits[0]])
      if not in_band(macs_ratio(shape), target_flops_ratio, tolerance):  # the device count disagrees: a bug
        raise AssertionError("the batched counter and cost.count disagree")
      return shape
  ratios = np.concatenate(seen)
  raise PruneError(f"no shape within {tolerance} of MAC ratio {target_flops_ratio} in {tried} uniform draws from "
                   f"the search space (their ratios: median {np.median(ratios):.3f}, 99.9th percentile "
                   f"{np.quantile(ratios, 0.999):.3f}); use the walk sampler, more tries or a wider tolerance")


def _walk(space: shapes.SearchSpace, target: float, tolerance: float, rng: np.random.Generator, max_tries: int,
          walk_steps: int | None) -> Shape:
  counts = np.concatenate([space.width_mask.sum(1), space.depth_mask.sum(1)])
  nw = space.num_convs
  idx = np.concatenate([_draw(rng, counts[:nw], 1)[0], _draw(rng, counts[nw:], 1)[0]])

  def ratio(x):
    return macs_ratio(space.shape_from_indices(x[:nw], x[nw:]))

  def gap(r):
    return max(0.0, abs(r - target) - tolerance - 1e-12)

  r = ratio(idx)
  tries = 0
  while gap(r) > 0:
    if tries >= max_tries:
      raise PruneError(f"the walk did not reach MAC ratio {target} +- {tolerance} in {max_tries} steps "
                       f"(last {r:.4f}); allow more tries or widen the tolerance")
    prop = idx.copy()
    k = rng.integers(len(counts))
    prop[k] = rng.integers(counts[k])
    rp = ratio(prop)
    if gap(rp) <= gap(r):
      idx, r = prop, rp
    tries += 1
  for _ in range(20 * len(counts) if walk_steps is None else walk_steps):
    prop = idx.copy()
    k = rng.integers(len(counts))
    prop[k] = rng.integers(counts[k])
    rp = ratio(prop)
    if in_band(rp, target, tolerance):
      idx, r = prop, rp
  return space.shape_from_indices(idx[:nw], idx[nw:])


# ----------------------------------------------------------------------------- filter pruning of a trained network

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


def _top(score: np.ndarray, k: int) -> np.ndarray:
  order = np.argsort(-score, kind="stable")
  return np.sort(order[:max(1, min(k, len(score)))])


def _kept_sets(model: resnet.ResNet, groups, unit_scores, scope: str, level: float) -> list[np.ndarray]:
  kept = [np.arange(w) for w in model.shape.widths]
  for g, s in zip(groups, unit_scores):
    if scope == "layer":
      idx = _top(s, math.floor(level * len(s) + 1e-9))
    else:
      idx = np.flatnonzero(s >= level)
      if not len(idx):
        idx = _top(s, 1)  # never prune a conv away entirely
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
  level, kept, shape, ratio = _closest(levels, make, target, tolerance, what)
  net = gather(model, kept)
  return Pruned(shape, net, tuple(np.asarray(k) for k in kept), method, scope, residual, float(level), ratio, source)


def l1_prune(source: str | resnet.ResNet, target_flops_ratio: float, tolerance: float = DEFAULT_TOLERANCE, *,
             scope: str = "layer", residual: str = "keep") -> Pruned:
  """Li et al.'s L1-norm filter pruning of a trained network (a training run directory or a network).

  ``scope="layer"``: every prunable unit keeps ``max(1, floor(f * n))`` of its
  n filters, those of largest L1 norm, with one f for all. ``scope="global"``:
  filters whose L1 norm, divided by their layer's mean, reaches one threshold
  are kept (at least one per layer). Units per ``residual``, see :func:`units`.
  """
  model, where = _source(source)
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
  model, where = _source(source)
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
  model, where = _source(source)
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
      kept[e] = idx if len(idx) else _top(s, 1)
  net = gather(model, kept)
  return Pruned(net.shape, net, tuple(np.asarray(k) for k in kept), "slimming", "global", residual, threshold,
                macs_ratio(net.shape), where)


# ----------------------------------------------------------------------------- Li et al.'s published ResNet variants

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
  model, where = _source(source)
  norms = l1_norms(model)
  kept = [np.arange(w) for w in model.shape.widths]
  for e, k in li_variant_widths(model.shape, variant).items():
    kept[e] = _top(norms[e], k)
  net = gather(model, kept)
  return Pruned(net.shape, net, tuple(np.asarray(k) for k in kept), "l1", "layer", "keep", float("nan"),
                macs_ratio(net.shape), where, variant)


def _source(source: str | resnet.ResNet) -> tuple[resnet.ResNet, str]:
  if isinstance(source, resnet.ResNet):
    return source, ""
  if not os.path.isdir(source):
    raise PruneError(f"base run {source} does not exist")
  try:
    _, model = train.load_model(source)
  except engine.RunError as e:
    raise PruneError(str(e)) from None
  return model, source


def _set(variable, value) -> None:
  variable.set_value(jnp.asarray(value, jnp.float32))


def _neutral_bn(bn: nnx.BatchNorm, n: int) -> None:
  # var = 1 - eps makes the eval-mode normalisation an exact identity.
  for name, value in (("scale", 1.0), ("bias", 0.0), ("mean", 0.0), ("var", 1.0 - resnet.BN_EPSILON)):
    _set(getattr(bn, name), np.full((n,), value, np.float32))


def _gather_conv(dst: resnet.ConvBN, src: resnet.ConvBN, cin: np.ndarray, cout: np.ndarray) -> None:
  _set(dst.conv.kernel, np.asarray(src.conv.kernel[...])[:, :, cin][:, :, :, cout])
  if dst.bn is not None and src.bn is not None:
    for name in ("scale", "bias", "mean", "var"):
      _set(getattr(dst.bn, name), np.asarray(getattr(src.bn, name)[...])[cout])
  elif dst.bn is not None:
    _neutral_bn(dst.bn, len(cout))


def gather(source: resnet.ResNet, kept: Sequence[np.ndarray]) -> resnet.ResNet:
  """The network keeping output channels ``kept[e]`` of every width entry e of ``source``, with its weights.

  Each conv's kernel is ``source_kernel[:, :, kept_in, kept_out]``, where
  ``kept_in`` are the kept channels of the conv that feeds it; batch norms and
  the classifier rows follow. A projection shortcut the pruned network has
  where the source has an identity starts as the identity on the channels
  both sides keep (a 0/1 selection kernel, neutral batch norm). The result is
  in eval mode.
  """
  src_shape = source.shape
  if len(kept) != len(src_shape.widths):
    raise PruneError(f"kept lists {len(kept)} convs, the network has {len(src_shape.widths)}")
  kept = [np.asarray(k, np.int64) for k in kept]
  for e, (k, w) in enumerate(zip(kept, src_shape.widths)):
    if not len(k) or k.min() < 0 or k.max() >= w or len(np.unique(k)) != len(k):
      raise PruneError(f"kept channels of conv #{e} must be distinct indices below {w}")
  shape = src_shape.replace(widths=tuple(len(k) for k in kept))
  # Built abstractly: every value is set below, and random init would compile an initialiser per new shape.
  net = nnx.eval_shape(lambda: resnet.build(shape))
  _gather_conv(net.stem, source.stem, np.arange(src_shape.in_channels), kept[0])
  prev = kept[0]
  specs = [b for b in src_shape.layout.blocks if b.index < src_shape.blocks[b.stage]]
  for spec, src, dst in zip(specs, source.blocks, net.blocks):
    cin = prev
    for e, s, d in zip(spec.convs, src.convs, dst.convs):
      _gather_conv(d, s, prev, kept[e])
      prev = kept[e]
    if dst.shortcut is None:
      continue
    if src.shortcut is not None:
      _gather_conv(dst.shortcut, src.shortcut, cin, prev)
    else:
      _set(dst.shortcut.conv.kernel, (cin[:, None] == prev[None, :]).astype(np.float32)[None, None])
      if dst.shortcut.bn is not None:
        _neutral_bn(dst.shortcut.bn, len(prev))
  _set(net.head.kernel, np.asarray(source.head.kernel[...])[prev])
  _set(net.head.bias, np.asarray(source.head.bias[...]))
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(net))):
    raise AssertionError("a variable of the pruned network was left unset")
  net.eval()
  return net


# ----------------------------------------------------------------------------- files

def weights_dir(path: str) -> str:
  """Where :func:`save` puts the weights of the shape file ``path``: ``FILE stem + .model``."""
  return os.path.splitext(path)[0] + WEIGHTS_SUFFIX


def save(shape: Shape, path: str, info: dict | None = None, pruned: Pruned | None = None,
         label: str | None = None) -> str | None:
  """Write ``shape`` to ``path`` (a shape JSON with a ``pruning`` record) and the weights of ``pruned``.

  The record (``info``: method, target, ...) and ``label`` (what produced the
  shape, for tables) are extra keys that :func:`tas_jax.shapes.load` ignores. The weights go to :func:`weights_dir`
  as a model directory (``shape.json`` + Orbax ``params/``, plus
  ``kept.json``), which :func:`tas_jax.train.load_model` reads and a
  ``finetune`` run takes as ``init_from``. Returns that directory or None.
  """
  text = shape.to_json()
  if label:
    text = text[:-2] + f',\n  "label": {json.dumps(label)}\n}}'
  if info:
    text = text[:-2] + f',\n  "pruning": {json.dumps(info, sort_keys=True)}\n}}'
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text + "\n")
  os.replace(tmp, path)
  if pruned is None:
    return None
  out = weights_dir(path)
  train.save_model(out, pruned.shape, nnx.state(pruned.model, nnx.Param), nnx.state(pruned.model, nnx.BatchStat))
  engine.write_json(os.path.join(out, "kept.json"), {"kept": [k.tolist() for k in pruned.kept],
                                                     "source": pruned.source, "method": pruned.method})
  return out


def pruning_info(path: str) -> dict:
  """The ``pruning`` record of a shape file written by :func:`save` ({} for any other file)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return {}
  return d.get("pruning") or {} if isinstance(d, dict) else {}


# ----------------------------------------------------------------------------- sparsity training (Network Slimming)

def _is_bn_scale(path) -> bool:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return len(names) >= 2 and names[-2:] == ["bn", "scale"]


def bn_scale_mask(params) -> Any:
  """A tree like ``params`` (an ``nnx.State`` of ``nnx.Param``): True at every batch-norm scale."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _is_bn_scale(p), params)


def bn_l1_penalty(params, strength: float) -> jax.Array:
  """``strength * sum |gamma|`` over every batch-norm scale: Network Slimming's sparsity term, for a loss."""
  leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if _is_bn_scale(p)]
  return strength * sum(jnp.abs(x).sum() for x in leaves)


def bn_l1_subgradient(strength: float) -> optax.GradientTransformation:
  """Adds ``strength * sign(gamma)`` to the gradient of every batch-norm scale (the penalty's subgradient).

  Chain it before the optimiser (``optax.chain(bn_l1_subgradient(s), tx)``);
  it reads the parameters, so ``update`` must get them.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("bn_l1_subgradient needs the parameters")
    out = jax.tree_util.tree_map_with_path(
        lambda p, g, w: g + strength * jnp.sign(w).astype(g.dtype) if _is_bn_scale(p) else g, updates, params)
    return out, state

  return optax.GradientTransformation(init, update)


def sparsity_train(config, workdir: str, distributed=None) -> dict:
  """Network Slimming's sparsity training: a ``base`` (or ``finetune``) run with ``config.bn_l1`` on the scales.

  Trains as :func:`tas_jax.train.run` does (same plan, step, augmentation,
  checkpoints and resume, final-epoch test accuracy) with the optimiser
  chained after :func:`bn_l1_subgradient`; no validation hold-out. Writes
  ``model/`` (read by :func:`tas_jax.train.load_model`), ``result.json``
  (``mode`` ``"sparsity"``, ``bn_l1``, the mean ``|gamma|``) and metrics.
  """
  strength = float(config.get("bn_l1", 0.0) or 0.0)
  if strength < 0:
    raise engine.RunError(f"bn_l1 must be non-negative, got {strength}")
  if config.mode not in ("base", "finetune"):
    raise engine.RunError(f"sparsity training starts from scratch (mode base) or from a run (finetune), "
                          f"got mode {config.mode!r}")
  if int(config.get("val_examples", 0) or 0):
    raise engine.RunError("sparsity training holds out no validation split; set val_examples=0")
  t_start = time.time()
  run_ = engine.start(config, workdir, distributed)
  dataset = engine.load_data(config)
  bs = int(config.batch_size)
  eval_bs = int(config.get("eval_batch_size") or bs)
  engine.check_batch_size(bs)
  engine.check_batch_size(eval_bs)
  shape, net = train.initial_network(config, dataset.num_classes, train.compute_dtype(config))
  plan = train.make_plan(config, shape)
  n_train = dataset.num_examples("train")
  if n_train < bs:
    raise engine.RunError(f"batch_size {bs} exceeds the {n_train} training examples")
  batches = data_lib.Batches(n_train, bs, seed=int(config.seed))
  spe = batches.steps_per_epoch
  total = spe * plan.epochs
  problem, state, _ = train.build(config, net, plan, spe, dataset.mean, dataset.std, bool(dataset.streaming))
  tx = optax.chain(bn_l1_subgradient(strength), problem.tx)
  problem = dataclasses.replace(problem, tx=tx)
  state["opt"] = tx.init(state["params"])
  state = engine.replicate(run_, state)
  fp = engine.fingerprint(config, train.FINGERPRINT_KEYS + ("bn_l1",))
  fp.update(train.augment_fingerprint(config, problem))
  ckpt = engine.open_checkpoints(run_, fp)
  state, meta, start = engine.restore(run_, ckpt, state)
  log.info("sparsity training of %s: bn_l1 %g, %d epochs of %d steps", config.get("shape") or config.model,
           strength, plan.epochs, spe)
  step_fn, compile_s = train.compile_step(problem, run_.mesh, state, bs, dataset.image_size)
  test_eval = engine.Evaluator(run_, dataset, "test", np.arange(dataset.num_examples("test")), eval_bs,
                               train.logits_fn(problem))
  mask = bn_scale_mask(state["params"])

  def mean_gamma(params) -> float:
    vals = [np.abs(np.asarray(x)).ravel() for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
    return float(np.concatenate(vals).mean())

  prefetch = data_lib.Prefetcher(
      lambda step: engine.device_batch(run_, dataset, "train", batches.indices(step), step), start, end_step=total)

  def save(state, step):
    ckpt.save(step, state, meta={"epoch": step // spe, "step": step}, force=True)

  loop = engine.make_loop(run_, config, total_steps=total, steps_per_epoch=spe, save=save,
                          on_epoch=lambda state, epoch, averaged: {"mean_abs_gamma": mean_gamma(state["params"])})
  state = engine.drive(run_, loop, state, start, lambda state, step: step_fn(state, next(prefetch), None),
                       prefetch, ckpt)
  if state is None:
    return {"finished": False, "step": min(total, start + loop.stop_after)}
  variables = {"params": state["params"], "stats": state["stats"]}
  top1, top5 = test_eval(variables)
  train.save_model(run_.path(train.MODEL_DIR), shape, state["params"], state["stats"], run_.is_main)
  c = cost_lib.count(shape)
  result = {"finished": True, "mode": "sparsity", "bn_l1": strength, "recipe": config.get("recipe", ""),
            "test_top1": top1, "test_top5": top5, "macs": c.macs, "params": c.params,
            "flops_ratio": c.macs / cost_lib.count(shapes.full_shape(shape)).macs, "shape": shape.to_dict(),
            "shape_spec": config.get("shape") or config.get("model"), "model": config.get("model"),
            "dataset": dataset.name, "seed": int(config.seed), "epochs": plan.epochs, "steps": total,
            "batch_size": bs, "mean_abs_gamma": mean_gamma(state["params"]), "wall_s": time.time() - t_start,
            "compile_s": compile_s}
  if run_.is_main:
    engine.write_json(run_.path("result.json"), result)
  run_.writer.close()
  ckpt.close()
  return result
