"""Time a TAS search iteration against plain and distillation training steps.

  python -m tas_jax.cli.benchmark [--model resnet20] [--batch_size 64] [--steps 10] [--json]
  python -m tas_jax.cli.benchmark --model vgg16      # a searchable family: vgg16, vgg19, mobilenetv2, vit

Reports compile time and steady-state time (median of --steps runs after
warm-up, each waited for with block_until_ready) of
  (a) one search iteration (weight step + architecture step) of the supernet in shape mode,
  (b) one plain training step of the unpruned network,
  (c) one distillation step of a half-MACs (uniform) shape with the unpruned network as teacher,
plus images per second, overhead = (a) / (2 x (b)) (TAS needs two passes per
iteration, so 1.0 is the physical minimum), the time the input pipeline makes
the search loop wait per step (data_wait_s), and peak device memory where the
backend reports it. With --json, one JSON object per line.

For a searchable family (:mod:`tas_jax.nets.families`) it times (a) the
iteration of :mod:`tas_jax.steps.searchable` and, for (b), a forward and
backward pass of the unpruned network (its export at full widths), without
an optimiser; the data wait and the distillation step are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tas_jax.configs import search as search_configs  # noqa: E402
from tas_jax.configs import train as train_configs  # noqa: E402
from tas_jax import baselines, data  # noqa: E402
from tas_jax.core import cost as cost_lib
from tas_jax.steps import search as search_lib
from tas_jax.steps import train as train_lib
from tas_jax.runtime import parallel
from tas_jax.nets import resnet
from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.core import distill
from tas_jax.nets import cost_graph, families, searchable, surgery
from tas_jax.steps.searchable import Search


def time_calls(fn, steps: int, warmup: int = 2) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of ``steps`` calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def _batch(mesh, rng, batch_size, image_size=32):
  return parallel.global_batch(mesh, {"images": rng.integers(0, 256, (batch_size, image_size, image_size, 3),
                                                             dtype=np.uint8),
                                      "labels": rng.integers(0, 10, batch_size).astype(np.int32)})


def _peak_memory() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**20


def bench_search(model: str, batch_size: int, steps: int, mesh, dtype: str, **overrides) -> dict:
  """One search iteration of ``model``'s supernet; ``overrides``: search config keys (e.g. scan_blocks=False)."""
  cfg = search_configs.get_config(model)
  cfg.batch_size, cfg.dtype = batch_size, dtype
  cfg.update(overrides)
  problem, state = search_lib.build(cfg, 10, 100)
  state = parallel.replicate(state, mesh)
  step = search_lib.compile_step(problem, mesh)
  rng = np.random.default_rng(0)
  tb, vb = _batch(mesh, rng, batch_size), _batch(mesh, rng, batch_size)
  tau = jnp.float32(5.0)
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], tb, vb, tau)
    return m

  compile_s, step_s = time_calls(run, steps)
  return {"search_iter_s": step_s, "search_compile_s": compile_s, "cache_size": step._cache_size(),
          "state": holder["state"], "step": step, "problem": problem}


def bench_train(model: str, batch_size: int, steps: int, mesh, dtype: str, shape=None, teacher_shape=None) -> dict:
  cfg = train_configs.get_config(f"{model},official")
  cfg.batch_size, cfg.dtype = batch_size, dtype
  cfg.mode = "base"  # the teacher is passed in; no run directory is read
  shape = shape or shape_files.preset(model)
  plan = train_lib.make_plan(cfg, shape)
  cdt = train_lib.compute_dtype(cfg)
  net = resnet.build(shape, 0, cdt)
  teacher = resnet.build(teacher_shape, 1, cdt) if teacher_shape is not None else None
  problem, state, teacher_vars = train_lib.build(cfg, net, plan, 100, teacher=teacher)
  state = parallel.replicate(state, mesh)
  teacher_vars = parallel.replicate(teacher_vars, mesh) if teacher_vars is not None else None
  step, compile_s = train_lib.compile_step(problem, mesh, state, batch_size, 32, teacher_vars)
  batch = _batch(mesh, np.random.default_rng(1), batch_size)
  holder = {"state": state}

  def run():
    holder["state"], m = step(holder["state"], batch, teacher_vars)
    return m

  first_s, step_s = time_calls(run, steps)
  return {"step_s": step_s, "compile_s": compile_s + first_s}


def data_wait(bench: dict, batch_size: int, steps: int, mesh) -> float:
  """Median seconds per step the search loop waits for its prefetched input batches (synthetic images)."""
  dataset = data.load("synthetic", synthetic_train=max(4 * batch_size, 1024), synthetic_test=16)
  half_a, half_b = data.search_split(dataset.labels("train"), 0)
  ta, tb_ = data.Batches(len(half_a), batch_size, 0), data.Batches(len(half_b), batch_size, 1)

  def host(step):
    batches = []
    for half, b in ((half_a, ta), (half_b, tb_)):
      images, labels = data.get_batch(dataset, "train", half[b.indices(step)])
      batches.append(parallel.global_batch(mesh, {"images": images, "labels": labels}))
    return batches

  prefetch = data.Prefetcher(host, 0)
  step, state, tau = bench["step"], bench["state"], jnp.float32(5.0)
  waits = []
  try:
    for i in range(steps + 1):
      t = time.perf_counter()
      tbatch, vbatch = next(prefetch)
      if i:  # the first batch has nothing to overlap with
        waits.append(time.perf_counter() - t)
      state, m = step(state, tbatch, vbatch, tau)
    jax.block_until_ready(m)
  finally:
    prefetch.close()
  bench["state"] = state
  return statistics.median(waits)


def bench_family(name: str, batch_size: int, steps: int) -> dict:
  """The search iteration of a searchable family and a forward + backward pass of its unpruned network."""
  from flax import nnx
  fam = families.FAMILIES[name]
  net = families.build(name)
  size = fam.image_size
  search = Search.create(net, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), target_ratio=0.5)
  rng = np.random.default_rng(0)
  batch = lambda: (jnp.asarray(rng.normal(size=(batch_size, size, size, 3)), jnp.float32),
                   jnp.asarray(rng.integers(0, fam.num_classes, batch_size), jnp.int32))
  tb, vb, key = batch(), batch(), jax.random.key(0)
  step = jax.jit(search.step)
  holder = {"state": search.init(net)}

  def run():
    holder["state"], m = step(holder["state"], tb, vb, key, jnp.float32(5.0))
    return m

  compile_s, step_s = time_calls(run, steps)
  full = surgery.export_searchable(net, searchable.full_choice(net))
  full.train()
  graphdef, params, rest = nnx.split(full, nnx.Param, ...)

  @jax.jit
  def grad_step(params, x, y):
    return jax.grad(lambda p: distill.cross_entropy(nnx.merge(graphdef, p, rest, copy=True)(x), y))(params)

  train_compile_s, train_step_s = time_calls(lambda: grad_step(params, *tb), steps)
  return {"search_iter_s": step_s, "compile_s": compile_s, "train_step_s": train_step_s,
          "train_compile_s": train_compile_s, "macs": cost_graph.trace(net, tb[0][:1]).full(net)}


def make_parser() -> argparse.ArgumentParser:
  """The command line of ``python -m tas_jax.cli.benchmark``."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--skip_kd", action="store_true", help="leave out the distillation step")
  return parser


def main(argv=None) -> int:
  parser = make_parser()
  args = parser.parse_args(argv)
  if args.model in families.FAMILIES:
    return _family_main(args)
  try:
    base = shape_files.preset(args.model)
    if base.arch != "cifar":
      raise shapes.ShapeError("the benchmark times CIFAR networks (32x32 inputs)")
    mesh = parallel.make_mesh()
    parallel.local_batch_size(args.batch_size)
  except (shapes.ShapeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  s = bench_search(args.model, args.batch_size, args.steps, mesh, args.dtype)
  wait = data_wait(s, args.batch_size, args.steps, mesh)
  t = bench_train(args.model, args.batch_size, args.steps, mesh, args.dtype)
  row = {"model": args.model, "batch_size": args.batch_size, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
         "devices": jax.device_count(), "search_iter_s": s["search_iter_s"], "train_step_s": t["step_s"],
         "overhead": s["search_iter_s"] / (2 * t["step_s"]), "compile_s": s["search_compile_s"],
         "train_compile_s": t["compile_s"], "images_per_s": args.batch_size / s["search_iter_s"],
         "train_images_per_s": args.batch_size / t["step_s"], "data_wait_s": wait,
         "data_wait_fraction": wait / s["search_iter_s"], "search_compiles": s["cache_size"]}
  if not args.skip_kd:
    half = baselines.uniform(base, 0.5)
    k = bench_train(args.model, args.batch_size, args.steps, mesh, args.dtype, shape=half, teacher_shape=base)
    row.update({"kd_step_s": k["step_s"], "kd_compile_s": k["compile_s"], "kd_images_per_s": args.batch_size / k["step_s"],
                "kd_shape_macs_ratio": cost_lib.count(half).macs / cost_lib.count(base).macs})
  row["peak_memory_mib"] = _peak_memory()
  if args.json:
    _print_json(row)
  else:
    print(f"{args.model} batch {args.batch_size} {args.dtype} on {row['devices']} x {row['device']}")
    _print_search(row)
    print(f"  train step         {1e3 * row['train_step_s']:9.1f} ms   {row['train_images_per_s']:8.1f} img/s   "
          f"compile {row['train_compile_s']:.1f} s")
    if "kd_step_s" in row:
      print(f"  kd step (0.5 MACs) {1e3 * row['kd_step_s']:9.1f} ms   {row['kd_images_per_s']:8.1f} img/s")
    print(f"  overhead (a)/(2b)  {row['overhead']:9.3f}")
    print(f"  data wait          {1e3 * wait:9.2f} ms/step ({100 * row['data_wait_fraction']:.2f}% of the iteration)")
    if row["peak_memory_mib"] is not None:
      print(f"  peak memory        {row['peak_memory_mib']:9.1f} MiB")
  return 0


def _print_json(row: dict) -> None:
  print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}))


def _print_search(row: dict) -> None:
  print(f"  search iteration   {1e3 * row['search_iter_s']:9.1f} ms   {row['images_per_s']:8.1f} img/s   "
        f"compile {row['compile_s']:.1f} s")


def _family_main(args) -> int:
  f = bench_family(args.model, args.batch_size, args.steps)
  row = {"model": args.model, "batch_size": args.batch_size, "device": jax.devices()[0].device_kind,
         "search_iter_s": f["search_iter_s"], "compile_s": f["compile_s"], "grad_step_s": f["train_step_s"],
         "grad_compile_s": f["train_compile_s"], "overhead": f["search_iter_s"] / (2 * f["train_step_s"]),
         "images_per_s": args.batch_size / f["search_iter_s"], "macs": f["macs"]}
  if args.json:
    _print_json(row)
  else:
    print(f"{args.model} batch {args.batch_size} on {row['device']} ({row['macs']:,} MACs unpruned)")
    _print_search(row)
    print(f"  forward + backward {1e3 * row['grad_step_s']:9.1f} ms   compile {row['grad_compile_s']:.1f} s")
    print(f"  overhead (a)/(2b)  {row['overhead']:9.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
