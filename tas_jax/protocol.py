"""The Rethinking protocol around one pruned shape, and the tables that compare finished runs.

For one shape (searched by TAS, or from a pruning baseline) :func:`run`
trains, with one recipe and N seeds each (PRUNING-BASELINES 1.2 and design
consequence 4):

* ``kd``: TAS's student, distilled from a trained unpruned teacher (TAS-SPEC 6.3);
* ``scratch-e``: random init, cross-entropy, the recipe's epochs (Scratch-E;
  also TAS's no-KD baseline);
* ``scratch-b``: the same with the epochs stretched by MACs(unpruned) /
  MACs(shape) (Scratch-B, :func:`tas_jax.train.make_plan`);
* ``finetune``: inherited weights (a base run, sliced first-c by
  :func:`tas_jax.train.inherit`; or the weights ``experiments.prune`` kept by
  L1 norm or batch-norm scale) trained with the recipe's fine-tuning schedule.

Each run lives in ``DIR/<variant>/seed<k>`` and is a plain
:func:`tas_jax.train.run`: a finished run (its ``result.json`` exists) is not
trained again, an unfinished one resumes. ``DIR/protocol.json`` and
``DIR/protocol.md`` report, per variant, the mean and sample standard
deviation (ddof 1) of the final-epoch test top-1 and top-5, MACs, params,
epochs, recipe and the measured inference latency of the shape
(:func:`tas_jax.latency.measure_latency`; every variant trains the same
shape, so the latency is measured once and shown on every row, beside the
teacher's).

:func:`collect` reads finished training runs and protocol directories into
rows for :func:`markdown` (``experiments.compare``), each labelled by the
method that produced its shape (the ``pruning`` record of a shape written by
``experiments.prune``, a TAS preset or search run, the unpruned network, else
the shape file's or directory's name).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
from typing import Callable, Iterable, Sequence

from tas_jax import baselines
from tas_jax import cost as cost_lib
from tas_jax import engine
from tas_jax import shapes
from tas_jax import train

log = logging.getLogger("tas_jax")

VARIANTS = ("kd", "scratch-e", "scratch-b", "finetune")
_MODE_BUDGET = {"kd": ("kd", "epochs"), "scratch-e": ("scratch", "epochs"), "scratch-b": ("scratch", "flops"),
                "finetune": ("finetune", "epochs")}
TITLES = {"kd": "TAS-KD", "scratch-e": "Scratch-E", "scratch-b": "Scratch-B", "finetune": "Fine-tuned",
          "base": "unpruned", "sparsity": "sparsity-trained"}
# Keys the protocol sets itself for every run; overriding them would mix the variants up.
PROTECTED = ("mode", "shape", "teacher", "init_from", "budget", "seed", "recipe")
SHAPE_FILE = "shape.json"
JSON_FILE = "protocol.json"
MD_FILE = "protocol.md"


class ProtocolError(ValueError):
  """A protocol or comparison request that cannot be carried out; the message says why."""


# ----------------------------------------------------------------------------- configuration

def family_preset(shape: shapes.Shape) -> str:
  """The preset name of the unpruned network of ``shape``'s family (``resnet56``, ``imagenet-resnet50``)."""
  return f"resnet{shape.depth}" if shape.arch == "cifar" else f"imagenet-resnet{shape.depth}"


def config_flags_to_set(argv: Sequence[str]) -> list[str]:
  """Rewrites ``--config.KEY=VALUE`` and ``--config.KEY VALUE`` as ``--set KEY=VALUE``."""
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      key, eq, value = a[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ProtocolError(f"{a} needs a value")
        value, i = argv[i + 1], i + 1
      out += ["--set", f"{key}={value}"]
    else:
      out.append(a)
    i += 1
  return out


def _parse(old, text: str, key: str):
  try:
    if isinstance(old, bool):
      if text.lower() in ("1", "true", "yes"):
        return True
      if text.lower() in ("0", "false", "no"):
        return False
      raise ValueError(text)
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, (tuple, list)):
      items = [v.strip() for v in text.strip("()[] ").split(",") if v.strip()]
      return tuple(float(v) if re.search(r"[.eE]", v) else int(v) for v in items)
  except ValueError:
    raise ProtocolError(f"cannot read {key}={text!r} as a {type(old).__name__}") from None
  return text


def apply_overrides(config, overrides: Iterable[str], protected: Sequence[str] = PROTECTED) -> None:
  """Sets ``KEY=VALUE`` items on a training config, typed like the key's default."""
  for item in overrides:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
      raise ProtocolError(f"expected KEY=VALUE, got {item!r}")
    if key in protected:
      raise ProtocolError(f"{key} is set by the command itself and cannot be overridden")
    if key not in config:
      raise ProtocolError(f"unknown training configuration key {key!r}")
    config[key] = _parse(config[key], text, key)


def inherit_source(path: str) -> str:
  """The ``init_from`` of a fine-tuning run: a run or model directory, or the weights beside a pruned shape file."""
  if os.path.isfile(path):
    weights = baselines.weights_dir(path)
    if os.path.isfile(os.path.join(weights, "shape.json")):
      return weights
    raise ProtocolError(f"no inherited weights beside {path} (expected {weights}/, written by experiments.prune "
                        "--method l1|slimming)")
  if not os.path.isdir(path):
    raise ProtocolError(f"--inherit {path} does not exist")
  if (os.path.isfile(os.path.join(path, "shape.json")) or os.path.isdir(os.path.join(path, train.MODEL_DIR))
      or train.is_search_run(path)):
    return path
  raise ProtocolError(f"{path} holds no trained network (model/ of a finished run, or shape.json + params/)")


def variant_config(variant: str, seed: int, *, shape_path: str, recipe: str, family: str, teacher: str = "",
                   init_from: str = "", overrides: Iterable[str] = ()):
  """The training config of one run of the protocol."""
  from experiments.configs import train as train_configs  # the configs live beside the entry points
  mode, budget = _MODE_BUDGET[variant]
  try:
    config = train_configs.get_config(f"{family},{recipe}")
  except ValueError as e:  # an unknown recipe
    raise ProtocolError(str(e)) from None
  apply_overrides(config, overrides)
  config.mode, config.budget, config.seed, config.shape = mode, budget, int(seed), shape_path
  if mode == "kd":
    config.teacher = teacher
  if mode == "finetune":
    config.init_from = init_from
  return config


# ----------------------------------------------------------------------------- labels and statistics

def read_json(path: str) -> dict:
  try:
    with open(path) as f:
      d = json.load(f)
    return d if isinstance(d, dict) else {}
  except (OSError, ValueError):
    return {}


def label_for(spec: str | None, fallback: str = "", shape: shapes.Shape | None = None) -> str:
  """The method behind a shape spec: the pruning record's method, ``searched``, ``unpruned``, else a name."""
  spec = spec or ""
  if spec and os.path.isfile(spec):
    method = baselines.pruning_info(spec).get("method")
    if method:
      return str(method)
    label = read_json(spec).get("label")
    if label:
      return str(label)
    search_config = read_json(os.path.join(os.path.dirname(spec), "config.json"))
    if "target_flops_ratio" in search_config:
      return "searched"
  if os.path.basename(spec).startswith("tas-") or spec.endswith(".config"):
    return "searched"
  if shape is not None and shapes.is_unpruned(shape):
    return "unpruned"
  if spec:
    return os.path.splitext(os.path.basename(spec.rstrip("/")))[0]
  return fallback


def variant_of(result: dict) -> str:
  mode = result.get("mode", "")
  if mode == "scratch":
    return "scratch-b" if result.get("budget") == "flops" else "scratch-e"
  if mode == "kd" and result.get("budget") == "flops":
    return "kd-b"
  return mode or "?"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  n = len(values)
  if not n:
    return float("nan"), float("nan")
  m = sum(values) / n
  if n < 2:
    return m, 0.0
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def aggregate(results: Sequence[dict]) -> dict:
  """Statistics of finished runs of one shape and variant."""
  top1 = [float(r["test_top1"]) for r in results]
  top5 = [float(r.get("test_top5", float("nan"))) for r in results]
  m1, s1 = mean_std(top1)
  m5, s5 = mean_std(top5)
  epochs = sorted({int(r.get("epochs", 0)) for r in results})
  first = results[0] if results else {}
  return {"n": len(results), "seeds": [r.get("seed") for r in results], "test_top1": top1,
          "test_top1_mean": m1, "test_top1_std": s1, "test_top5_mean": m5, "test_top5_std": s5,
          "epochs": epochs[0] if len(epochs) == 1 else epochs, "macs": first.get("macs"),
          "params": first.get("params"), "flops_ratio": first.get("flops_ratio"), "recipe": first.get("recipe"),
          "mode": first.get("mode"), "budget": first.get("budget")}


# ----------------------------------------------------------------------------- the protocol

def _store_shape(spec: str, workdir: str, label: str) -> None:
  """Keeps the shape in the protocol directory, so every run (and every rerun) names the same file."""
  shape = shapes.resolve(spec)
  path = os.path.join(workdir, SHAPE_FILE)
  if os.path.isfile(path):
    if shapes.load(path) != shape:
      raise ProtocolError(f"{workdir} holds a protocol for another shape ({path}); use another --workdir")
    return
  os.makedirs(workdir, exist_ok=True)
  info = baselines.pruning_info(spec) if os.path.isfile(spec) else {}
  baselines.save(shape, path, info or None, label=label)


def _latency(shape: shapes.Shape, batch_sizes: Sequence[int], runs: int) -> dict:
  from tas_jax import latency
  out = {}
  for bs in batch_sizes:
    m = latency.measure_latency(shape, int(bs), int(runs))
    out[str(bs)] = {"median_ms": m["median_ms"], "images_per_s": m["images_per_s"], "device": m["device"]}
  return out


def run(shape_spec: str, teacher: str, seeds: int, workdir: str, *, recipe: str = "official",
        inherit: str | None = None, overrides: Sequence[str] = (), variants: Sequence[str] | None = None,
        label: str | None = None, latency_batch_sizes: Sequence[int] = (1, 256), latency_runs: int = 10,
        train_fn: Callable = train.run) -> dict:
  """Trains every variant with ``seeds`` seeds (resumably) and writes ``protocol.json`` and ``protocol.md``.

  ``variants`` (None or empty: the default) defaults to all of
  :data:`VARIANTS`, ``finetune`` only with ``inherit``. ``overrides`` are ``KEY=VALUE`` training config items applied
  to every run. An empty ``latency_batch_sizes`` skips the latency
  measurement. Returns the summary written to ``protocol.json``.
  """
  if seeds < 1:
    raise ProtocolError(f"--seeds must be at least 1, got {seeds}")
  if not variants:
    variants = [v for v in VARIANTS if v != "finetune" or inherit]
  for v in variants:
    if v not in VARIANTS:
      raise ProtocolError(f"unknown variant {v!r}; use some of {', '.join(VARIANTS)}")
  if "finetune" in variants and not inherit:
    raise ProtocolError("the finetune variant needs --inherit: a base run, or the weights written by "
                        "experiments.prune")
  if "kd" in variants:
    if not os.path.isdir(teacher or ""):
      raise ProtocolError(f"teacher run {teacher!r} does not exist")
    if not os.path.isfile(os.path.join(teacher, "result.json")):
      raise ProtocolError(f"teacher run {teacher} has not finished (no result.json)")
  init_from = inherit_source(inherit) if inherit else ""
  try:
    shape = shapes.resolve(shape_spec)
  except shapes.ShapeError as e:
    raise ProtocolError(str(e)) from None
  label = label or label_for(shape_spec, shape=shape)
  family = family_preset(shape)
  shape_path = os.path.join(workdir, SHAPE_FILE)
  for v in variants:  # fail on a bad recipe or override before writing anything
    variant_config(v, 0, shape_path=shape_path, recipe=recipe, family=family, teacher=teacher, init_from=init_from,
                   overrides=overrides)
  _store_shape(shape_spec, workdir, label)
  for v in variants:
    for seed in range(seeds):
      run_dir = os.path.join(workdir, v, f"seed{seed}")
      if os.path.isfile(os.path.join(run_dir, "result.json")):
        log.info("%s seed %d: finished already", v, seed)
        continue
      log.info("%s seed %d: training in %s", v, seed, run_dir)
      config = variant_config(v, seed, shape_path=shape_path, recipe=recipe, family=family, teacher=teacher,
                              init_from=init_from, overrides=overrides)
      train_fn(config, run_dir)
  lat = _latency(shape, latency_batch_sizes, latency_runs) if latency_batch_sizes else {}
  teacher_lat = {}
  teacher_result = read_json(os.path.join(teacher, "result.json")) if teacher else {}
  if teacher_result and latency_batch_sizes:
    try:
      teacher_shape = shapes.from_dict(teacher_result["shape"], "the teacher's result.json")
    except (KeyError, shapes.ShapeError):
      teacher_shape = shapes.full_shape(shape)
    teacher_lat = _latency(teacher_shape, latency_batch_sizes, latency_runs)
  summary = summarize(workdir, variants, seeds, label=label, shape_spec=shape_spec, recipe=recipe, teacher=teacher,
                      inherit=init_from, latency=lat, teacher_latency=teacher_lat)
  write_reports(workdir, summary)
  return summary


def summarize(workdir: str, variants: Sequence[str], seeds: int, *, label: str, shape_spec: str, recipe: str,
              teacher: str = "", inherit: str = "", latency: dict | None = None,
              teacher_latency: dict | None = None) -> dict:
  """The protocol's results from the run directories under ``workdir``."""
  shape = shapes.load(os.path.join(workdir, SHAPE_FILE))
  c = cost_lib.count(shape)
  full = cost_lib.count(shapes.full_shape(shape))
  out = {"label": label, "shape_spec": shape_spec, "shape": shape.to_dict(), "recipe": recipe, "seeds": seeds,
         "teacher": teacher, "inherit": inherit, "macs": c.macs, "params": c.params,
         "flops_ratio": c.macs / full.macs, "unpruned_macs": full.macs, "latency": latency or {}, "variants": {}}
  for v in variants:
    results, dirs = [], []
    for seed in range(seeds):
      run_dir = os.path.join(workdir, v, f"seed{seed}")
      r = read_json(os.path.join(run_dir, "result.json"))
      if r.get("finished", True) and "test_top1" in r:
        results.append(r)
        dirs.append(run_dir)
    entry = aggregate(results) if results else {"n": 0}
    entry.update(variant=v, dirs=dirs, planned=seeds, latency=latency or {})
    out["variants"][v] = entry
    if results:
      out["dataset"] = results[0].get("dataset")
  if teacher:
    t = read_json(os.path.join(teacher, "result.json"))
    if t:
      out["teacher_result"] = {"test_top1": t.get("test_top1"), "test_top5": t.get("test_top5"),
                               "macs": t.get("macs"), "params": t.get("params"), "epochs": t.get("epochs"),
                               "recipe": t.get("recipe"), "latency": teacher_latency or {}}
  return out


def _pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _pm(mean, std, n) -> str:
  if not n:
    return "–"
  return f"{_pct(mean)} ± {100 * std:.2f}" if n > 1 else _pct(mean)


def _ms(lat: dict, bs: str) -> str:
  return f"{lat[bs]['median_ms']:.3f}" if bs in (lat or {}) else "–"


def protocol_markdown(summary: dict) -> str:
  """``protocol.md``: one row per variant (and the teacher), accuracy mean ± sample std over seeds."""
  lat_keys = list(summary.get("latency") or {})
  shape = shapes.from_dict(summary["shape"])
  lines = [f"# Rethinking protocol: {summary['label']} shape `{summary['shape_spec']}`", "",
           f"* shape: MACs {summary['macs']:,} ({summary['flops_ratio']:.4f} of the unpruned {summary['unpruned_macs']:,}),"
           f" params {summary['params']:,}, blocks {list(shape.blocks)}",
           f"* recipe `{summary['recipe']}`, {summary['seeds']} seed(s) per variant, dataset "
           f"`{summary.get('dataset', '?')}`; accuracy is the final epoch's test top-1/top-5 in %, "
           "mean ± sample standard deviation over seeds"]
  if summary.get("teacher"):
    lines.append(f"* teacher: `{summary['teacher']}`")
  if summary.get("inherit"):
    lines.append(f"* fine-tuning starts from `{summary['inherit']}`")
  if lat_keys:
    device = next(iter(summary["latency"].values()))["device"]
    lines.append(f"* latency: median eval-mode forward time on {device}, per batch size")
  lines.append("")
  head = ["variant", "mode", "budget", "seeds", "top-1 (%)", "top-5 (%)", "epochs", "MACs", "params"]
  head += [f"latency b{k} (ms)" for k in lat_keys] + ["recipe"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for v, e in summary["variants"].items():
    n = e.get("n", 0)
    row = [TITLES.get(v, v), *_MODE_BUDGET.get(v, ("?", "?")), f"{n}/{e['planned']}",
           _pm(e.get("test_top1_mean"), e.get("test_top1_std"), n), _pm(e.get("test_top5_mean"),
                                                                        e.get("test_top5_std"), n),
           str(e.get("epochs", "–")), f"{summary['macs']:,}", f"{summary['params']:,}"]
    row += [_ms(summary["latency"], k) for k in lat_keys] + [str(e.get("recipe") or summary["recipe"])]
    lines.append("| " + " | ".join(row) + " |")
  t = summary.get("teacher_result")
  if t:
    row = ["unpruned (teacher)", "base", "epochs", "1", _pct(t.get("test_top1")), _pct(t.get("test_top5")),
           str(t.get("epochs", "–")), f"{t.get('macs', 0):,}", f"{t.get('params', 0):,}"]
    row += [_ms(t.get("latency") or {}, k) for k in lat_keys] + [str(t.get("recipe", ""))]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write_reports(workdir: str, summary: dict) -> None:
  engine.write_json(os.path.join(workdir, JSON_FILE), summary)
  engine.write_text(os.path.join(workdir, MD_FILE), protocol_markdown(summary))


# ----------------------------------------------------------------------------- comparing finished runs

@dataclasses.dataclass
class Row:
  """One line of a comparison: one run, or the seeds of one variant of a protocol."""

  label: str
  variant: str
  n: int
  top1_mean: float
  top1_std: float
  top5_mean: float
  macs: int
  params: int
  ratio: float
  epochs: object
  recipe: str
  source: str
  top1: list = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _row(label: str, variant: str, results: Sequence[dict], source: str) -> Row:
  a = aggregate(results)
  return Row(label, variant, a["n"], a["test_top1_mean"], a["test_top1_std"], a["test_top5_mean"], a["macs"],
             a["params"], a["flops_ratio"], a["epochs"], a["recipe"] or "", source, a["test_top1"])


def _run_label(result: dict, run_dir: str) -> str:
  if result.get("mode") == "base":
    return "unpruned"
  if result.get("mode") == "sparsity":
    return "slimming"
  shape = None
  if isinstance(result.get("shape"), dict):
    try:
      shape = shapes.from_dict(result["shape"])
    except shapes.ShapeError:
      shape = None
  return label_for(result.get("shape_spec"), os.path.basename(os.path.normpath(run_dir)), shape)


def collect(paths: Sequence[str]) -> list[Row]:
  """Rows for training run directories (``result.json``), directories of seed runs, and protocol directories.

  A run directory gives one row; a directory of ``seed*/`` runs one row with
  their mean ± std; a protocol directory one row per variant.
  """
  rows = []
  for path in paths:
    proto = read_json(os.path.join(path, JSON_FILE))
    result = read_json(os.path.join(path, "result.json"))
    seed_runs = sorted(glob.glob(os.path.join(path, "seed*", "result.json")))
    if proto:
      found = proto.get("variants", {})
      for v in sorted(found, key=lambda v: VARIANTS.index(v) if v in VARIANTS else len(VARIANTS)):
        # The protocol's own directory, not the paths it recorded: those are relative to where it ran.
        results = [read_json(p) for p in sorted(glob.glob(os.path.join(path, v, "seed*", "result.json")))]
        results = [r for r in results if "test_top1" in r and r.get("finished", True)]
        if results:
          rows.append(_row(proto.get("label", ""), v, results, os.path.join(path, v)))
    elif result:
      if "test_top1" not in result or not result.get("finished", True):
        raise ProtocolError(f"{path} has not finished (its result.json has no test accuracy)")
      rows.append(_row(_run_label(result, path), variant_of(result), [result], path))
    elif seed_runs:
      results = [read_json(p) for p in seed_runs]
      results = [r for r in results if "test_top1" in r]
      parent = read_json(os.path.join(os.path.dirname(os.path.normpath(path)), JSON_FILE))
      label = parent.get("label") or _run_label(results[0], path)
      rows.append(_row(label, variant_of(results[0]), results, path))
    else:
      raise ProtocolError(f"{path} is neither a finished training run (result.json), a directory of seed runs, "
                          f"nor a protocol directory ({JSON_FILE})")
  return rows


def markdown(rows: Sequence[Row]) -> str:
  """The comparison table: accuracy (mean ± std over seeds) beside MACs, params and the MAC ratio."""
  head = ["label", "variant", "runs", "top-1 (%)", "top-5 (%)", "MACs", "params", "ratio", "epochs", "recipe",
          "source"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r.label, TITLES.get(r.variant, r.variant), str(r.n), _pm(r.top1_mean, r.top1_std, r.n),
             _pct(r.top5_mean), f"{r.macs:,}", f"{r.params:,}", f"{r.ratio:.4f}", str(r.epochs), r.recipe,
             f"`{r.source}`"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
