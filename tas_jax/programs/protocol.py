"""The Rethinking protocol around one pruned shape, and the tables that compare finished runs.

For one shape (searched by TAS, or from a pruning baseline) :func:`run`
trains, with one recipe and N seeds each (METHOD.md §7.2,
§7.3):

* ``kd``: TAS's student, distilled from a trained unpruned teacher (METHOD.md §6.3);
* ``scratch-e``: random init, cross-entropy, the recipe's epochs (Scratch-E;
  also TAS's no-KD baseline);
* ``scratch-b``: the same with the epochs stretched by MACs(unpruned) /
  MACs(shape) (Scratch-B, :func:`tas_jax.steps.train.make_plan`);
* ``finetune``: inherited weights (a base run, sliced first-c by
  :func:`tas_jax.nets.surgery.inherit`; or the weights ``tas_jax.cli.prune`` kept by
  L1 norm or batch-norm scale) trained with the recipe's fine-tuning schedule.

Each run lives in ``DIR/<variant>/seed<k>`` and is a plain
:func:`tas_jax.programs.train.run`: a finished run (its ``result.json`` exists) is not
trained again, an unfinished one resumes. ``DIR/protocol.json`` and
``DIR/protocol.md`` report, per variant, the mean and sample standard
deviation (ddof 1) of the final-epoch test top-1 and top-5, MACs, params,
epochs, recipe and the measured inference latency of the shape
(:func:`tas_jax.latency.measure.measure_latency`; every variant trains the same
shape, so the latency is measured once and shown on every row, beside the
teacher's).

:func:`collect` reads finished training runs and protocol directories into
rows for :func:`markdown` (``tas_jax.cli.compare``), each labelled by the
method that produced its shape (the ``pruning`` record of a shape written by
``tas_jax.cli.prune``, a TAS preset or search run, the unpruned network, else
the shape file's or directory's name).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, Iterable, Sequence

from tas_jax import baselines
from tas_jax.configs import train as train_configs
from tas_jax.latency import measure as latency
from tas_jax.core import cost as cost_lib
from tas_jax.runtime import files, lock
from tas_jax.report.tables import (JSON_FILE, MODE_BUDGET, VARIANTS, ProtocolError, aggregate, label_for,
                                   protocol_markdown)
from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.programs import train
from tas_jax.runtime import models
from tas_jax.runtime.settings import SettingsError, TrainSettings

log = logging.getLogger("tas_jax")

# Keys the protocol sets itself for every run; overriding them would mix the variants up.
PROTECTED = ("mode", "shape", "teacher", "init_from", "budget", "seed", "recipe")
SHAPE_FILE = "shape.json"
MD_FILE = "protocol.md"


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
    raise ProtocolError(f"no inherited weights beside {path} (expected {weights}/, written by tas_jax.cli.prune "
                        "--method l1|slimming)")
  if not os.path.isdir(path):
    raise ProtocolError(f"--inherit {path} does not exist")
  if os.path.isfile(os.path.join(path, "shape.json")) or os.path.isdir(os.path.join(path, models.MODEL_DIR)):
    return path
  raise ProtocolError(f"{path} holds no trained network (model/ of a finished training or search run, or "
                      "shape.json + params/)")


def variant_config(variant: str, seed: int, *, shape_path: str, recipe: str, family: str, teacher: str = "",
                   init_from: str = "", overrides: Iterable[str] = ()):
  """The training config of one run of the protocol."""
  mode, budget = MODE_BUDGET[variant]
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


# ----------------------------------------------------------------------------- the protocol

def _store_shape(spec: str, workdir: str, label: str) -> None:
  """Keeps the shape in the protocol directory, so every run (and every rerun) names the same file."""
  shape = shape_files.resolve(spec)
  path = os.path.join(workdir, SHAPE_FILE)
  if os.path.isfile(path):
    if shape_files.load(path) != shape:
      raise ProtocolError(f"{workdir} holds a protocol for another shape ({path}); use another --workdir")
    return
  os.makedirs(workdir, exist_ok=True)
  info = baselines.pruning_info(spec) if os.path.isfile(spec) else {}
  baselines.save(shape, path, info or None, label=label)


def _latency(shape: shapes.Shape, batch_sizes: Sequence[int], runs: int) -> dict:
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
  variants = _checked_variants(seeds, variants, inherit, teacher)
  init_from = inherit_source(inherit) if inherit else ""
  try:
    shape = shape_files.resolve(shape_spec)
  except shapes.ShapeError as e:
    raise ProtocolError(str(e)) from None
  label = label or label_for(shape_spec, shape=shape)
  family = family_preset(shape)
  shape_path = os.path.join(workdir, SHAPE_FILE)
  # Every run's settings resolved and checked (a bad recipe, key or value) before anything is written.
  planned = {(v, seed): _settings(variant_config(v, seed, shape_path=shape_path, recipe=recipe, family=family,
                                              teacher=teacher, init_from=init_from, overrides=overrides))
          for v in variants for seed in range(seeds)}
  with lock.locked(workdir):
    _store_shape(shape_spec, workdir, label)
    for (v, seed), cfg in planned.items():
      run_dir = os.path.join(workdir, v, f"seed{seed}")
      if os.path.isfile(os.path.join(run_dir, "result.json")):
        log.info("%s seed %d: finished already", v, seed)
        continue
      log.info("%s seed %d: training in %s", v, seed, run_dir)
      train_fn(cfg, run_dir)
    lat = _latency(shape, latency_batch_sizes, latency_runs) if latency_batch_sizes else {}
    teacher_lat = _teacher_latency(teacher, shape, latency_batch_sizes, latency_runs)
    summary = summarize(workdir, variants, seeds, label=label, shape_spec=shape_spec, recipe=recipe, teacher=teacher,
                        inherit=init_from, latency=lat, teacher_latency=teacher_lat)
    write_reports(workdir, summary)
  return summary



def _settings(config) -> TrainSettings:
  try:
    return TrainSettings.resolve(config)
  except SettingsError as e:
    raise ProtocolError(str(e)) from None


def _checked_variants(seeds: int, variants: Sequence[str] | None, inherit: str | None, teacher: str) -> list[str]:
  """The variants to train (all that apply when none are named), refused with one line when they cannot run."""
  if seeds < 1:
    raise ProtocolError(f"--seeds must be at least 1, got {seeds}")
  if not variants:
    variants = [v for v in VARIANTS if v != "finetune" or inherit]
  for v in variants:
    if v not in VARIANTS:
      raise ProtocolError(f"unknown variant {v!r}; use some of {', '.join(VARIANTS)}")
  if "finetune" in variants and not inherit:
    raise ProtocolError("the finetune variant needs --inherit: a base run, or the weights written by "
                        "tas_jax.cli.prune")
  if "kd" in variants:
    if not os.path.isdir(teacher or ""):
      raise ProtocolError(f"teacher run {teacher!r} does not exist")
    if not os.path.isfile(os.path.join(teacher, "result.json")):
      raise ProtocolError(f"teacher run {teacher} has not finished (no result.json)")
  return list(variants)


def _teacher_latency(teacher: str, shape: shapes.Shape, batch_sizes: Sequence[int], runs: int) -> dict:
  """The unpruned network's latency beside the pruned one's (its shape from the teacher's record)."""
  teacher_result = files.read_json(os.path.join(teacher, "result.json")) if teacher else {}
  if not (teacher_result and batch_sizes):
    return {}
  try:
    teacher_shape = shape_files.from_dict(teacher_result["shape"], "the teacher's result.json")
  except (KeyError, shapes.ShapeError):
    teacher_shape = shapes.full_shape(shape)
  return _latency(teacher_shape, batch_sizes, runs)

def summarize(workdir: str, variants: Sequence[str], seeds: int, *, label: str, shape_spec: str, recipe: str,
              teacher: str = "", inherit: str = "", latency: dict | None = None,
              teacher_latency: dict | None = None) -> dict:
  """The protocol's results from the run directories under ``workdir``."""
  shape = shape_files.load(os.path.join(workdir, SHAPE_FILE))
  c = cost_lib.count(shape)
  full = cost_lib.count(shapes.full_shape(shape))
  out = {"label": label, "shape_spec": shape_spec, "shape": shape.to_dict(), "recipe": recipe, "seeds": seeds,
         "teacher": teacher, "inherit": inherit, "macs": c.macs, "params": c.params,
         "flops_ratio": c.macs / full.macs, "unpruned_macs": full.macs, "latency": latency or {}, "variants": {}}
  for v in variants:
    results, dirs = [], []
    for seed in range(seeds):
      run_dir = os.path.join(workdir, v, f"seed{seed}")
      r = files.read_json(os.path.join(run_dir, "result.json"))
      if r.get("finished", True) and "test_top1" in r:
        results.append(r)
        dirs.append(run_dir)
    entry = aggregate(results) if results else {"n": 0}
    entry.update(variant=v, dirs=dirs, planned=seeds, latency=latency or {})
    out["variants"][v] = entry
    if results:
      out["dataset"] = results[0].get("dataset")
  if teacher:
    t = files.read_json(os.path.join(teacher, "result.json"))
    if t:
      out["teacher_result"] = {"test_top1": t.get("test_top1"), "test_top5": t.get("test_top5"),
                               "macs": t.get("macs"), "params": t.get("params"), "epochs": t.get("epochs"),
                               "recipe": t.get("recipe"), "latency": teacher_latency or {}}
  return out


def write_reports(workdir: str, summary: dict) -> None:
  files.write_json(os.path.join(workdir, JSON_FILE), summary)
  files.write_text(os.path.join(workdir, MD_FILE), protocol_markdown(summary))


# ----------------------------------------------------------------------------- comparing finished runs


