"""Deriving the final architecture (METHOD.md §5): the argmax shape moved into the cost band when it lies outside."""

from __future__ import annotations

import numpy as np

from tas_jax.core import cost as cost_lib
from tas_jax.core import shapes
from tas_jax.core import space as space_lib


def fit_to_band(space: space_lib.SearchSpace, width_probs, depth_probs, shape: shapes.Shape, band,
                max_moves: int = 10_000, cost_fn=None) -> tuple[shapes.Shape, int]:
  """Move a shape into the cost band by the single-candidate changes that cost the least probability.

  The argmax of a short search can sit just outside the band while its
  distributions are still nearly flat. Each move changes one conv to its next
  narrower (or wider) candidate, or one stage to its next depth choice, picking
  the move that loses the least log-probability per MAC moved towards the band,
  and never jumps over the band if another move lands in or before it. The
  official code keeps the raw argmax (``fit_to_band=False``); both are written.
  ``cost_fn(shape)`` is the cost the band is in (default: exact MACs).
  Returns the shape and the number of moves.
  """
  cost_fn = cost_fn or (lambda sh: cost_lib.count(sh).macs)
  low, high = band
  wi, di = space.indices_of(shape)
  logw = np.log(np.maximum(width_probs, 1e-12))
  logd = np.log(np.maximum(depth_probs, 1e-12))
  macs = cost_fn(shape)
  moves = 0
  while not low <= macs <= high and moves < max_moves:
    down = macs > high
    best = None
    candidates = []
    for l in range(len(wi)):
      for j in _neighbours(space.width_table[l], space.width_mask[l], wi[l], down):
        candidates.append(("w", l, j, logw[l, wi[l]] - logw[l, j]))
    for s_ in range(len(di)):
      for j in _neighbours(space.depth_table[s_], space.depth_mask[s_], di[s_], down):
        candidates.append(("d", s_, j, logd[s_, di[s_]] - logd[s_, j]))
    neutral = None  # a move that changes nothing now but may unblock a later one (a dropped block's width)
    for kind, i, j, loss in candidates:
      w2, d2 = wi.copy(), di.copy()
      (w2 if kind == "w" else d2)[i] = j
      new = cost_fn(space.shape_from_indices(w2, d2))
      gain = (macs - new) if down else (new - macs)
      if gain == 0 and (neutral is None or loss < neutral[0][1]):
        neutral = ((False, loss), w2, d2, new)
      if gain <= 0:
        continue
      overshoot = new < low if down else new > high
      key = (overshoot, loss / gain)
      if best is None or key < best[0]:
        best = (key, w2, d2, new)
    best = best or neutral
    if best is None:
      break
    _, wi, di, macs = best
    moves += 1
  return space.shape_from_indices(wi, di), moves


def _neighbours(row, mask, current, down):
  """The next smaller (down) or larger candidate of a table row, by value."""
  values = [(int(v), j) for j, (v, ok) in enumerate(zip(row, mask)) if ok]
  cur = int(row[current])
  if down:
    smaller = [(v, j) for v, j in values if v < cur]
    return [max(smaller)[1]] if smaller else []
  larger = [(v, j) for v, j in values if v > cur]
  return [min(larger)[1]] if larger else []
