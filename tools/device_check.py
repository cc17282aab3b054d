"""The prepared accelerator check: step throughput, the input pipeline and a study sized to the time left.

  make gpu-check-prepare               # here: wheels and the CIFAR-10 archive into .device/ (ignored)
  make gpu-check OUT=DIR               # on the GPU machine, from the repository root (about 8 minutes)
  make gpu-check-small OUT=DIR         # here, on the CPU: the same script at toy size (under 5 minutes)

Phases, each written to OUT/device_check.json (and OUT/device_check.md) as
soon as it ends, so a run cut short keeps what it measured:

1. ``peak``: the device's bf16 matrix rate, from a large matmul (the ceiling
   the steps are compared with).
2. ``steps``: for each model and dtype, one TAS search iteration and one
   plain training step at the check's batch size (tas_jax.cli.benchmark):
   images per second, overhead (search iteration over two training steps),
   compile times, and the training step's model FLOPs (6 x MACs per image)
   as a fraction of the measured peak.
3. ``pipeline``: what feeds those steps: decoding the dataset (once, cached),
   assembling a batch on the host, moving it to the device, augmenting it on
   the device; each as images per second against the fastest training step.
4. ``study``: the searched shape against uniform and random shapes at half
   the MACs (teacher, one search, TAS-KD, uniform-KD, random-KD, two seeds),
   with epochs scaled from the gpu study preset (teacher 30, search 60,
   shapes 30) so that the whole fits in the time left, using the rates
   measured in phase 2.

Runs on the JAX of the machine it is on (0.10.2 as pinned here, 0.11.x on the
device image); everything else it needs is this repository and the wheels
``make gpu-check-prepare`` puts in ``.device/wheels``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tas_jax import data  # noqa: E402
from tas_jax.cli import benchmark  # noqa: E402
from tas_jax.configs import study as study_configs  # noqa: E402
from tas_jax.core import cost, shape_files  # noqa: E402
from tas_jax.programs import study  # noqa: E402
from tas_jax.report import study as study_report  # noqa: E402
from tas_jax.runtime import files, parallel  # noqa: E402

JSON_FILE, MD_FILE = "device_check.json", "device_check.md"
# The gpu study preset's epochs, which the check scales down to fit.
FULL_EPOCHS = {"teacher": 30, "search": 60, "shapes": 30}
STEPS_SHARE = 0.5  # of the budget, at most, for the step timings
STUDY_SHARE = 0.6  # of the time left, for the study's estimated time


@dataclasses.dataclass(frozen=True)
class Mode:
  """What one size of the check runs."""
  models: tuple[str, ...]
  dtypes: tuple[str, ...]
  batch_size: int
  steps: int
  matmul: int
  budget_s: float
  study_model: str
  study_examples: int  # training examples of the study (0 = the whole set)
  study_batch: int
  min_study_s: float  # below this the study is skipped


MODES = {
    "full": Mode(models=("resnet20", "resnet56"), dtypes=("float32", "bfloat16"), batch_size=256, steps=20,
                 matmul=8192, budget_s=480.0, study_model="resnet20", study_examples=0, study_batch=256,
                 min_study_s=90.0),
    "small": Mode(models=("resnet8",), dtypes=("float32", "bfloat16"), batch_size=32, steps=3, matmul=512,
                  budget_s=270.0, study_model="resnet8", study_examples=256, study_batch=32, min_study_s=30.0),
}


class Report:
  """The check's record: a JSON object and its markdown, rewritten after every phase."""

  def __init__(self, out: str, mode: str):
    self.out = out
    self.start = time.monotonic()
    self.record = {"mode": mode, "jax": jax.__version__, "backend": jax.default_backend(),
                   "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "phases": {}}

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def phase(self, name: str, value) -> None:
    self.record["phases"][name] = value
    self.record["elapsed_s"] = round(self.elapsed(), 1)
    files.write_json(os.path.join(self.out, JSON_FILE), self.record)
    files.write_text(os.path.join(self.out, MD_FILE), markdown(self.record))


def peak_tflops(n: int) -> dict:
  """bf16 ``n x n x n`` matmuls per second, as TFLOP/s (median of 10 after warm-up)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  _, seconds = benchmark.time_calls(lambda: f(a, b), 10, warmup=3)
  return {"n": n, "matmul_s": seconds, "bf16_tflops": 2 * n ** 3 / seconds / 1e12}


def step_rates(model: str, dtype: str, m: Mode, mesh, peak: float | None) -> dict:
  """One search iteration and one training step of ``model`` at the check's batch size."""
  s = benchmark.bench_search(model, m.batch_size, m.steps, mesh, dtype)
  t = benchmark.bench_train(model, m.batch_size, m.steps, mesh, dtype)
  macs = cost.count(shape_files.preset(model)).macs
  train_ips = m.batch_size / t["step_s"]
  row = {"model": model, "dtype": dtype, "batch_size": m.batch_size,
         "search_iter_s": s["search_iter_s"], "search_images_per_s": m.batch_size / s["search_iter_s"],
         "train_step_s": t["step_s"], "train_images_per_s": train_ips,
         "overhead": s["search_iter_s"] / (2 * t["step_s"]),
         "search_compile_s": s["search_compile_s"], "train_compile_s": t["compile_s"],
         "train_tflops": 6 * macs * train_ips / 1e12}
  if peak:
    row["fraction_of_bf16_peak"] = row["train_tflops"] / peak
  return row


def pipeline_rates(dataset, batch_size: int, mesh, repeats: int = 20) -> dict:
  """Host batch assembly, transfer and on-device augmentation, in images per second."""
  rng = np.random.default_rng(0)
  n = dataset.num_examples("train")
  idx = [rng.integers(0, n, batch_size) for _ in range(repeats)]
  t = time.perf_counter()
  batches = [data.get_batch(dataset, "train", i) for i in idx]
  host = repeats * batch_size / (time.perf_counter() - t)
  t = time.perf_counter()
  on_device = [parallel.global_batch(mesh, {"images": im, "labels": lb}) for im, lb in batches]
  jax.block_until_ready(on_device)
  transfer = repeats * batch_size / (time.perf_counter() - t)
  augment = jax.jit(lambda key, images: data.augment_cifar(key, images, dataset.mean, dataset.std))
  images = on_device[0]["images"]
  _, seconds = benchmark.time_calls(lambda: augment(jax.random.key(0), images), repeats)
  return {"host_images_per_s": host, "transfer_images_per_s": transfer, "augment_images_per_s": batch_size / seconds}


def study_epochs(budget_s: float, rates: dict, runs: int, overhead_s: float, examples: int) -> dict:
  """Epochs of the gpu study preset scaled by one factor so that teacher, search and ``runs`` shape runs fit.

  ``rates``: training and search images per second; ``overhead_s``: fixed
  seconds per run (compilation, evaluation, files). A search epoch passes the
  training half through the search iteration. Each count is at least 1.
  """
  per_epoch_train = examples / rates["train"]
  per_epoch_search = (examples / 2) / rates["search"]
  full = (FULL_EPOCHS["teacher"] * per_epoch_train + FULL_EPOCHS["search"] * per_epoch_search
          + runs * FULL_EPOCHS["shapes"] * per_epoch_train)
  usable = budget_s - (runs + 2) * overhead_s
  scale = max(0.0, min(1.0, usable / full)) if full > 0 else 1.0
  epochs = {k: max(1, int(math.floor(v * scale))) for k, v in FULL_EPOCHS.items()}
  return {**epochs, "scale": scale, "estimated_s": (runs + 2) * overhead_s + (
      epochs["teacher"] * per_epoch_train + epochs["search"] * per_epoch_search
      + runs * epochs["shapes"] * per_epoch_train)}


def run_study(m: Mode, dataset_spec: str, workdir: str, epochs: dict, seeds: int, on_round=None) -> dict:
  cfg = study_configs.get_config("gpu")
  cfg.model, cfg.dataset, cfg.num_train_examples = m.study_model, dataset_spec, m.study_examples
  cfg.batch_size = cfg.search_batch_size = m.study_batch
  cfg.teacher_epochs, cfg.search_epochs, cfg.epochs = epochs["teacher"], epochs["search"], epochs["shapes"]
  cfg.search_seeds, cfg.random_draws, cfg.seeds, cfg.variants = 1, 1, seeds, "kd"
  cfg.paper_shape, cfg.l1, cfg.latency_batch_sizes = "", False, ""
  # Few search iterations: the exact preset with a larger architecture step, as the CPU study (see its preset).
  cfg.search_preset = "exact"
  cfg.search_overrides = "arch_lr=0.05;log_every_steps=50"
  cfg.train_overrides = "eval_every_epochs=0;log_every_steps=50"
  summary = study.run(study.StudyConfig.from_mapping(cfg.to_dict()), workdir, on_round=on_round)
  return {"config": {k: v for k, v in cfg.to_dict().items()}, "summary": summary,
          "markdown": study_report.markdown(summary)}


def markdown(record: dict) -> str:
  p = record["phases"]
  lines = [f"# Device check ({record['mode']})", "",
           f"{record['devices']} x {record['device']} ({record['backend']}), jax {record['jax']}; "
           f"{record.get('elapsed_s', 0):.0f} s", ""]
  if "peak" in p and "bf16_tflops" in p["peak"]:
    lines += [f"Measured bf16 matmul peak: {p['peak']['bf16_tflops']:.1f} TFLOP/s "
              f"({p['peak']['n']}^3 in {1e3 * p['peak']['matmul_s']:.2f} ms).", ""]
  rows = p.get("steps", {}).get("rows", [])
  if rows:
    lines += ["| model | dtype | batch | search iter | search img/s | train step | train img/s | overhead | "
              "train TFLOP/s | of bf16 peak | compile (search, train) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
      frac = f"{100 * r['fraction_of_bf16_peak']:.1f} %" if "fraction_of_bf16_peak" in r else "-"
      lines.append(f"| {r['model']} | {r['dtype']} | {r['batch_size']} | {1e3 * r['search_iter_s']:.1f} ms | "
                   f"{r['search_images_per_s']:,.0f} | {1e3 * r['train_step_s']:.1f} ms | "
                   f"{r['train_images_per_s']:,.0f} | {r['overhead']:.2f} | {r['train_tflops']:.2f} | {frac} | "
                   f"{r['search_compile_s']:.0f} s, {r['train_compile_s']:.0f} s |")
    lines.append("")
  pipe = p.get("pipeline", {})
  if "host_images_per_s" in pipe:
    lines += [f"Input pipeline ({pipe['dataset']}): decode {pipe['load_s']:.1f} s once; host batches "
              f"{pipe['host_images_per_s']:,.0f} img/s, transfer {pipe['transfer_images_per_s']:,.0f} img/s, "
              f"augmentation on the device {pipe['augment_images_per_s']:,.0f} img/s, against the fastest "
              f"training step's {pipe['fastest_step_images_per_s']:,.0f} img/s: "
              f"{'the pipeline keeps up' if pipe['keeps_up'] else 'THE PIPELINE IS THE BOTTLENECK'}.", ""]
  st = p.get("study", {})
  if "epochs" in st:
    e = st["epochs"]
    lines += [f"Study: teacher {e['teacher']} epochs, search {e['search']}, shapes {e['shapes']} "
              f"(scale {e['scale']:.2f} of the gpu preset), {st.get('seeds', '?')} seeds; estimated "
              f"{e['estimated_s']:.0f} s, " + (f"took {st['wall_s']:.0f} s." if "wall_s" in st else
                                                f"{st.get('rounds_done', 0)} round(s) of seeds done so far."), ""]
    if "markdown" in st:
      lines += [st["markdown"], ""]
  for name, value in p.items():
    if isinstance(value, dict) and "error" in value:
      lines += [f"Phase {name} failed: {value['error']}", ""]
    if isinstance(value, dict) and "skipped" in value:
      lines += [f"Phase {name} skipped: {value['skipped']}", ""]
  return "\n".join(lines) + "\n"


def _guarded(report: Report, name: str, fn):
  """Runs one phase; a failure is recorded and the check goes on with the next."""
  t = time.monotonic()
  try:
    value = fn()
  except Exception as e:  # pylint: disable=broad-except  (one phase must not cost the others)
    traceback.print_exc()
    value = {"error": f"{type(e).__name__}: {e}"}
  value["wall_s"] = time.monotonic() - t
  report.phase(name, value)
  print(f"[device check] {name}: {time.monotonic() - t:.1f} s", flush=True)
  return value


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", choices=sorted(MODES), default="full")
  parser.add_argument("--out", required=True, help="directory for device_check.json and device_check.md")
  parser.add_argument("--data", default="", help="the CIFAR-10 archive or image tree ('' = synthetic data)")
  parser.add_argument("--workdir", default="", help="where the study runs (default: a temporary directory)")
  parser.add_argument("--budget_s", type=float, default=0.0, help="seconds for the whole check (default: the mode's)")
  parser.add_argument("--seeds", type=int, default=2)
  return parser


def main(argv=None) -> int:
  args = make_parser().parse_args(argv)
  m = MODES[args.mode]
  if args.budget_s:
    m = dataclasses.replace(m, budget_s=args.budget_s)
  if args.data and not os.path.exists(args.data):
    print(f"error: --data: no such file or directory: {args.data}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  report = Report(args.out, args.mode)
  mesh = parallel.make_mesh()
  peak = _guarded(report, "peak", lambda: peak_tflops(m.matmul))
  bf16_peak = peak.get("bf16_tflops")
  rows = []

  def steps():
    skipped = []
    for model in m.models:
      for dtype in m.dtypes:
        # Deeper networks compile for minutes: past half the budget the rest is left to the study.
        if report.elapsed() > STEPS_SHARE * m.budget_s:
          skipped.append(f"{model} {dtype}")
          continue
        rows.append(step_rates(model, dtype, m, mesh, bf16_peak))
        report.phase("steps", {"rows": rows, "partial": True})
    return {"rows": rows, **({"skipped": f"out of time for {', '.join(skipped)}"} if skipped else {})}

  _guarded(report, "steps", steps)

  def pipeline():
    t = time.perf_counter()
    dataset = data.load(args.data or "synthetic", synthetic_train=max(4 * m.batch_size, 1024), synthetic_test=16)
    load_s = time.perf_counter() - t
    rates = pipeline_rates(dataset, m.batch_size, mesh)
    fastest = max((r["train_images_per_s"] for r in rows), default=0.0)
    slowest_stage = min(rates.values())
    return {"dataset": dataset.name, "load_s": load_s, **rates, "fastest_step_images_per_s": fastest,
            "keeps_up": slowest_stage >= fastest}

  _guarded(report, "pipeline", pipeline)

  def study_phase():
    left = m.budget_s - report.elapsed()
    if left < m.min_study_s:
      return {"skipped": f"{left:.0f} s left of the {m.budget_s:.0f} s budget"}
    f32 = [r for r in rows if r["model"] == m.study_model and r["dtype"] == "float32"]
    if f32:  # rates at the study's own batch size are unknown; the check's batch gives the order of magnitude
      rates = {"train": f32[0]["train_images_per_s"], "search": f32[0]["search_images_per_s"]}
      overhead = f32[0]["train_compile_s"] + 5.0
    else:
      rates, overhead = {"train": 200.0, "search": 100.0}, 30.0
    examples = m.study_examples or 50000
    runs = 3 * args.seeds
    # The estimate leaves out evaluations and the search's per-epoch records (about 1.4 times too short at toy
    # size): a margin, and each finished round of seeds is recorded at once, so a timeout keeps it.
    epochs = study_epochs(STUDY_SHARE * left, rates, runs, overhead, examples)
    workdir = args.workdir or tempfile.mkdtemp(prefix="device-check-study-")
    t = time.monotonic()
    record = {"epochs": epochs, "seeds": args.seeds, "rates_used": rates, "overhead_s": overhead}

    def on_round(k, summary):
      report.phase("study", {**record, "rounds_done": k, "markdown": study_report.markdown(summary)})

    result = run_study(m, args.data or "synthetic", workdir, epochs, args.seeds, on_round)
    return {**record, "rounds_done": args.seeds, "study_wall_s": time.monotonic() - t, **result}

  _guarded(report, "study", study_phase)
  print(markdown(report.record), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
