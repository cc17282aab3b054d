"""Does a searched shape beat uniform and random shapes at the same MACs, trained the same way?

The Rethinking question (Liu et al., ICLR 2019) asked of TAS for one base
network and one MAC target. :func:`run` answers it with the existing programs,
one mechanism per job:

1. the unpruned teacher: :func:`tas_jax.programs.train.run` in mode ``base`` (``teacher/``);
2. TAS searches with several seeds: :func:`tas_jax.programs.search.run`
   (``search/seed<k>/``); the shape of a search is its ``shape.json``;
3. the shapes to compare, written to ``shapes/<name>.json``: the searched ones
   (``tas-s<k>``), the paper's searched shape where one exists (``tas-paper``,
   a preset of :mod:`tas_jax.core.shapes`), the uniformly scaled network
   (:func:`tas_jax.baselines.uniform`), random draws from the search space
   (:func:`tas_jax.baselines.random_shape`, ``random-d<k>``) and L1 filter
   pruning of the trained teacher (:func:`tas_jax.baselines.l1_prune`);
4. every shape trained under one recipe, from scratch (Scratch-E) and distilled
   from the teacher, with N seeds: :func:`tas_jax.programs.protocol.run`
   (``train/<name>/<variant>/seed<k>/``).

The comparison is only fair inside one MACs band, ``target ± tolerance`` of the
unpruned network's MACs: the baselines are produced inside it and refused
otherwise (:func:`check_band`). A searched shape (the search's own band differs)
or the paper's shape outside it is still trained and shown, flagged, but left
out of the significance tests.

Seeds are trained in rounds (seed 0 of every shape, then seed 1, ...) and the
reports are rewritten after each round, so a study cut short still reports
every shape. Every program resumes: rerunning the same study skips finished
runs and continues unfinished ones.

Outputs: ``study.json``, ``study.md`` (one row per shape: method, MACs, ratio,
params, measured latency, final-epoch test top-1 mean ± sample std over seeds
per variant; then the significance tests) and ``study.png`` (accuracy against
MACs with error bars).

Significance rule (:func:`significance`): for TAS against each baseline
method, per variant, the final top-1 of every seed (and, for methods with
several shapes such as several searches or random draws, of every shape)
forms one sample; the difference of means counts as real when it exceeds
twice its Welch standard error ``sqrt(s_a^2/n_a + s_b^2/n_b)`` (sample
variances, ddof 1), i.e. ``|t| > 2`` for Welch's t. Welch's degrees of freedom
and two-sided p-value are reported beside it: with two or three seeds a side
the t distribution's tails are heavy, and ``|t| > 2`` is a rough screen, not a
5 % test.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Mapping, Sequence


from tas_jax import baselines
from tas_jax.latency import measure as latency
from tas_jax.core import cost as cost_lib
from tas_jax.runtime import files, lock
from tas_jax.programs import protocol
from tas_jax.report import tables
from tas_jax.programs.study_config import StudyConfig, StudyError, search_config, shape_overrides, teacher_config
from tas_jax.report.study import RULE, VARIANTS, comparisons, write_reports
from tas_jax.programs import search
from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.programs import train
from tas_jax.runtime import models

log = logging.getLogger("tas_jax")


# ----------------------------------------------------------------------------- configuration


# ----------------------------------------------------------------------------- band and statistics

def check_band(shape: shapes.Shape, target: float, tolerance: float, what: str = "shape") -> float:
  """The MAC ratio of ``shape``; raises :class:`StudyError` when it lies outside ``target ± tolerance``.

  Comparing accuracies of networks of different cost answers another question,
  so a baseline outside the band is refused rather than trained.
  """
  ratio = baselines.macs_ratio(shape)
  if not baselines.in_band(ratio, target, tolerance):
    raise StudyError(f"{what}: MAC ratio {ratio:.4f} lies outside the band [{target - tolerance:.4f}, "
                     f"{target + tolerance:.4f}] (target {target} ± {tolerance})")
  return ratio


# ----------------------------------------------------------------------------- shapes

@dataclasses.dataclass(frozen=True)
class Entry:
  """One shape of the study."""

  name: str  # tas-s0, tas-paper, uniform, random-d0, l1
  method: str  # tas, tas-paper, uniform, random, l1
  path: str  # shapes/<name>.json
  source: str  # where it came from (a search run, a preset, a producer)


def _shape_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, "shapes", f"{name}.json")


def _stored(workdir: str, name: str, method: str, source: str, make: Callable[[], tuple[shapes.Shape, dict]]) -> Entry:
  """The shape ``name``: read back when a previous run stored it (so reruns train the same shape), else made."""
  path = _shape_path(workdir, name)
  if not os.path.isfile(path):
    shape, info = make()
    info = {"method": method, "source": source, **info}
    baselines.save(shape, path, info, label=method)
  return Entry(name, method, path, source)


def _random(cfg: StudyConfig, draw: int) -> tuple[shapes.Shape, dict]:
  base = cfg.base_shape()
  sampler = cfg.random_sampler
  try:
    shape = baselines.random_shape(base, cfg.target_flops_ratio, cfg.tolerance, seed=draw, sampler=sampler,
                                   max_tries=200_000)
  except baselines.PruneError as e:
    if sampler != "rejection":
      raise StudyError(f"random draw {draw}: {e}") from None
    log.warning("random draw %d: rejection sampling missed the band (%s); using the walk sampler", draw, e)
    sampler = "walk"
    try:
      shape = baselines.random_shape(base, cfg.target_flops_ratio, cfg.tolerance, seed=draw, sampler=sampler)
    except baselines.PruneError as e2:
      raise StudyError(f"random draw {draw}: {e2}") from None
  return shape, {"seed": draw, "sampler": sampler}


def _uniform(cfg: StudyConfig) -> tuple[shapes.Shape, dict]:
  try:
    shape = baselines.uniform(cfg.base_shape(), cfg.target_flops_ratio, cfg.tolerance)
  except baselines.PruneError as e:
    raise StudyError(f"uniform: {e}") from None
  return shape, {"width_ratio": shape.widths[0] / shape.nominal[0]}


def _l1(cfg: StudyConfig, teacher: str) -> tuple[shapes.Shape, dict]:
  try:
    pruned = baselines.l1_prune(teacher, cfg.target_flops_ratio, cfg.tolerance)
  except baselines.PruneError as e:
    raise StudyError(f"l1: {e}") from None
  return pruned.shape, {"base": teacher, "scope": pruned.scope, "residual": pruned.residual, "level": pruned.level}


def baseline_entries(cfg: StudyConfig, workdir: str, teacher: str | None) -> list[Entry]:
  """Uniform, random draws and (given a trained teacher) L1, each checked against the band."""
  out = [_stored(workdir, "uniform", "uniform", "baselines.uniform", lambda: _uniform(cfg))]
  for d in range(cfg.random_draws):
    out.append(_stored(workdir, f"random-d{d}", "random", "baselines.random_shape",
                       lambda d=d: _random(cfg, d)))
  if cfg.l1 and teacher:
    out.append(_stored(workdir, "l1", "l1", "baselines.l1_prune", lambda: _l1(cfg, teacher)))
  for e in out:
    check_band(shape_files.load(e.path), cfg.target_flops_ratio, cfg.tolerance, f"{e.name} ({e.path})")
  return out


def _in_band(path: str, cfg: StudyConfig) -> bool:
  return baselines.in_band(baselines.macs_ratio(shape_files.load(path)), cfg.target_flops_ratio, cfg.tolerance)


# ----------------------------------------------------------------------------- the programs

def _finished(run_dir: str, need: str = "") -> bool:
  r = files.read_json(os.path.join(run_dir, "result.json"))
  return bool(r.get("finished")) and (not need or os.path.isfile(os.path.join(run_dir, need)))


def train_teacher(cfg: StudyConfig, workdir: str, train_fn: Callable = train.run) -> str:
  d = os.path.join(workdir, "teacher")
  if _finished(d, os.path.join(models.MODEL_DIR, "shape.json")):
    log.info("teacher: finished already (%s)", d)
  else:
    log.info("teacher: training %s for %d epochs in %s", cfg.model, cfg.teacher_epochs, d)
    r = train_fn(teacher_config(cfg), d)
    if not r.get("finished", True):
      raise StudyError(f"the teacher run {d} stopped before its end; rerun to resume")
  return d


def run_searches(cfg: StudyConfig, workdir: str, search_fn: Callable = search.run) -> list[Entry]:
  out = []
  for seed in range(cfg.search_seeds):
    d = os.path.join(workdir, "search", f"seed{seed}")
    if _finished(d, "shape.json"):
      log.info("search seed %d: finished already (%s)", seed, d)
    else:
      log.info("search seed %d: %d epochs in %s", seed, cfg.search_epochs, d)
      r = search_fn(search_config(cfg, seed), d)
      if not r.get("finished", True):
        raise StudyError(f"the search run {d} stopped before its end; rerun to resume")
    searched = os.path.join(d, "shape.json")  # the shape to train, whatever else the search writes
    out.append(_stored(workdir, f"tas-s{seed}", "tas", d,
                       lambda p=searched: (shape_files.load(p), {"search_seed": seed})))
  return out


def _latency(cfg: StudyConfig, entry: Entry) -> dict:
  """Measured eval-mode latency per batch size, kept beside the shape file so reruns do not time it again."""
  if not cfg.latency_batch_sizes:
    return {}
  path = os.path.splitext(entry.path)[0] + ".latency.json"
  cached = files.read_json(path)
  want = [str(b) for b in cfg.latency_batch_sizes]
  if all(k in cached for k in want):
    return {k: cached[k] for k in want}
  shape = shape_files.load(entry.path)
  out = {}
  for b in cfg.latency_batch_sizes:
    m = latency.measure_latency(shape, int(b), cfg.latency_runs)
    out[str(b)] = {"median_ms": m["median_ms"], "images_per_s": m["images_per_s"], "device": m["device"]}
  files.write_json(path, out)
  return out


def run(cfg: StudyConfig, workdir: str, *, train_fn: Callable = train.run, search_fn: Callable = search.run,
        on_round: Callable[[int, dict], None] | None = None) -> dict:
  """The whole study (see the module docstring); returns the summary written to ``study.json``."""
  workdir = os.path.normpath(workdir)
  with lock.locked(workdir):
    return _run(cfg, workdir, train_fn, search_fn, on_round)


def _run(cfg: StudyConfig, workdir: str, train_fn: Callable, search_fn: Callable, on_round) -> dict:
  # Shapes that need nothing trained first: a target out of reach fails before hours of training.
  paper = []
  if cfg.paper_shape:
    paper = [_stored(workdir, "tas-paper", "tas-paper", cfg.paper_shape,
                     lambda: (shape_files.preset(cfg.paper_shape, cfg.num_classes), {"preset": cfg.paper_shape}))]
  early = baseline_entries(cfg, workdir, None)
  teacher = train_teacher(cfg, workdir, train_fn)
  searched = run_searches(cfg, workdir, search_fn)
  entries = searched + paper + (baseline_entries(cfg, workdir, teacher) if cfg.l1 else early)
  latencies = {e.name: _latency(cfg, e) for e in entries}
  variants = [VARIANTS[v] for v in cfg.variants]
  summary = {}
  for k in range(1, cfg.seeds + 1):  # seed 0 of every shape first, then seed 1, ...
    for e in entries:
      log.info("round %d/%d: %s", k, cfg.seeds, e.name)
      try:
        protocol.run(e.path, teacher, k, os.path.join(workdir, "train", e.name), recipe=cfg.recipe,
                     overrides=shape_overrides(cfg), variants=variants, label=e.method, latency_batch_sizes=(),
                     train_fn=train_fn)
      except protocol.ProtocolError as err:
        raise StudyError(f"{e.name}: {err}") from None
    summary = summarize(cfg, workdir, entries, teacher, latencies, searched_dirs=[e.source for e in searched])
    write_reports(workdir, summary)
    if on_round:
      on_round(k, summary)
  return summary


# ----------------------------------------------------------------------------- reports


def _results(run_dir: str, seeds: int) -> list[dict]:
  out = []
  for s in range(seeds):
    r = files.read_json(os.path.join(run_dir, f"seed{s}", "result.json"))
    if r.get("finished", True) and "test_top1" in r:
      out.append(r)
  return out


def summarize(cfg: StudyConfig, workdir: str, entries: Sequence[Entry], teacher: str, latencies: Mapping[str, dict],
              searched_dirs: Sequence[str] = ()) -> dict:
  """``study.json``: the settings, the teacher, every shape with its runs, and the significance tests."""
  full = cost_lib.count(cfg.base_shape()).macs
  rows = []
  for e in entries:
    shape = shape_files.load(e.path)
    c = cost_lib.count(shape)
    ratio = c.macs / full
    row = {"name": e.name, "method": e.method, "source": e.source, "file": os.path.relpath(e.path, workdir),
           "macs": c.macs, "params": c.params, "ratio": ratio,
           "in_band": baselines.in_band(ratio, cfg.target_flops_ratio, cfg.tolerance),
           "blocks": list(shape.blocks), "latency": latencies.get(e.name, {}), "variants": {}}
    for v in cfg.variants:
      results = _results(os.path.join(workdir, "train", e.name, VARIANTS[v]), cfg.seeds)
      agg = tables.aggregate(results) if results else {"n": 0, "test_top1": []}
      row["variants"][v] = {"n": agg["n"], "planned": cfg.seeds, "test_top1": agg.get("test_top1", []),
                            "mean": agg.get("test_top1_mean"), "std": agg.get("test_top1_std"),
                            "epochs": agg.get("epochs")}
    rows.append(row)
  t = files.read_json(os.path.join(teacher, "result.json"))
  searches = []
  for d in searched_dirs:
    r = files.read_json(os.path.join(d, "result.json"))
    searches.append({"dir": os.path.relpath(d, workdir), "flops_ratio": r.get("flops_ratio"),
                     "in_search_band": r.get("in_band"), "band_ratio": r.get("band_ratio"), "epochs": r.get("epochs")})
  return {"config": cfg.to_dict(), "band": list(cfg.band()), "unpruned_macs": full, "rule": RULE,
          "dataset": t.get("dataset", cfg.dataset),
          "teacher": {"dir": os.path.relpath(teacher, workdir), "test_top1": t.get("test_top1"),
                      "macs": t.get("macs"), "params": t.get("params"), "epochs": t.get("epochs")},
          "searches": searches, "shapes": rows, "comparisons": comparisons(rows, cfg.variants)}
