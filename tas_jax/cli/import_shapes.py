"""Convert the official TAS ``.config`` shapes into the project's shape presets.

  python -m tas_jax.cli.import_shapes ../shared/reference/tas-neurips2019-shapes --out tas_jax/presets

File names map as C010-ResNet56.config -> tas-c10-resnet56.json,
C100-ResNet56.config -> tas-c100-resnet56.json, ImageNet-ResNet50V1.config ->
tas-imagenet-resnet50.json.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.runtime import files


def preset_name(filename: str) -> str:
  stem = os.path.basename(filename)[: -len(".config")]
  m = re.fullmatch(r"C(\d+)-ResNet(\d+)", stem)
  if m:
    return f"tas-c{int(m.group(1))}-resnet{m.group(2)}"
  m = re.fullmatch(r"ImageNet-ResNet(\d+)(V\d+)?", stem)
  if m:
    return f"tas-imagenet-resnet{m.group(1)}"
  raise shapes.ShapeError(f"cannot name a preset for {filename}")


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.import_shapes``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", help="a folder of official .config files")
  parser.add_argument("--out", required=True, help="folder to write <preset>.json into")
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  try:
    if not os.path.isdir(args.source):
      raise shapes.ShapeError(f"not a folder: {args.source}")
    problem = files.output_problem(os.path.join(args.out, "preset.json"))
    if problem:
      raise shapes.ShapeError(f"--out: {problem}")
    os.makedirs(args.out, exist_ok=True)
    configs = sorted(f for f in os.listdir(args.source) if f.endswith(".config"))
    if not configs:
      raise shapes.ShapeError(f"no .config files in {args.source}")
    for f in configs:
      shape = shape_files.load_official(os.path.join(args.source, f))
      path = os.path.join(args.out, preset_name(f) + ".json")
      shape_files.save(shape, path)
      print(f"{f} -> {path}")
  except shapes.ShapeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
