"""Pruning baselines: a shape (and, for l1 and slimming, its inherited weights) at a MAC target or by a paper's rule.

  python -m tas_jax.cli.prune --method uniform --base resnet56 --target_flops_ratio 0.5 --out runs/r56-uniform.json
  python -m tas_jax.cli.prune --method random --base resnet56 --target_flops_ratio 0.3 --seed 1 --out r56-random.json
  python -m tas_jax.cli.prune --method l1 --base runs/r56-base --target_flops_ratio 0.6 --scope layer --out r56-l1.json
  python -m tas_jax.cli.prune --method slimming --base resnet56 --workdir runs/r56-sparsity --recipe rethinking \\
      --sparsity 1e-5 --target_flops_ratio 0.6 --out r56-slimming.json
  # the papers' own rules: Li et al.'s ResNet-56-B, Network Slimming's 40 % of the channels
  python -m tas_jax.cli.prune --method l1 --base runs/r56-base --variant B --out r56-l1-B.json
  python -m tas_jax.cli.prune --method l1 --base resnet110 --variant A --shape_only --out r110-A.json
  python -m tas_jax.cli.prune --method slimming --base runs/r164-sparsity --prune_percent 0.4 --out r164-ns40.json

--base is a shape (preset name, shape JSON, official .config) or a finished
training run directory. uniform and random only count MACs (a run stands for
its shape's family). l1 and slimming prune a trained network: a run directory,
or, with --workdir, the unpruned network of --base's family trained there
first (l1: an ordinary base run; slimming: sparsity training with an L1
penalty of --sparsity on batch-norm scales), resumably. --set KEY=VALUE overrides that training's configuration
(tas_jax/configs/train.py keys).

Instead of --target_flops_ratio: --variant A|B (l1) builds Li et al.'s
ResNet-56/110-A/B as the Rethinking code does (each block's first conv loses
a fixed fraction per stage, sensitive layers skipped), keeping the filters of
largest L1 norm of a trained network; with a preset as --base it needs
--shape_only, which writes the shape without weights. --prune_percent P
(slimming) removes the fraction P of the prunable channels by one global
threshold on |gamma|, Network Slimming's own rule.

Writes the shape JSON to --out, with a "pruning" record (method, target,
achieved ratio, ...) that shape loaders ignore; l1 and slimming also write the
pruned network with the kept filters' weights to the same path with
".model" instead of its extension, a model directory that
``tas_jax.cli.train --config.mode=finetune --config.init_from=DIR`` and
``tas_jax.cli.protocol --inherit`` take. Bad input: one line on stderr, exit 2.
See tas_jax.baselines for the methods and the choices they make.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tas_jax import baselines, data  # noqa: E402
from tas_jax.configs import train as train_configs
from tas_jax.programs import protocol, train
from tas_jax.runtime import models
from tas_jax.runtime import checkpoint, files, runs
from tas_jax.core import cost, shapes
from tas_jax.core import shape_files


def _is_run(path: str) -> bool:
  return os.path.isdir(path)


def _base_shape(spec: str) -> shapes.Shape:
  if _is_run(spec):
    model_dir = os.path.join(spec, models.MODEL_DIR)
    for path in (os.path.join(model_dir, "shape.json"), os.path.join(spec, "shape.json")):
      if os.path.isfile(path):
        return shape_files.load(path)
    raise baselines.PruneError(f"{spec} holds no trained network or shape (no model/shape.json)")
  return shape_files.resolve(spec)


def _trained_base(args) -> str:
  """The run directory holding the network to prune, trained into --workdir first when --base is a shape."""
  if _is_run(args.base):
    if args.workdir:
      raise baselines.PruneError("--workdir trains a base network: give --base as a shape, not a run directory")
    return args.base
  if os.path.sep in args.base and not os.path.exists(args.base):
    raise baselines.PruneError(f"base run {args.base} does not exist")
  shape = shape_files.resolve(args.base)
  if not args.workdir:
    raise baselines.PruneError(f"--method {args.method} prunes a trained network: give --base as a finished run "
                               f"directory, or add --workdir DIR to train {args.base} there first")
  config = train_config(shape, args.recipe, args.set)
  config.mode, config.model = "base", protocol.family_preset(shape)
  if os.path.isfile(os.path.join(args.workdir, "result.json")):
    return args.workdir
  if args.method == "slimming":
    config.bn_l1 = float(args.sparsity)
    result = train.run(config, args.workdir)
  else:
    result = train.run(config, args.workdir)
  if not result.get("finished"):
    raise baselines.PruneError(f"training in {args.workdir} stopped early; rerun to resume it")
  return args.workdir


def train_config(shape: shapes.Shape, recipe: str, overrides):
  """The training config of --workdir: the recipe for ``shape``'s family, with ``bn_l1`` and the overrides."""
  try:
    config = train_configs.get_config(f"{protocol.family_preset(shape)},{recipe}")
  except ValueError as e:  # an unknown recipe
    raise baselines.PruneError(str(e)) from None
  config.bn_l1 = 0.0
  protocol.apply_overrides(config, overrides, protected=("mode",))
  return config


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.prune``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", required=True, help=f"one of {', '.join(baselines.METHODS)}")
  parser.add_argument("--base", required=True, help="a shape (preset, JSON, .config) or a finished run directory")
  parser.add_argument("--target_flops_ratio", type=float, default=None,
                      help="MACs over the unpruned network's (every rule but --variant and --prune_percent)")
  parser.add_argument("--variant", default=None,
                      help="l1: Li et al.'s published ResNet-56/110 variant A or B instead of a MAC target")
  parser.add_argument("--shape_only", action="store_true",
                      help="--variant: write the shape alone, without a trained network or weights")
  parser.add_argument("--prune_percent", type=float, default=None,
                      help="slimming: remove this fraction of the channels by one global threshold on |gamma| "
                           "instead of a MAC target (Rethinking: 0.4 ResNet-164, 0.7 VGG-19)")
  parser.add_argument("--out", required=True, help="shape JSON to write")
  parser.add_argument("--tolerance", type=float, default=baselines.DEFAULT_TOLERANCE,
                      help="absolute tolerance on the ratio (default 0.02)")
  parser.add_argument("--seed", type=int, default=0, help="random: the draw's seed")
  parser.add_argument("--scope", choices=baselines.SCOPES, default=None,
                      help="l1, slimming: one fraction per layer or one global threshold (default: l1 layer, "
                           "slimming global)")
  parser.add_argument("--residual", choices=baselines.RESIDUAL, default="keep",
                      help="l1, slimming: keep the residual stream's width, or prune it per stage group")
  parser.add_argument("--depth_ratio", type=float, default=None, help="uniform: keep this fraction of each stage")
  parser.add_argument("--blocks", default=None, help="uniform: blocks kept per stage, e.g. 5,5,5")
  parser.add_argument("--sampler", choices=baselines.SAMPLERS, default="rejection", help="random: how to draw")
  parser.add_argument("--max_tries", type=int, default=1_000_000, help="random: draws before giving up")
  parser.add_argument("--no_depth", action="store_true", help="random: keep every block")
  parser.add_argument("--workdir", default=None, help="l1, slimming: train --base (a shape) here first")
  parser.add_argument("--recipe", default="official", help="training recipe for --workdir (official, rethinking, "
                      "rethinking-imagenet, imagenet, smoke)")
  parser.add_argument("--sparsity", type=float, default=baselines.DEFAULT_SPARSITY,
                      help="slimming: L1 strength on batch-norm scales for --workdir training (default 1e-5)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a training configuration key for --workdir (repeatable)")
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(protocol.config_flags_to_set(argv if argv is not None else sys.argv[1:]))
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("tas_jax").setLevel(logging.INFO)
  try:
    _check_flags(args)
    problem = files.output_problem(args.out)
    if problem:
      raise baselines.PruneError(f"--out: {problem}")
    info = {"method": args.method, "base": args.base}
    if args.target_flops_ratio is not None:
      info.update(target_flops_ratio=args.target_flops_ratio, tolerance=args.tolerance)
    if args.variant:
      shape, pruned = _li_variant(args, info)
    elif args.method in ("uniform", "random"):
      shape, pruned = _counted(args, info), None
    else:
      shape, pruned = _trained(args, info)
    c = cost.count(shape)
    ratio = baselines.macs_ratio(shape)
    info.update(macs=c.macs, params=c.params, ratio=ratio)
    weights = baselines.save(shape, args.out, info, pruned)
  except (baselines.PruneError, shapes.ShapeError, runs.RunError, data.DataError, checkpoint.CheckpointError,
          protocol.ProtocolError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  full = cost.count(shapes.full_shape(shape))
  what = f"{args.method} {args.variant}" if args.variant else args.method
  goal = (f"target {args.target_flops_ratio} +- {args.tolerance}" if args.target_flops_ratio is not None
          else f"{100 * (1 - ratio):.1f} % fewer")
  print(f"{what}: MACs {c.macs:,} of {full.macs:,} (ratio {ratio:.4f}, {goal}), params {c.params:,} of "
        f"{full.params:,}, blocks {list(shape.blocks)}")
  if args.variant and not pruned:
    print("shape only: no trained network was given, so no filters were chosen and no weights written")
  print(f"shape: {args.out}" + (f"  weights: {weights}" if weights else ""))
  return 0


def _check_flags(args) -> None:
  """Each rule's flags: a MAC target, or a published variant (l1), or a channel percentage (slimming)."""
  if args.method not in baselines.METHODS:
    raise baselines.PruneError(f"unknown method {args.method!r}; use one of {', '.join(baselines.METHODS)}")
  if args.variant is not None:
    if args.method != "l1":
      raise baselines.PruneError("--variant names Li et al.'s ResNet-56/110-A/B: it goes with --method l1")
    if args.variant not in baselines.VARIANTS:
      raise baselines.PruneError(f"--variant must be one of {', '.join(baselines.VARIANTS)}, got {args.variant!r}")
    if args.scope or args.residual != "keep":
      raise baselines.PruneError("--variant fixes which convs are pruned: drop --scope and --residual")
  if args.prune_percent is not None and args.method != "slimming":
    raise baselines.PruneError("--prune_percent is Network Slimming's rule: it goes with --method slimming")
  if args.shape_only and args.variant is None:
    raise baselines.PruneError("--shape_only goes with --variant (uniform and random write a shape alone anyway; "
                               "l1 and slimming at a MAC target need a trained network)")
  fixed = args.variant is not None or args.prune_percent is not None
  if fixed and args.target_flops_ratio is not None:
    raise baselines.PruneError(f"--{'variant' if args.variant else 'prune_percent'} fixes the MACs: drop "
                               "--target_flops_ratio")
  if not fixed:
    if args.target_flops_ratio is None:
      raise baselines.PruneError("--target_flops_ratio is required (or --variant with l1, --prune_percent with "
                                 "slimming)")
    baselines.check_target(args.target_flops_ratio, args.tolerance)


def _counted(args, info: dict) -> shapes.Shape:
  """uniform and random: a shape at the MAC target, from counting alone."""
  base = _base_shape(args.base)
  if args.method == "uniform":
    blocks = _int_list(args.blocks) if args.blocks else None
    shape = baselines.uniform(base, args.target_flops_ratio, args.tolerance, depth_ratio=args.depth_ratio,
                              blocks=blocks)
    info.update(depth_ratio=args.depth_ratio, blocks=list(shape.blocks))
    return shape
  info.update(seed=args.seed, sampler=args.sampler)
  return baselines.random_shape(base, args.target_flops_ratio, args.tolerance, seed=args.seed,
                                max_tries=args.max_tries, sampler=args.sampler, search_depth=not args.no_depth)


def _trained(args, info: dict):
  """l1 and slimming on a trained network: at the MAC target, or (slimming) at --prune_percent of the channels."""
  scope = args.scope or ("layer" if args.method == "l1" else "global")
  if args.prune_percent is not None:  # refused before any training
    if not 0.0 < args.prune_percent < 1.0:
      raise baselines.PruneError(f"--prune_percent must lie in (0, 1), got {args.prune_percent}")
    if scope != "global":
      raise baselines.PruneError("--prune_percent sets one global threshold: drop --scope layer")
  run_dir = _trained_base(args)
  if args.prune_percent is not None:
    pruned = baselines.slimming_percent(run_dir, args.prune_percent, residual=args.residual)
    info.update(prune_percent=args.prune_percent)
  else:
    prune = baselines.l1_prune if args.method == "l1" else baselines.slimming_prune
    pruned = prune(run_dir, args.target_flops_ratio, args.tolerance, scope=scope, residual=args.residual)
  info.update(base=run_dir, scope=scope, residual=args.residual, level=pruned.level)
  return pruned.shape, pruned


def _li_variant(args, info: dict):
  """Li et al.'s ResNet-56/110-A/B: from a trained run (filters ranked by L1 norm), or the shape alone."""
  base = _base_shape(args.base)
  v = baselines.li_variant(base, args.variant)  # refuses another network before any training
  info.update(variant=args.variant, skip=list(v.skip), prune_prob=list(v.prune_prob), shape_only=args.shape_only)
  if args.shape_only:
    return baselines.li_variant_shape(base, args.variant), None
  if not _is_run(args.base) and not args.workdir:
    raise baselines.PruneError(f"--variant ranks filters by the L1 norms of a trained network: give --base as a "
                               f"finished run, add --workdir DIR to train {args.base} there first, or add "
                               "--shape_only to write the shape alone (no weights)")
  run_dir = _trained_base(args)
  pruned = baselines.li_variant_prune(run_dir, args.variant)
  info.update(base=run_dir)
  return pruned.shape, pruned


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise baselines.PruneError(f"--blocks must be comma-separated integers, got {text!r}") from None


if __name__ == "__main__":
  sys.exit(main())
