"""Pruning baselines: shapes at a MAC target from uniform scaling, random sampling, L1-norm and Network Slimming.

Every producer returns a :class:`~tas_jax.core.shapes.Shape` whose MACs
(:func:`tas_jax.core.cost.count`) lie within ``tolerance`` (absolute, on the ratio)
of ``target_flops_ratio`` times the MACs of the unpruned network of the same
family, or raises :class:`PruneError` saying which ratios are reachable.

* :func:`uniform`: one width ratio r for every conv, ``max(1, floor(r *
  nominal))``, optionally fewer blocks per stage; r is found by bisection over
  the ratios where some width changes, so the search is exact.
* :func:`random_shape`: shapes drawn uniformly from the TAS search space
  (:func:`tas_jax.core.space.search_space`), rejected until inside the band. Draws
  are counted in large batches with the on-device counter
  (:meth:`tas_jax.nets.supernet.Supernet.discrete_cost`). The space's MAC ratios concentrate
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

Network Slimming trains with an L1 penalty on batch-norm scales first: a
training run with ``bn_l1 > 0`` chains :func:`tas_jax.core.optim.bn_l1_subgradient`
(``strength * sign(gamma)`` added to the scales' gradients, as the authors'
code does) before its optimiser; there is one training program.

The producers are registered by name in :data:`PRODUCERS`, the names
``python -m tas_jax.cli.prune --method`` takes.
"""

from tas_jax.baselines.li import VARIANTS, LiVariant, li_variant, li_variant_prune, li_variant_shape, li_variant_widths
from tas_jax.baselines.magnitude import (Pruned, bn_scales, conv_modules, l1_norms, l1_prune, slimming_percent,
                                         slimming_prune, units)
from tas_jax.baselines.random_shapes import random_shape
from tas_jax.baselines.store import WEIGHTS_SUFFIX, pruning_info, save, weights_dir
from tas_jax.baselines.targets import (DEFAULT_SPARSITY, DEFAULT_TOLERANCE, METHODS, RESIDUAL, SAMPLERS, SCOPES,
                                       PruneError, check_target, in_band, macs_ratio)
from tas_jax.baselines.uniform_shapes import stage_blocks, uniform, uniform_shape

# Every producer at a MAC target, by the name the command line uses: shape producers take the unpruned
# shape, network producers a trained network (or its run directory) and return a Pruned.
PRODUCERS = {"uniform": uniform, "random": random_shape, "l1": l1_prune, "slimming": slimming_prune}

__all__ = ["DEFAULT_SPARSITY", "DEFAULT_TOLERANCE", "LiVariant", "METHODS", "PRODUCERS", "PruneError", "Pruned",
           "RESIDUAL", "SAMPLERS", "SCOPES", "VARIANTS", "WEIGHTS_SUFFIX", "bn_scales", "check_target",
           "conv_modules", "in_band", "l1_norms", "l1_prune", "li_variant", "li_variant_prune", "li_variant_shape",
           "li_variant_widths", "macs_ratio", "pruning_info", "random_shape", "save", "slimming_percent",
           "slimming_prune", "stage_blocks", "uniform", "uniform_shape", "units", "weights_dir"]
