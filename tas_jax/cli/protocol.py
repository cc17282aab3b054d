"""The Rethinking protocol for one shape: TAS-KD, Scratch-E, Scratch-B and fine-tuning, N seeds each.

  python -m tas_jax.cli.protocol --shape tas-c10-resnet56 --teacher runs/r56-base --seeds 3 \\
      --workdir runs/proto-r56-tas --recipe official
  python -m tas_jax.cli.protocol --shape runs/r56-l1.json --inherit runs/r56-l1.json --teacher runs/r56-base \\
      --seeds 5 --workdir runs/proto-r56-l1 --recipe rethinking
  # a quick check on synthetic data
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet8,smoke --config.mode=base \\
      --workdir runs/r8-base
  python -m tas_jax.cli.prune --method l1 --base runs/r8-base --target_flops_ratio 0.5 --out runs/r8-l1.json
  python -m tas_jax.cli.protocol --shape runs/r8-l1.json --inherit runs/r8-l1.json --teacher runs/r8-base \\
      --seeds 2 --workdir runs/proto-r8-l1 --recipe smoke --latency_batch_sizes 1,32

--shape: a preset, a shape JSON (e.g. from tas_jax.cli.prune or a search run)
or an official .config. --teacher: a finished base run (tas_jax.cli.train
--config.mode=base) of the same family. --inherit: a base run to slice
weights from (first filters, as TAS's weight sharing), or a shape file from
tas_jax.cli.prune --method l1|slimming whose kept weights lie beside it; the
finetune variant runs only with it. --recipe: official (TAS, 300 epochs
cosine), rethinking (160 epochs multistep, fine-tuning 40 epochs at lr 0.001;
for an ImageNet family it is rethinking-imagenet: 90 epochs, Scratch-B capped
at 2x), imagenet or smoke. --config.KEY=VALUE or --set KEY=VALUE overrides any other
training configuration key (tas_jax/configs/train.py) for every run.

Runs go to DIR/<variant>/seed<k>; rerunning the same command skips finished
runs and resumes unfinished ones. Writes DIR/protocol.json and DIR/protocol.md:
per variant the final-epoch test top-1/top-5 (mean ± sample std over seeds),
MACs, params, epochs, recipe, and the shape's measured latency. Bad input: one
line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tas_jax import baselines, data  # noqa: E402
from tas_jax.programs import protocol
from tas_jax.report import tables
from tas_jax.runtime import checkpoint, lock, runs
from tas_jax.core import shapes


def _sizes(text: str) -> list[int]:
  try:
    sizes = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if any(s < 1 for s in sizes):
    raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
  return sizes


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.protocol``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", required=True, help="preset, shape JSON or official .config")
  parser.add_argument("--teacher", required=True, help="a finished base run of the unpruned network")
  parser.add_argument("--seeds", type=int, required=True, help="seeds per variant (0 .. N-1)")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--recipe", default="official",
                      help="official, rethinking, rethinking-imagenet, imagenet or smoke")
  parser.add_argument("--inherit", default=None, help="base run or pruned shape file with weights: adds finetune")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of {','.join(tables.VARIANTS)} (default: all that apply)")
  parser.add_argument("--label", default=None, help="what produced the shape, for tables (default: derived)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a training configuration key for every run (repeatable)")
  parser.add_argument("--latency_batch_sizes", type=_sizes, default=[1, 256],
                      help="comma-separated batch sizes to time (default 1,256; empty: no latency)")
  parser.add_argument("--latency_runs", type=int, default=10, help="timed runs per batch size (median reported)")
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  try:
    args = parser.parse_args(protocol.config_flags_to_set(argv if argv is not None else sys.argv[1:]))
  except protocol.ProtocolError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("tas_jax").setLevel(logging.INFO)
  variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
  try:
    summary = protocol.run(args.shape, args.teacher, args.seeds, args.workdir, recipe=args.recipe,
                           inherit=args.inherit, overrides=args.set, variants=variants, label=args.label,
                           latency_batch_sizes=args.latency_batch_sizes, latency_runs=args.latency_runs)
  except (protocol.ProtocolError, baselines.PruneError, shapes.ShapeError, runs.RunError, lock.LockError, data.DataError,
          checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(tables.protocol_markdown(summary))
  print(f"written: {os.path.join(args.workdir, protocol.JSON_FILE)}, {os.path.join(args.workdir, protocol.MD_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
