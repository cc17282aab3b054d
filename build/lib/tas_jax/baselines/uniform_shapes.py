"""Uniform scaling: one width ratio for every conv (optionally fewer blocks per stage), found by exact bisection."""

from __future__ import annotations

import math
from typing import Callable, Sequence


from tas_jax.core import shapes
from tas_jax.core.shapes import Shape
from tas_jax.baselines.targets import DEFAULT_TOLERANCE, PruneError, check_target, in_band, macs_ratio



def closest(candidates: Sequence, make: Callable, target: float, tolerance: float, what: str):
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
  _, _, shape, _ = closest(ratios, lambda r: (r, uniform_shape(base, r, blocks)), target_flops_ratio, tolerance,
                            "a uniform shape" + (f" with blocks {list(blocks)}" if blocks is not None else ""))
  return shape
