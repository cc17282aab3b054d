"""Write a pipeline directory's report again (report.md and figures), from what its stages left.

  python -m tas_jax.cli.report PIPELINE_DIR
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from tas_jax import report


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("-h", "--help"):
    print(__doc__)
    return 0
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m tas_jax.cli.report PIPELINE_DIR", file=sys.stderr)
    return 2
  if not os.path.isdir(argv[0]):
    print(f"error: {argv[0]} is not a directory", file=sys.stderr)
    return 2
  print(report.write_report(argv[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
