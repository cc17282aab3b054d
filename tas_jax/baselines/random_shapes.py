"""Random shapes at a MAC target: uniform draws from the TAS search space, rejected until inside the band.

The space's MAC ratios concentrate around a quarter of the unpruned network,
so a band far above that is practically never hit; ``sampler="walk"`` then
climbs into the band and runs a random walk that stays in it (Metropolis with
a uniform target over the in-band shapes).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from tas_jax.core import cost as cost_lib
from tas_jax.core import shapes
from tas_jax.core import space as space_lib
from tas_jax.core.shapes import Shape
from tas_jax.nets import supernet
from tas_jax.baselines.targets import DEFAULT_TOLERANCE, PruneError, SAMPLERS, check_target, in_band, macs_ratio



@functools.lru_cache(maxsize=8)
def _batch_counter(base: Shape, search_depth: bool):
  config = supernet.SupernetConfig(mode="shape" if search_depth else "width")
  model = supernet.build(base.replace(allow_wider=False), config, abstract=True)
  fn = jax.jit(jax.vmap(model.discrete_cost))
  return model.space, fn


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


def _walk(space: space_lib.SearchSpace, target: float, tolerance: float, rng: np.random.Generator, max_tries: int,
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
