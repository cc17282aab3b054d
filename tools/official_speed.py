"""The official TAS code's search iteration and plain training step against this project's, in one run.

  make official-speed                       # ResNet-20 and ResNet-56, batch 64, 2 threads each
  .venv/bin/python tools/official_speed.py --depths 20 --steps 5 --json

The official side (PyPI ``xautodl`` 1.0.0 on torch, CPU) runs in the parity
environment through tools/parity/official_speed.py; this project's side is
tas_jax.cli.benchmark's search iteration and training step at the same batch
size, on the same machine, one after the other. Both report the median of
``--steps`` timed calls after warm-up. Ratios are this project's time over
the official one (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tas_jax.cli import benchmark  # noqa: E402
from tas_jax.runtime import parallel  # noqa: E402


def official(python: str, depths: str, batch_size: int, steps: int, threads: int) -> list[dict]:
  cmd = [python, os.path.join(REPO, "tools", "parity", "official_speed.py"), "--depths", depths,
         "--batch_size", str(batch_size), "--steps", str(steps), "--threads", str(threads)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"the official timing failed: {proc.stderr.strip().splitlines()[-1:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", default="20,56")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses every core it sees)")
  parser.add_argument("--torch_python", default=os.path.join(REPO, ".venv-parity", "bin", "python"),
                      help="the parity environment's python (make .venv-parity/.installed)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  if not os.path.exists(args.torch_python):
    print(f"error: no parity environment at {args.torch_python}: run 'make .venv-parity/.installed'", file=sys.stderr)
    return 2
  try:
    theirs = {r["model"]: r for r in official(args.torch_python, args.depths, args.batch_size, args.steps,
                                               args.threads)}
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  mesh = parallel.make_mesh()
  rows = []
  for model, o in theirs.items():
    s = benchmark.bench_search(model, args.batch_size, args.steps, mesh, "float32")
    t = benchmark.bench_train(model, args.batch_size, args.steps, mesh, "float32")
    rows.append({"model": model, "batch_size": args.batch_size, "torch": o["torch"], "torch_threads": o["threads"],
                 "official_search_iter_s": o["search_iter_s"], "search_iter_s": s["search_iter_s"],
                 "search_ratio": s["search_iter_s"] / o["search_iter_s"],
                 "torch_train_step_s": o["train_step_s"], "train_step_s": t["step_s"],
                 "train_ratio": t["step_s"] / o["train_step_s"]})
  if args.json:
    for r in rows:
      print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    return 0
  print(f"batch {args.batch_size}, CPU; torch {rows[0]['torch']} with {rows[0]['torch_threads']} threads; "
        f"ratio = tas_jax / official (below 1: faster)")
  print("| model | official search iteration | tas_jax | ratio | torch train step | tas_jax | ratio |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['model']} | {r['official_search_iter_s']:.3f} s | {r['search_iter_s']:.3f} s | "
          f"{r['search_ratio']:.2f} | {r['torch_train_step_s']:.3f} s | {r['train_step_s']:.3f} s | "
          f"{r['train_ratio']:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
