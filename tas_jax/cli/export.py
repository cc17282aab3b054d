"""Export a trained network for deployment: serialised StableHLO (or ONNX) taking raw uint8 images, and a model card.

  python -m tas_jax.cli.export runs/r20-kd --out exported/r20-kd

RUN is a run directory that saved a network (training, or a search's
exported network in RUN/model) or a model directory itself. Writes
OUT/model.jax_export (load it with ``jax.export.deserialize``: no tas_jax
needed), or with ``--format onnx`` OUT/model.onnx (both with
``--format stablehlo,onnx``), and OUT/model_card.json. See tas_jax.programs.export.
"""

from __future__ import annotations

import argparse
import os
import sys

from tas_jax.programs import export
from tas_jax.runtime.runs import RunError


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.export``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run", metavar="RUN")
  parser.add_argument("--out", required=True, help="directory to write the artefact and its card into")
  parser.add_argument("--format", default="stablehlo",
                      help=f"{' or '.join(export.FORMATS)}, or both separated by a comma (default: stablehlo)")
  return parser


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  try:
    card = export.export_run(args.run, args.out, args.format)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  top1 = card["accuracy"].get("test_top1")
  written = ", ".join(os.path.join(args.out, name) for name in card["artefacts"].values())
  print(f"{written}: input uint8 {card['input']['shape']}, "
        f"{card['macs']:,} MACs, {card['params']:,} params"
        + (f", test top-1 {top1:.4f}" if top1 is not None else "")
        + f"; card: {os.path.join(args.out, export.CARD)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
