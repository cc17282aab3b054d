"""Finished runs side by side: accuracy (mean ± std over seeds), MACs, params, MAC ratio; accuracy against MACs.

  python -m tas_jax.cli.compare runs/proto-r56-tas runs/proto-r56-l1 runs/r56-base [--out table.md] \\
      [--png acc-vs-macs.png] [--json rows.json]

Each DIR is a finished training run (its result.json: one row), a directory
of seed runs (``seed*/result.json``: one row, mean ± sample std), or a
protocol directory (protocol.json: one row per variant). Rows are labelled by
the method behind their shape: the ``pruning`` record that tas_jax.cli.prune
writes (uniform, random, l1, slimming), ``searched`` for TAS presets and search
runs, ``unpruned`` for base runs, else the shape file's or directory's name.
Prints the markdown table; --out also writes it, --png plots top-1 against
MACs (one colour per label, one marker per variant, error bars = std), --json
writes the rows. Bad input: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tas_jax.report import tables as protocol
from tas_jax.runtime import files

MARKERS = {"kd": "o", "scratch-e": "s", "scratch-b": "D", "finetune": "^", "base": "*", "sparsity": "v"}


def plot(rows, path: str, title: str = "") -> None:
  """Top-1 (%) against MACs (millions), one point per row with its std as an error bar."""
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  labels = list(dict.fromkeys(r.label for r in rows))
  colours = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(labels)}
  span = max(r.macs for r in rows) - min(r.macs for r in rows) or max(r.macs for r in rows)
  same = {}  # rows at equal MACs, in order
  for i, r in enumerate(rows):
    same.setdefault(r.macs, []).append(i)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  seen = set()
  for i, r in enumerate(rows):
    key = (r.label, r.variant)
    legend = r.label if r.variant == "base" else f"{r.label} / {protocol.TITLES.get(r.variant, r.variant)}"
    # The variants of one shape share its MACs: nudge them apart so that their points and bars stay visible.
    group = same[r.macs]
    x = (r.macs + 0.012 * span * (group.index(i) - (len(group) - 1) / 2)) / 1e6
    ax.errorbar(x, 100 * r.top1_mean, yerr=100 * r.top1_std if r.n > 1 else None,
                fmt=MARKERS.get(r.variant, "x"), color=colours[r.label], markersize=9 if r.variant == "base" else 7,
                capsize=3, label=legend if key not in seen else None)
    seen.add(key)
  ax.set_xlabel("MACs (millions; points of equal MACs drawn slightly apart)")
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(title or "accuracy against MACs (final epoch; bars: std over seeds)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.compare``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dirs", nargs="+", metavar="DIR")
  parser.add_argument("--out", default=None, help="write the markdown table here")
  parser.add_argument("--png", default=None, help="plot accuracy against MACs here")
  parser.add_argument("--json", default=None, help="write the rows as JSON here")
  parser.add_argument("--title", default="", help="plot title")
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  for flag in ("out", "png", "json"):
    problem = getattr(args, flag) and files.output_problem(getattr(args, flag))
    if problem:
      print(f"error: --{flag}: {problem}", file=sys.stderr)
      return 2
  missing = [d for d in args.dirs if not os.path.isdir(d)]
  if missing:
    print(f"error: no such directory: {missing[0]}", file=sys.stderr)
    return 2
  try:
    rows = protocol.collect(args.dirs)
  except protocol.ProtocolError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not rows:
    print("error: no finished runs in the given directories", file=sys.stderr)
    return 2
  table = protocol.markdown(rows)
  print(table, end="")
  if args.out:
    files.write_text(args.out, table)
  if args.json:
    files.write_text(args.json, json.dumps([r.to_dict() for r in rows], indent=1))
  if args.png:
    plot(rows, args.png, args.title)
  return 0


if __name__ == "__main__":
  sys.exit(main())
