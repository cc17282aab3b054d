"""Exact MACs and parameters of network shapes.

  python -m tas_jax.cli.flops resnet56 tas-c10-resnet56 runs/search/shape.json [--json]
  python -m tas_jax.cli.flops vgg16 vgg19 mobilenetv2 imagenet-mobilenetv2 vit
  python -m tas_jax.cli.flops --presets

SHAPE is a preset name, a project shape JSON file or an official TAS ``.config``
file, or the name of a searchable family (the unpruned network). MACs count
conv and linear multiply-accumulates (a ResNet's classifier bias included, as
the official code counts; the families count matrix products and
convolutions only, attention's token products included); FLOPs = 2 x MACs.
``ratio`` is MACs over the unpruned network of the same family.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

from tas_jax.core import cost, shapes
from tas_jax.core import shape_files
from tas_jax.nets import cost_graph, families, searchable


def _family_row(name, num_classes):
  net = families.build(name, num_classes, abstract=True)
  size = families.FAMILIES[name].image_size
  m = cost_graph.trace(net, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).full(net)
  return {"shape": name, "macs": m, "params": searchable.num_params(net), "flops": 2 * m, "ratio": 1.0,
          "blocks": "-", "depth": None}


def rows(specs, num_classes=None):
  for spec in specs:
    if spec in families.FAMILIES:
      yield _family_row(spec, num_classes)
      continue
    shape = shape_files.resolve(spec, num_classes)
    c = cost.count(shape)
    full = cost.count(shapes.full_shape(shape))
    yield {"shape": spec, "macs": c.macs, "params": c.params, "flops": c.flops,
           "ratio": c.macs / full.macs, "blocks": list(shape.blocks), "depth": shape.depth}


def table(records) -> str:
  head = f"{'shape':<28} {'MACs':>15} {'MFLOPs':>10} {'params':>12} {'ratio':>7}  blocks"
  lines = [head, "-" * len(head)]
  for r in records:
    lines.append(f"{r['shape']:<28} {r['macs']:>15,} {r['flops'] / 1e6:>10.2f} {r['params']:>12,} "
                 f"{r['ratio']:>7.3f}  {r['blocks']}")
  return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.flops``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("shapes", nargs="*", metavar="SHAPE")
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument("--presets", action="store_true", help="every named preset")
  parser.add_argument("--num_classes", type=int, default=None)
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  specs = list(args.shapes) + (shape_files.preset_names() if args.presets else [])
  if not specs:
    parser.error("name at least one SHAPE, or --presets")
  try:
    records = list(rows(specs, args.num_classes))
  except shapes.ShapeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    for r in records:
      print(json.dumps({"shape": r["shape"], "macs": r["macs"], "params": r["params"], "flops": r["flops"],
                        "ratio": round(r["ratio"], 6)}))
  else:
    print(table(records))
  return 0


if __name__ == "__main__":
  sys.exit(main())
