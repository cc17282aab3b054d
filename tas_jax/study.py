"""Does a searched shape beat uniform and random shapes at the same MACs, trained the same way?

The Rethinking question (Liu et al., ICLR 2019) asked of TAS for one base
network and one MAC target. :func:`run` answers it with the existing programs,
one mechanism per job:

1. the unpruned teacher: :func:`tas_jax.train.run` in mode ``base`` (``teacher/``);
2. TAS searches with several seeds: :func:`tas_jax.search.run`
   (``search/seed<k>/``); the shape of a search is its ``shape.json``;
3. the shapes to compare, written to ``shapes/<name>.json``: the searched ones
   (``tas-s<k>``), the paper's searched shape where one exists (``tas-paper``,
   a preset of :mod:`tas_jax.shapes`), the uniformly scaled network
   (:func:`tas_jax.baselines.uniform`), random draws from the search space
   (:func:`tas_jax.baselines.random_shape`, ``random-d<k>``) and L1 filter
   pruning of the trained teacher (:func:`tas_jax.baselines.l1_prune`);
4. every shape trained under one recipe, from scratch (Scratch-E) and distilled
   from the teacher, with N seeds: :func:`tas_jax.protocol.run`
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
import math
import os
from typing import Any, Callable, Mapping, Sequence

from tas_jax import baselines
from tas_jax import cost as cost_lib
from tas_jax import engine
from tas_jax import protocol
from tas_jax import search
from tas_jax import shapes
from tas_jax import train

log = logging.getLogger("tas_jax")

# Study variants and the protocol variants that train them.
VARIANTS = {"scratch": "scratch-e", "kd": "kd"}
TITLES = {"scratch": "scratch", "kd": "KD"}
TAS_METHODS = ("tas", "tas-paper")
BASELINE_METHODS = ("uniform", "random", "l1")
SAMPLERS = baselines.SAMPLERS
JSON_FILE, MD_FILE, PNG_FILE = "study.json", "study.md", "study.png"
RULE = ("difference of means > 2 x Welch standard error sqrt(s_a^2/n_a + s_b^2/n_b) (|Welch t| > 2), "
        "sample variances over seeds (ddof 1)")


class StudyError(ValueError):
  """A study request that cannot be carried out; the message says why."""


# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """A study's settings, typed and checked once (:meth:`from_mapping`), so nothing below re-reads a config dict."""

  model: str = "resnet20"
  dataset: str = "cifar10"
  data_dir: str = ""
  num_classes: int = 10
  num_train_examples: int = 0  # 0 = the whole training set
  target_flops_ratio: float = 0.5
  tolerance: float = 0.05  # the MACs band is target ± tolerance (on the ratio to the unpruned network)
  recipe: str = "official"  # training recipe of the teacher and every shape (experiments/configs/train.py)
  batch_size: int = 128
  teacher_epochs: int = 10
  search_epochs: int = 10
  search_seeds: int = 1
  search_batch_size: int = 64
  search_preset: str = "official"  # a search variant of experiments/configs/search.py: official, paper, exact
  paper_shape: str = ""  # a TAS preset (e.g. tas-c10-resnet20), "" = none
  random_draws: int = 1
  random_sampler: str = "rejection"  # rejection (exact), or walk; rejection falls back to walk when it misses
  l1: bool = True
  epochs: int = 10  # training epochs of every shape
  seeds: int = 2
  variants: tuple[str, ...] = ("scratch", "kd")
  train_overrides: tuple[str, ...] = ()  # KEY=VALUE keys of experiments/configs/train.py, teacher and shapes
  search_overrides: tuple[str, ...] = ()  # KEY=VALUE keys of experiments/configs/search.py
  latency_batch_sizes: tuple[int, ...] = (1, 64)
  latency_runs: int = 10

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> "StudyConfig":
    """The typed settings of a config mapping (lists as ``a,b`` strings or sequences); raises :class:`StudyError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # The command line adds on_bad_image to every config naming a dataset; the study's runs keep its default.
    if str(d.get("on_bad_image", "error")) != "error":
      raise StudyError("on_bad_image: the study reads only datasets without bad images (keep the default 'error')")
    unknown = sorted(set(d) - set(fields) - {"preset", "on_bad_image"})
    if unknown:
      raise StudyError(f"unknown study key(s): {', '.join(unknown)}")
    values = {}
    for name, f in fields.items():
      if name not in d:
        continue
      v = d[name]
      default = f.default
      try:
        if isinstance(default, bool):
          v = _bool(v)
        elif isinstance(default, int):
          v = int(v)
        elif isinstance(default, float):
          v = float(v)
        elif isinstance(default, tuple):
          sep = ";" if name.endswith("overrides") else ","
          items = [s.strip() for s in v.split(sep)] if isinstance(v, str) else [str(s).strip() for s in v]
          items = [s for s in items if s]
          v = tuple(int(s) for s in items) if name == "latency_batch_sizes" else tuple(items)
        else:
          v = str(v)
      except (TypeError, ValueError):
        raise StudyError(f"cannot read {name}={v!r} as a {type(default).__name__}") from None
      values[name] = v
    cfg = cls(**values)
    cfg.check()
    return cfg

  def check(self) -> None:
    """Refuse settings that cannot run, before anything is trained."""
    try:
      shapes.preset(self.model, self.num_classes)
    except shapes.ShapeError as e:
      raise StudyError(f"model: {e}") from None
    try:
      baselines.check_target(self.target_flops_ratio, self.tolerance)
    except baselines.PruneError as e:
      raise StudyError(str(e)) from None
    for name in ("teacher_epochs", "search_epochs", "epochs", "seeds", "batch_size", "search_batch_size",
                 "latency_runs", "num_classes"):
      if getattr(self, name) < 1:
        raise StudyError(f"{name} must be at least 1, got {getattr(self, name)}")
    for name in ("search_seeds", "random_draws", "num_train_examples"):
      if getattr(self, name) < 0:
        raise StudyError(f"{name} must not be negative, got {getattr(self, name)}")
    if not self.variants or any(v not in VARIANTS for v in self.variants):
      raise StudyError(f"variants must be some of {', '.join(VARIANTS)}, got {','.join(self.variants) or '(none)'}")
    if len(set(self.variants)) != len(self.variants):
      raise StudyError(f"variants repeat: {','.join(self.variants)}")
    if self.random_sampler not in SAMPLERS:
      raise StudyError(f"random_sampler must be one of {', '.join(SAMPLERS)}, got {self.random_sampler!r}")
    if any(b < 1 for b in self.latency_batch_sizes):
      raise StudyError(f"latency batch sizes must be positive, got {list(self.latency_batch_sizes)}")
    if self.paper_shape:
      if self.paper_shape not in shapes.preset_names():
        raise StudyError(f"paper_shape {self.paper_shape!r} is not a preset ({', '.join(shapes.preset_names())})")
      paper = shapes.preset(self.paper_shape)
      if (paper.arch, paper.depth) != (self.base_shape().arch, self.base_shape().depth):
        raise StudyError(f"paper_shape {self.paper_shape} is not a shape of {self.model}")
    if not (self.search_seeds or self.paper_shape):
      raise StudyError("nothing searched to compare: set search_seeds >= 1 or a paper_shape")
    # Bad recipe or override keys fail here, not after the teacher has trained.
    teacher_config(self)
    for v in self.variants:
      shape_config(self, v, 0, "")
    if self.search_seeds:
      search_config(self, 0)

  def base_shape(self) -> shapes.Shape:
    return shapes.preset(self.model, self.num_classes)

  def band(self) -> tuple[float, float]:
    return self.target_flops_ratio - self.tolerance, self.target_flops_ratio + self.tolerance

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _bool(v) -> bool:
  if isinstance(v, bool):
    return v
  if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
    return v.lower() in ("1", "true", "yes")
  if isinstance(v, int) and v in (0, 1):
    return bool(v)
  raise ValueError(v)


def _data_overrides(cfg: StudyConfig, epochs: int, batch_size: int) -> list[str]:
  out = [f"dataset={cfg.dataset}", f"num_train_examples={cfg.num_train_examples}", f"epochs={epochs}",
         f"batch_size={batch_size}"]
  return out + ([f"data_dir={cfg.data_dir}"] if cfg.data_dir else [])


def _overridden(config, overrides: Sequence[str], protected: Sequence[str] = ()):
  try:
    protocol.apply_overrides(config, overrides, protected)
  except protocol.ProtocolError as e:
    raise StudyError(str(e)) from None
  return config


def teacher_config(cfg: StudyConfig):
  """The unpruned teacher's training config: the recipe, the study's data and sizes, then ``train_overrides``."""
  from experiments.configs import train as train_configs  # the configs live beside the entry points
  try:
    config = train_configs.get_config(f"{cfg.model},{cfg.recipe}")
  except ValueError as e:
    raise StudyError(str(e)) from None
  _overridden(config, _data_overrides(cfg, cfg.teacher_epochs, cfg.batch_size) + list(cfg.train_overrides),
              protocol.PROTECTED)
  config.mode = "base"
  return config


def shape_overrides(cfg: StudyConfig) -> list[str]:
  """The training keys every shape run gets on top of the recipe (the same for every shape and variant)."""
  return _data_overrides(cfg, cfg.epochs, cfg.batch_size) + list(cfg.train_overrides)


def shape_config(cfg: StudyConfig, variant: str, seed: int, shape_path: str, teacher: str = ""):
  """The training config of one shape run, exactly as :func:`tas_jax.protocol.run` builds it."""
  try:
    return protocol.variant_config(VARIANTS[variant], seed, shape_path=shape_path, recipe=cfg.recipe,
                                   family=cfg.model, teacher=teacher, overrides=shape_overrides(cfg))
  except protocol.ProtocolError as e:
    raise StudyError(str(e)) from None


def search_config(cfg: StudyConfig, seed: int):
  """A TAS search's config: the model's search preset, the study's data, target and sizes, then ``search_overrides``."""
  from experiments.configs import search as search_configs  # the configs live beside the entry points
  try:
    config = search_configs.get_config(f"{cfg.model},{cfg.search_preset}")
  except ValueError as e:
    raise StudyError(f"search_preset: {e}") from None
  sets = _data_overrides(cfg, cfg.search_epochs, cfg.search_batch_size)
  sets += [f"target_flops_ratio={cfg.target_flops_ratio}", f"seed={seed}"]
  return _overridden(config, sets + list(cfg.search_overrides))


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


def significance(a: Sequence[float], b: Sequence[float]) -> dict:
  """Whether mean(a) - mean(b) exceeds the seed noise: ``|diff| > 2 * se``, ``se`` Welch's standard error.

  Returns ``{"n_a", "n_b", "mean_a", "mean_b", "std_a", "std_b", "diff",
  "se", "t", "df", "p", "significant", "verdict"}``; with fewer than two values
  on a side there is no noise estimate: ``se``, ``t``, ``df``, ``p`` and
  ``significant`` are None and the verdict says so. ``p`` is Welch's two-sided
  p-value (reported, not used by the rule).
  """
  a, b = [float(x) for x in a], [float(x) for x in b]
  ma, sa = protocol.mean_std(a)
  mb, sb = protocol.mean_std(b)
  out = {"n_a": len(a), "n_b": len(b), "mean_a": ma, "mean_b": mb, "std_a": sa, "std_b": sb,
         "diff": ma - mb if a and b else float("nan"), "se": None, "t": None, "df": None, "p": None,
         "significant": None}
  if len(a) < 2 or len(b) < 2:
    out["verdict"] = "too few seeds (need 2 a side)"
    return out
  va, vb = sa * sa / len(a), sb * sb / len(b)
  se = math.sqrt(va + vb)
  diff = out["diff"]
  if se == 0.0:
    t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    df, p = None, (1.0 if diff == 0.0 else 0.0)
  else:
    t = diff / se
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    from scipy import stats  # pylint: disable=g-import-not-at-top
    p = float(2.0 * stats.t.sf(abs(t), df))
  significant = abs(diff) > 2.0 * se
  out.update(se=se, t=t, df=df, p=p, significant=significant,
             verdict=("higher" if diff > 0 else "lower") if significant else "within seed noise")
  return out


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
    check_band(shapes.load(e.path), cfg.target_flops_ratio, cfg.tolerance, f"{e.name} ({e.path})")
  return out


def _in_band(path: str, cfg: StudyConfig) -> bool:
  return baselines.in_band(baselines.macs_ratio(shapes.load(path)), cfg.target_flops_ratio, cfg.tolerance)


# ----------------------------------------------------------------------------- the programs

def _finished(run_dir: str, need: str = "") -> bool:
  r = protocol.read_json(os.path.join(run_dir, "result.json"))
  return bool(r.get("finished")) and (not need or os.path.isfile(os.path.join(run_dir, need)))


def train_teacher(cfg: StudyConfig, workdir: str, train_fn: Callable = train.run) -> str:
  d = os.path.join(workdir, "teacher")
  if _finished(d, os.path.join(train.MODEL_DIR, "shape.json")):
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
    out.append(_stored(workdir, f"tas-s{seed}", "tas", d, lambda p=searched: (shapes.load(p), {"search_seed": seed})))
  return out


def _latency(cfg: StudyConfig, entry: Entry) -> dict:
  """Measured eval-mode latency per batch size, kept beside the shape file so reruns do not time it again."""
  if not cfg.latency_batch_sizes:
    return {}
  path = os.path.splitext(entry.path)[0] + ".latency.json"
  cached = protocol.read_json(path)
  want = [str(b) for b in cfg.latency_batch_sizes]
  if all(k in cached for k in want):
    return {k: cached[k] for k in want}
  from tas_jax import latency  # pylint: disable=g-import-not-at-top
  shape = shapes.load(entry.path)
  out = {}
  for b in cfg.latency_batch_sizes:
    m = latency.measure_latency(shape, int(b), cfg.latency_runs)
    out[str(b)] = {"median_ms": m["median_ms"], "images_per_s": m["images_per_s"], "device": m["device"]}
  engine.write_json(path, out)
  return out


def run(cfg: StudyConfig, workdir: str, *, train_fn: Callable = train.run, search_fn: Callable = search.run,
        on_round: Callable[[int, dict], None] | None = None) -> dict:
  """The whole study (see the module docstring); returns the summary written to ``study.json``."""
  workdir = os.path.normpath(workdir)
  os.makedirs(workdir, exist_ok=True)
  # Shapes that need nothing trained first: a target out of reach fails before hours of training.
  paper = []
  if cfg.paper_shape:
    paper = [_stored(workdir, "tas-paper", "tas-paper", cfg.paper_shape,
                     lambda: (shapes.preset(cfg.paper_shape, cfg.num_classes), {"preset": cfg.paper_shape}))]
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
    r = protocol.read_json(os.path.join(run_dir, f"seed{s}", "result.json"))
    if r.get("finished", True) and "test_top1" in r:
      out.append(r)
  return out


def summarize(cfg: StudyConfig, workdir: str, entries: Sequence[Entry], teacher: str, latencies: Mapping[str, dict],
              searched_dirs: Sequence[str] = ()) -> dict:
  """``study.json``: the settings, the teacher, every shape with its runs, and the significance tests."""
  full = cost_lib.count(cfg.base_shape()).macs
  rows = []
  for e in entries:
    shape = shapes.load(e.path)
    c = cost_lib.count(shape)
    ratio = c.macs / full
    row = {"name": e.name, "method": e.method, "source": e.source, "file": os.path.relpath(e.path, workdir),
           "macs": c.macs, "params": c.params, "ratio": ratio,
           "in_band": baselines.in_band(ratio, cfg.target_flops_ratio, cfg.tolerance),
           "blocks": list(shape.blocks), "latency": latencies.get(e.name, {}), "variants": {}}
    for v in cfg.variants:
      results = _results(os.path.join(workdir, "train", e.name, VARIANTS[v]), cfg.seeds)
      agg = protocol.aggregate(results) if results else {"n": 0, "test_top1": []}
      row["variants"][v] = {"n": agg["n"], "planned": cfg.seeds, "test_top1": agg.get("test_top1", []),
                            "mean": agg.get("test_top1_mean"), "std": agg.get("test_top1_std"),
                            "epochs": agg.get("epochs")}
    rows.append(row)
  t = protocol.read_json(os.path.join(teacher, "result.json"))
  searches = []
  for d in searched_dirs:
    r = protocol.read_json(os.path.join(d, "result.json"))
    searches.append({"dir": os.path.relpath(d, workdir), "flops_ratio": r.get("flops_ratio"),
                     "in_search_band": r.get("in_band"), "band_ratio": r.get("band_ratio"), "epochs": r.get("epochs")})
  return {"config": cfg.to_dict(), "band": list(cfg.band()), "unpruned_macs": full, "rule": RULE,
          "dataset": t.get("dataset", cfg.dataset),
          "teacher": {"dir": os.path.relpath(teacher, workdir), "test_top1": t.get("test_top1"),
                      "macs": t.get("macs"), "params": t.get("params"), "epochs": t.get("epochs")},
          "searches": searches, "shapes": rows, "comparisons": comparisons(rows, cfg.variants)}


def _pool(rows: Sequence[dict], method: str, variant: str) -> list[float]:
  return [x for r in rows if r["method"] == method and r["in_band"] for x in r["variants"][variant]["test_top1"]]


def comparisons(rows: Sequence[dict], variants: Sequence[str]) -> list[dict]:
  """TAS (and the paper's shape) against each baseline method, per variant, in-band shapes only."""
  out = []
  present = {r["method"] for r in rows if r["in_band"]}
  for v in variants:
    for a in TAS_METHODS:
      for b in BASELINE_METHODS:
        if a in present and b in present:
          out.append({"variant": v, "a": a, "b": b, **significance(_pool(rows, a, v), _pool(rows, b, v))})
  return out


def _pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _acc(cell: dict) -> str:
  n = cell.get("n", 0)
  if not n:
    return "–"
  text = f"{_pct(cell['mean'])} ± {100 * cell['std']:.2f}" if n > 1 else _pct(cell["mean"])
  return f"{text} ({n})"


def markdown(summary: dict) -> str:
  """``study.md``: the settings, one row per shape, and the significance tests."""
  cfg = summary["config"]
  lo, hi = summary["band"]
  lat_keys = [str(b) for b in cfg["latency_batch_sizes"]]
  t = summary["teacher"]
  lines = [f"# Searched vs uniform vs random shapes: {cfg['model']} at {cfg['target_flops_ratio']} of the MACs", "",
           f"* dataset `{summary.get('dataset')}`, {cfg['num_train_examples'] or 'all'} training examples; "
           f"recipe `{cfg['recipe']}`, {cfg['epochs']} epochs per shape, batch {cfg['batch_size']}, "
           f"{cfg['seeds']} seed(s) per shape and variant",
           f"* MACs band: ratio [{lo:.3f}, {hi:.3f}] of the unpruned {summary['unpruned_macs']:,} MACs; shapes "
           "outside it are flagged and left out of the tests",
           f"* teacher (unpruned, {t.get('epochs')} epochs): test top-1 {_pct(t.get('test_top1'))} %",
           f"* {len(summary['searches'])} TAS search(es) of {cfg['search_epochs']} epochs; "
           f"{cfg['random_draws']} random draw(s)",
           "* accuracy: final-epoch test top-1 in %, mean ± sample std over seeds (runs finished)"]
  if lat_keys:
    dev = next((r["latency"][k]["device"] for r in summary["shapes"] for k in lat_keys if k in r["latency"]), "?")
    lines.append(f"* latency: median eval-mode forward time on {dev}, {cfg['latency_runs']} runs, per batch size")
  lines.append("")
  head = ["shape", "method", "MACs", "ratio", "params", "in band"] + [f"latency b{k} (ms)" for k in lat_keys]
  head += [f"{TITLES[v]} top-1 (%)" for v in cfg["variants"]]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in summary["shapes"]:
    cells = [r["name"], r["method"], f"{r['macs']:,}", f"{r['ratio']:.4f}", f"{r['params']:,}",
             "yes" if r["in_band"] else "**no** (flagged)"]
    cells += [f"{r['latency'][k]['median_ms']:.3f}" if k in r["latency"] else "–" for k in lat_keys]
    cells += [_acc(r["variants"][v]) for v in cfg["variants"]]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Significance", "", f"Rule: {summary['rule']}. A method with several shapes (searches, random "
            "draws) pools the runs of all of them. Welch's df and two-sided p are shown for reference; with 2-3 "
            "seeds a side, |t| > 2 is a rough screen, not a 5 % test.", ""]
  head = ["variant", "TAS", "baseline", "TAS (%)", "baseline (%)", "diff (pp)", "2 SE (pp)", "t", "df", "p",
          "verdict"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in summary["comparisons"]:
    se = c["se"]
    cells = [TITLES[c["variant"]], c["a"], c["b"], f"{_pct(c['mean_a'])} (n={c['n_a']})",
             f"{_pct(c['mean_b'])} (n={c['n_b']})", f"{100 * c['diff']:+.2f}" if c["n_a"] and c["n_b"] else "–",
             f"{200 * se:.2f}" if se is not None else "–",
             f"{c['t']:.2f}" if c["t"] is not None else "–", f"{c['df']:.1f}" if c["df"] is not None else "–",
             f"{c['p']:.3f}" if c["p"] is not None else "–",
             f"TAS {c['verdict']}" if c["significant"] else c["verdict"]]
    lines.append("| " + " | ".join(cells) + " |")
  if not summary["comparisons"]:
    lines.append("| – | – | – | – | – | – | – | – | – | – | no in-band TAS and baseline shapes to compare |")
  return "\n".join(lines) + "\n"


def figure(summary: dict, path: str) -> None:
  """Accuracy against MACs with error bars (sample std over seeds), one colour per method, one marker per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cfg = summary["config"]
  colours = {"tas": "C3", "tas-paper": "C1", "uniform": "C0", "random": "C2", "l1": "C4"}
  markers = {"scratch": "o", "kd": "s"}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  full = summary["unpruned_macs"]
  lo, hi = summary["band"]
  ax.axvspan(lo * full / 1e6, hi * full / 1e6, color="0.92", zorder=0, label="MACs band")
  seen = set()
  for i, v in enumerate(cfg["variants"]):
    for r in summary["shapes"]:
      cell = r["variants"][v]
      if not cell["n"]:
        continue
      key = (r["method"], v)
      label = None if key in seen else f"{r['method']} ({TITLES[v]})"
      seen.add(key)
      x = r["macs"] / 1e6 * (1 + 0.004 * (i - 0.5))  # variants side by side
      ax.errorbar(x, 100 * cell["mean"], yerr=100 * cell["std"], fmt=markers[v], color=colours.get(r["method"], "k"),
                  mfc="none" if not r["in_band"] else None, capsize=3, label=label)
  t = summary["teacher"]
  if t.get("test_top1") is not None:
    ax.axhline(100 * t["test_top1"], color="0.5", ls="--", lw=1, label="unpruned teacher")
  ax.set_xlabel("MACs (millions)")
  ax.set_ylabel("final test top-1 (%)")
  ax.set_title(f"{cfg['model']}, target {cfg['target_flops_ratio']} of the MACs (open: outside the band)")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write_reports(workdir: str, summary: dict) -> None:
  engine.write_json(os.path.join(workdir, JSON_FILE), summary)
  engine.write_text(os.path.join(workdir, MD_FILE), markdown(summary))
  figure(summary, os.path.join(workdir, PNG_FILE))
