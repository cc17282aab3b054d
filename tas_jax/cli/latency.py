"""Measured inference time of network shapes on this machine's default device, beside MACs and params.

  python -m tas_jax.cli.latency resnet56 tas-c10-resnet56 runs/search/shape.json [--batch_sizes 1,256]
      [--runs 20] [--dtype bfloat16] [--json]

SHAPE is a preset name, a project shape JSON file or an official TAS ``.config``
file. Each shape's pruned network runs in eval mode, jitted per batch size:
one compiling call, a few warm-up calls, then the median of ``--runs`` timed
calls, the networks of a batch size timed in turn, round after round, so that
they share the machine's state (tas_jax.latency.measure.compare_latency).
``speedup`` is the unpruned network's median over this one's, from the same
rounds: an unpruned network against itself is exactly 1.00.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from tas_jax.core import cost, shapes
from tas_jax.core import shape_files
from tas_jax.latency import measure as latency


def _batch_sizes(text: str) -> list[int]:
  try:
    sizes = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
  if not sizes or min(sizes) < 1:
    raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
  return sizes


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.latency``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("shapes", nargs="+", metavar="SHAPE")
  parser.add_argument("--batch_sizes", type=_batch_sizes, default=[1, 256], help="comma-separated, default 1,256")
  parser.add_argument("--runs", type=int, default=20, help="timed runs per shape and batch size (median reported)")
  parser.add_argument("--warmup", type=int, default=3, help="untimed runs after compiling")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--no_speedup", action="store_true", help="do not time the unpruned networks")
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.runs < 1 or args.warmup < 0:
    parser.error("--runs must be at least 1 and --warmup at least 0")
  try:  # every shape is checked before any time is spent measuring
    resolved = [(spec, shape_files.resolve(spec, args.num_classes)) for spec in args.shapes]
  except shapes.ShapeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
  records = []
  for bs in args.batch_sizes:
    # The unpruned networks are measured in the same interleaved rounds as the shapes they are compared with.
    fulls = [] if args.no_speedup else [shapes.full_shape(shape) for _, shape in resolved]
    timed = latency.compare_latency([shape for _, shape in resolved] + fulls, bs, args.runs, warmup=args.warmup,
                                    dtype=dtype)
    for i, (spec, shape) in enumerate(resolved):
      c = cost.count(shape)
      full_macs = cost.count(shapes.full_shape(shape)).macs
      r = {"shape": spec, "macs": c.macs, "params": c.params, "ratio": c.macs / full_macs, "dtype": args.dtype,
           **timed[i]}
      if fulls:
        r["speedup"] = timed[len(resolved) + i]["median_ms"] / timed[i]["median_ms"]
      records.append(r)
      if args.json:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
  if not args.json:
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), {args.dtype}; median, min and "
          f"max of {args.runs} runs, the networks timed in turn; speedup: the unpruned network's median over this "
          f"one's, from the same rounds")
    head = f"{'shape':<28} {'MACs':>14} {'params':>10} {'ratio':>6} {'batch':>6} {'median ms':>10} " \
           f"{'min ms':>9} {'max ms':>9} {'images/s':>11} {'speedup':>8}"
    print(head)
    print("-" * len(head))
    for r in records:
      speed = f"{r['speedup']:>8.2f}" if "speedup" in r else f"{'-':>8}"
      print(f"{r['shape']:<28} {r['macs']:>14,} {r['params']:>10,} {r['ratio']:>6.3f} {r['batch_size']:>6} "
            f"{r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['max_ms']:>9.3f} {r['images_per_s']:>11.1f} {speed}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
