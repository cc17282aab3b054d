"""Search-step compile and step times with the identical blocks of a stage scanned and unrolled, in one run.

  .venv/bin/python tools/compile_times.py unrolled,scanned resnet20,resnet56,resnet110

One JSON line per model and variant: compile time plus the first call
(``compile_plus_first_s``) and the median of 5 steps after warm-up
(``step_s``), batch 64, one device.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tas_jax.cli import benchmark  # noqa: E402
from tas_jax.runtime import parallel  # noqa: E402

variants = sys.argv[1].split(",")  # e.g. unrolled,scanned
models = sys.argv[2].split(",")
mesh = parallel.make_mesh()
for model in models:
  for v in variants:
    r = benchmark.bench_search(model, 64, 5, mesh, "float32", scan_blocks=v == "scanned")
    print(json.dumps({"model": model, "variant": v, "compile_plus_first_s": round(r["search_compile_s"], 1),
                      "step_s": round(r["search_iter_s"], 3)}), flush=True)
