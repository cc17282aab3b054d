"""TAS's search space (METHOD.md §1.2, §1.3): width candidates of every conv, depth candidates of every stage."""

from __future__ import annotations

import dataclasses
import fractions
from typing import Sequence

import numpy as np

from tas_jax.core.shapes import WIDTH_RATIOS, Layout, Shape, ShapeError, full_shape, is_unpruned


def width_choices(nominal: int, ratios: Sequence[float] = WIDTH_RATIOS, multiple: int = 1) -> tuple[int, ...]:
  """METHOD.md §1.2: candidate widths floor(nominal * r), deduplicated and sorted.

  The ratios are read as exact decimals, so floor(32 * 0.7) is 22 with no
  floating-point surprise. ``multiple > 1`` rounds each candidate to the
  nearest positive multiple (at most ``nominal``), for accelerator-friendly widths.
  """
  out = set()
  for r in ratios:
    c = int(fractions.Fraction(str(r)) * nominal)
    if multiple > 1:
      c = min(max(multiple, multiple * round(c / multiple)), nominal)
    if c >= 1:
      out.add(c)
  if not out:
    raise ShapeError(f"no candidate width >= 1 for nominal width {nominal} and ratios {list(ratios)}")
  return tuple(sorted(out))


def depth_choices(arch: str, layers: Sequence[int]) -> tuple[tuple[int, ...], ...]:
  """METHOD.md §1.3: the blocks a stage may keep.

  CIFAR: n <= 3 gives 1..n; n > 3 the odd numbers up to n, plus n.
  ImageNet: with m = min(layers), stage i gets int(layers_i * j / m), j = 1..m.
  """
  if arch == "cifar":
    out = []
    for n in layers:
      if n <= 3:
        out.append(tuple(range(1, n + 1)))
      else:
        c = list(range(1, n + 1, 2))
        if c[-1] != n:
          c.append(n)
        out.append(tuple(c))
    return tuple(out)
  m = min(layers)
  return tuple(tuple(sorted({int(n * j / m) for j in range(1, m + 1)})) for n in layers)


@dataclasses.dataclass(frozen=True, eq=False)
class SearchSpace:
  """The candidates TAS chooses from for every conv and stage of a base network.

  ``width_table[l]`` holds conv l's candidate widths, padded to a common count
  by repeating the largest (``width_mask`` marks the real ones);
  ``depth_table[s]`` likewise holds stage s's depth choices. With
  ``search_width=False`` every conv has the single candidate of its unpruned
  width; with ``search_depth=False`` every stage the single choice of all its
  blocks (the ``depth`` and ``width`` search modes of METHOD.md §8).
  """

  base: Shape
  width_table: "np.ndarray"  # int32 [L, K]
  width_mask: "np.ndarray"  # bool [L, K]
  depth_table: "np.ndarray"  # int32 [S, Kd]
  depth_mask: "np.ndarray"  # bool [S, Kd]

  @property
  def num_convs(self) -> int:
    return self.width_table.shape[0]

  @property
  def layout(self) -> Layout:
    return self.base.layout

  def shape_from_indices(self, width_idx, depth_idx) -> Shape:
    """The shape picked by one candidate index per conv and per stage."""
    width_idx, depth_idx = np.asarray(width_idx), np.asarray(depth_idx)
    widths = self.width_table[np.arange(self.num_convs), width_idx]
    blocks = self.depth_table[np.arange(len(depth_idx)), depth_idx]
    return self.base.replace(widths=tuple(int(w) for w in widths), blocks=tuple(int(b) for b in blocks),
                             allow_wider=False)

  def indices_of(self, shape: Shape):
    """Candidate indices of ``shape`` (which must lie in this space)."""
    if shape.layers != self.base.layers or shape.arch != self.base.arch or shape.block != self.base.block:
      raise ShapeError("shape is not of this search space's network family")
    wi, di = [], []
    for l, w in enumerate(shape.widths):
      hits = np.flatnonzero((self.width_table[l] == w) & self.width_mask[l])
      if not len(hits):
        raise ShapeError(f"width #{l} = {w} is not a candidate {sorted(set(self.width_table[l].tolist()))}")
      wi.append(int(hits[0]))
    for s, b in enumerate(shape.blocks):
      hits = np.flatnonzero((self.depth_table[s] == b) & self.depth_mask[s])
      if not len(hits):
        raise ShapeError(f"stage {s} depth {b} is not a choice {sorted(set(self.depth_table[s].tolist()))}")
      di.append(int(hits[0]))
    return np.array(wi, np.int32), np.array(di, np.int32)


def search_space(base: Shape, *, ratios: Sequence[float] = WIDTH_RATIOS, multiple: int = 1,
                 search_width: bool = True, search_depth: bool = True,
                 depth_options: Sequence[Sequence[int]] | None = None) -> SearchSpace:
  """Candidate widths (METHOD.md §1.2) and depth choices (1.3) for every conv and stage of ``base``."""
  if not is_unpruned(base):
    base = full_shape(base)
  if search_width:
    rows = [width_choices(n, ratios, multiple) for n in base.nominal]
  else:
    rows = [(n,) for n in base.nominal]
  if not search_depth:
    drows = [(n,) for n in base.layers]
  elif depth_options is not None:
    drows = [tuple(sorted(set(int(v) for v in d))) for d in depth_options]
    if len(drows) != len(base.layers) or any(not d or d[0] < 1 or d[-1] > n for d, n in zip(drows, base.layers)):
      raise ShapeError(f"depth choices {depth_options} do not fit layers {list(base.layers)}")
  else:
    drows = list(depth_choices(base.arch, base.layers))
  return SearchSpace(base, *_pad_rows(rows), *_pad_rows(drows))


def _pad_rows(rows):
  k = max(len(r) for r in rows)
  table = np.array([list(r) + [r[-1]] * (k - len(r)) for r in rows], np.int32)
  mask = np.array([[i < len(r) for i in range(k)] for r in rows], bool)
  return table, mask


