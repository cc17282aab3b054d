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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tas_jax.cli import benchmark  # noqa: E402
from tas_jax.configs import search as search_configs  # noqa: E402
from tas_jax.runtime import parallel  # noqa: E402
from tas_jax.steps import search as search_lib  # noqa: E402

variants = sys.argv[1].split(",")  # e.g. unrolled,scanned
models = sys.argv[2].split(",")
mesh = parallel.make_mesh()
for model in models:
  for v in variants:
    cfg = search_configs.get_config(model)
    cfg.batch_size = 64
    cfg.scan_blocks = v == "scanned"
    problem, state = search_lib.build(cfg, 10, 100)
    state = parallel.replicate(state, mesh)
    step = search_lib.compile_step(problem, mesh)
    rng = np.random.default_rng(0)
    tb, vb = benchmark._batch(mesh, rng, 64), benchmark._batch(mesh, rng, 64)  # pylint: disable=protected-access
    holder = {"s": state}

    def run():
      holder["s"], m = step(holder["s"], tb, vb, jnp.float32(5.0))
      return m

    first, med = benchmark.time_calls(run, 5)
    print(json.dumps({"model": model, "variant": v, "compile_plus_first_s": round(first, 1),
                      "step_s": round(med, 3)}), flush=True)
