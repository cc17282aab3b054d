"""Pruning baselines: a shape (and, for l1 and slimming, its inherited weights) at a MAC target.

  python -m experiments.prune --method uniform --base resnet56 --target_flops_ratio 0.5 --out runs/r56-uniform.json
  python -m experiments.prune --method random --base resnet56 --target_flops_ratio 0.3 --seed 1 --out r56-random.json
  python -m experiments.prune --method l1 --base runs/r56-base --target_flops_ratio 0.6 --scope layer --out r56-l1.json
  python -m experiments.prune --method slimming --base resnet56 --workdir runs/r56-sparsity --recipe rethinking \\
      --sparsity 1e-5 --target_flops_ratio 0.6 --out r56-slimming.json

--base is a shape (preset name, shape JSON, official .config) or a finished
training run directory. uniform and random only count MACs (a run stands for
its shape's family). l1 and slimming prune a trained network: a run directory,
or, with --workdir, the unpruned network of --base's family trained there
first (l1: an ordinary base run; slimming: sparsity training with an L1
penalty of --sparsity on batch-norm scales), resumably. --set KEY=VALUE overrides that training's configuration
(experiments/configs/train.py keys).

Writes the shape JSON to --out, with a "pruning" record (method, target,
achieved ratio, ...) that shape loaders ignore; l1 and slimming also write the
pruned network with the kept filters' weights to the same path with
".model" instead of its extension, a model directory that
``experiments.train --config.mode=finetune --config.init_from=DIR`` and
``experiments.protocol --inherit`` take. Bad input: one line on stderr, exit 2.
See tas_jax.baselines for the methods and the choices they make.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tas_jax import baselines, checkpoint, cost, data, engine, protocol, shapes, train  # noqa: E402


def _is_run(path: str) -> bool:
  return os.path.isdir(path)


def _base_shape(spec: str) -> shapes.Shape:
  if _is_run(spec):
    model_dir = os.path.join(spec, train.MODEL_DIR)
    for path in (os.path.join(model_dir, "shape.json"), os.path.join(spec, "shape.json")):
      if os.path.isfile(path):
        return shapes.load(path)
    raise baselines.PruneError(f"{spec} holds no trained network or shape (no model/shape.json)")
  return shapes.resolve(spec)


def _trained_base(args) -> str:
  """The run directory holding the network to prune, trained into --workdir first when --base is a shape."""
  if _is_run(args.base):
    if args.workdir:
      raise baselines.PruneError("--workdir trains a base network: give --base as a shape, not a run directory")
    return args.base
  if os.path.sep in args.base and not os.path.exists(args.base):
    raise baselines.PruneError(f"base run {args.base} does not exist")
  shape = shapes.resolve(args.base)
  if not args.workdir:
    raise baselines.PruneError(f"--method {args.method} prunes a trained network: give --base as a finished run "
                               f"directory, or add --workdir DIR to train {args.base} there first")
  config = train_config(shape, args.recipe, args.set)
  config.mode, config.model = "base", protocol.family_preset(shape)
  if os.path.isfile(os.path.join(args.workdir, "result.json")):
    return args.workdir
  if args.method == "slimming":
    config.bn_l1 = float(args.sparsity)
    result = baselines.sparsity_train(config, args.workdir)
  else:
    result = train.run(config, args.workdir)
  if not result.get("finished"):
    raise baselines.PruneError(f"training in {args.workdir} stopped early; rerun to resume it")
  return args.workdir


def train_config(shape: shapes.Shape, recipe: str, overrides):
  """The training config of --workdir: the recipe for ``shape``'s family, with ``bn_l1`` and the overrides."""
  from experiments.configs import train as train_configs
  try:
    config = train_configs.get_config(f"{protocol.family_preset(shape)},{recipe}")
  except ValueError as e:  # an unknown recipe
    raise baselines.PruneError(str(e)) from None
  config.bn_l1 = 0.0
  protocol.apply_overrides(config, overrides, protected=("mode",))
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", required=True, help=f"one of {', '.join(baselines.METHODS)}")
  parser.add_argument("--base", required=True, help="a shape (preset, JSON, .config) or a finished run directory")
  parser.add_argument("--target_flops_ratio", type=float, required=True, help="MACs over the unpruned network's")
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
                      "imagenet, smoke)")
  parser.add_argument("--sparsity", type=float, default=baselines.DEFAULT_SPARSITY,
                      help="slimming: L1 strength on batch-norm scales for --workdir training (default 1e-5)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a training configuration key for --workdir (repeatable)")
  args = parser.parse_args(protocol.config_flags_to_set(argv if argv is not None else sys.argv[1:]))
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("tas_jax").setLevel(logging.INFO)
  try:
    if args.method not in baselines.METHODS:
      raise baselines.PruneError(f"unknown method {args.method!r}; use one of {', '.join(baselines.METHODS)}")
    baselines.check_target(args.target_flops_ratio, args.tolerance)
    info = {"method": args.method, "target_flops_ratio": args.target_flops_ratio, "tolerance": args.tolerance,
            "base": args.base}
    pruned = None
    if args.method in ("uniform", "random"):
      base = _base_shape(args.base)
      if args.method == "uniform":
        blocks = _int_list(args.blocks) if args.blocks else None
        shape = baselines.uniform(base, args.target_flops_ratio, args.tolerance, depth_ratio=args.depth_ratio,
                                  blocks=blocks)
        info.update(depth_ratio=args.depth_ratio, blocks=list(shape.blocks))
      else:
        shape = baselines.random_shape(base, args.target_flops_ratio, args.tolerance, seed=args.seed,
                                       max_tries=args.max_tries, sampler=args.sampler, search_depth=not args.no_depth)
        info.update(seed=args.seed, sampler=args.sampler)
    else:
      run_dir = _trained_base(args)
      scope = args.scope or ("layer" if args.method == "l1" else "global")
      prune = baselines.l1_prune if args.method == "l1" else baselines.slimming_prune
      pruned = prune(run_dir, args.target_flops_ratio, args.tolerance, scope=scope, residual=args.residual)
      shape = pruned.shape
      info.update(base=run_dir, scope=scope, residual=args.residual, level=pruned.level)
    c = cost.count(shape)
    ratio = baselines.macs_ratio(shape)
    info.update(macs=c.macs, params=c.params, ratio=ratio)
    weights = baselines.save(shape, args.out, info, pruned)
  except (baselines.PruneError, shapes.ShapeError, engine.RunError, data.DataError, checkpoint.CheckpointError,
          protocol.ProtocolError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  full = cost.count(shapes.full_shape(shape))
  print(f"{args.method}: MACs {c.macs:,} of {full.macs:,} (ratio {ratio:.4f}, target {args.target_flops_ratio} "
        f"+- {args.tolerance}), params {c.params:,} of {full.params:,}, blocks {list(shape.blocks)}")
  print(f"shape: {args.out}" + (f"  weights: {weights}" if weights else ""))
  return 0


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise baselines.PruneError(f"--blocks must be comma-separated integers, got {text!r}") from None


if __name__ == "__main__":
  sys.exit(main())
