"""Comparison tables of finished runs: rows of accuracy (mean ± std over seeds), MACs, parameters and MAC ratio."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Sequence

from tas_jax import baselines
from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.runtime import files


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
  shape = shape_files.from_dict(summary["shape"])
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
    row = [TITLES.get(v, v), *MODE_BUDGET.get(v, ("?", "?")), f"{n}/{e['planned']}",
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
      shape = shape_files.from_dict(result["shape"])
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
    proto = files.read_json(os.path.join(path, JSON_FILE))
    result = files.read_json(os.path.join(path, "result.json"))
    seed_runs = sorted(glob.glob(os.path.join(path, "seed*", "result.json")))
    if proto:
      found = proto.get("variants", {})
      for v in sorted(found, key=lambda v: VARIANTS.index(v) if v in VARIANTS else len(VARIANTS)):
        # The protocol's own directory, not the paths it recorded: those are relative to where it ran.
        results = [files.read_json(p) for p in sorted(glob.glob(os.path.join(path, v, "seed*", "result.json")))]
        results = [r for r in results if "test_top1" in r and r.get("finished", True)]
        if results:
          rows.append(_row(proto.get("label", ""), v, results, os.path.join(path, v)))
    elif result:
      if "test_top1" not in result or not result.get("finished", True):
        raise ProtocolError(f"{path} has not finished (its result.json has no test accuracy)")
      rows.append(_row(_run_label(result, path), variant_of(result), [result], path))
    elif seed_runs:
      results = [files.read_json(p) for p in seed_runs]
      results = [r for r in results if "test_top1" in r]
      parent = files.read_json(os.path.join(os.path.dirname(os.path.normpath(path)), JSON_FILE))
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


VARIANTS = ("kd", "scratch-e", "scratch-b", "finetune")


MODE_BUDGET = {"kd": ("kd", "epochs"), "scratch-e": ("scratch", "epochs"), "scratch-b": ("scratch", "flops"),
                "finetune": ("finetune", "epochs")}


TITLES = {"kd": "TAS-KD", "scratch-e": "Scratch-E", "scratch-b": "Scratch-B", "finetune": "Fine-tuned",
          "base": "unpruned", "sparsity": "sparsity-trained"}


JSON_FILE = "protocol.json"


class ProtocolError(ValueError):
  """A protocol or comparison request that cannot be carried out; the message says why."""


def label_for(spec: str | None, fallback: str = "", shape: shapes.Shape | None = None) -> str:
  """The method behind a shape spec: the pruning record's method, ``searched``, ``unpruned``, else a name."""
  spec = spec or ""
  if spec and os.path.isfile(spec):
    method = baselines.pruning_info(spec).get("method")
    if method:
      return str(method)
    label = files.read_json(spec).get("label")
    if label:
      return str(label)
    search_config = files.read_json(os.path.join(os.path.dirname(spec), "config.json"))
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
