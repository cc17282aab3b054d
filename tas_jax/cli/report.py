"""Write a pipeline directory's report again (report.md and figures), from what its stages left.

  python -m tas_jax.cli.report PIPELINE_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from tas_jax import report


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.report``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdir", metavar="PIPELINE_DIR", help="a pipeline's work directory")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = make_parser().parse_args(argv)
  if not os.path.isdir(args.workdir):
    print(f"error: {args.workdir} is not a directory", file=sys.stderr)
    return 2
  print(report.write_report(args.workdir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
