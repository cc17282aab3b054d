"""MAC targets of the baselines: the ratio of a shape, the band it must fall in, and the error when it cannot."""

from __future__ import annotations



from tas_jax.core import cost as cost_lib
from tas_jax.core import shapes
from tas_jax.core.shapes import Shape

METHODS = ("uniform", "random", "l1", "slimming")
SCOPES = ("layer", "global")
RESIDUAL = ("keep", "group")
SAMPLERS = ("rejection", "walk")
DEFAULT_TOLERANCE = 0.02
DEFAULT_SPARSITY = 1e-5  # Network Slimming's s for ResNet-164 and DenseNet-40 (METHOD.md §7.2)


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
