"""The data behind each figure and table of a report, read from a pipeline directory.

Each function returns plain numbers so that what a figure shows can be
checked without looking at it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from tas_jax.nets import supernet
from tas_jax.runtime import metrics as metrics_lib
from tas_jax.runtime import stages as pipeline_lib
from tas_jax.core import shapes as shapes_lib
from tas_jax.core import space as space_lib
from tas_jax.core import shape_files


def read_json(path: str) -> dict | None:
  return pipeline_lib.read_json(path)


def load_shape(path: str) -> shapes_lib.Shape | None:
  try:
    return shape_files.load(path) if os.path.isfile(path) else None
  except shapes_lib.ShapeError:
    return None


def read_jsonl(path: str) -> list[dict]:
  return metrics_lib.read_metrics(path) if os.path.isfile(path) else []


def stage_result(workdir: str, stage: str) -> dict | None:
  result = read_json(os.path.join(workdir, stage, "result.json"))
  return result if result and result.get("finished", True) else None


def network_name(shape: shapes_lib.Shape) -> str:
  prefix = "ResNet" if shape.arch == "cifar" else "ImageNet ResNet"
  return f"{prefix}-{shape.depth}"


def width_data(shape: shapes_lib.Shape) -> dict:
  """The per-conv data of the width figure.

  Returns a dict of lists indexed by conv (``shape.widths`` order: the stem,
  then every conv of every block, dropped blocks included): ``nominal`` (the
  unpruned width), ``searched`` (the searched width, as recorded in the shape
  also for dropped blocks), ``kept`` (False for the convs of dropped blocks),
  ``stage`` (-1 for the stem) and ``block``; plus ``stage_spans``, the
  ``[first, last]`` conv index of every stage.
  """
  lay = shape.layout
  n = len(shape.widths)
  stage, block, kept = [-1] * n, [-1] * n, [True] * n
  for b in lay.blocks:
    for i in b.convs:
      stage[i], block[i], kept[i] = b.stage, b.index, b.index < shape.blocks[b.stage]
  spans = []
  for s in range(len(shape.layers)):
    idx = [i for i in range(n) if stage[i] == s]
    spans.append([min(idx), max(idx)])
  return {"index": list(range(n)), "nominal": list(shape.nominal), "searched": list(shape.widths), "kept": kept,
          "stage": stage, "block": block, "stage_spans": spans}


def depth_data(shape: shapes_lib.Shape) -> dict:
  """Blocks kept per stage (``kept``) against the blocks of the unpruned network (``available``)."""
  return {"stage": list(range(1, len(shape.layers) + 1)), "kept": list(shape.blocks), "available": list(shape.layers),
          "choices": [list(c) for c in space_lib.depth_choices(shape.arch, shape.layers)]}


def search_curves(records: Sequence[Mapping[str, Any]], result: Mapping[str, Any] | None = None) -> dict:
  """The flops ratios and temperature over a search, from its ``metrics.jsonl`` records.

  Returns ``epoch`` (x of the logged steps, in epochs: step / steps per
  epoch), ``flops_ratio`` (MACs ratio of the argmax shape, as the cost loss
  sees it), ``expected_flops_ratio`` (the expected MACs under the width and
  depth distributions), ``tau``; per epoch ``epoch_end`` (its end, in epochs)
  and ``flops_ratio_exact`` (the argmax shape's exact MACs ratio); and from
  ``result``: ``band`` (the target band, as MACs ratios), ``target`` and
  ``final`` (the ratio of the shape the search returned).
  """
  steps = {int(r["step"]): r for r in records if "weight_loss" in r and "flops_ratio" in r}
  epochs = {int(r["epoch"]): r for r in records if "flops_ratio_exact" in r}
  result = dict(result or {})
  spe = None
  if result.get("steps") and result.get("epochs"):
    spe = result["steps"] / result["epochs"]
  elif epochs:
    e, r = min(epochs.items())
    spe = int(r["step"]) / (e + 1)
  spe = spe or 1.0
  order = sorted(steps)
  return {"epoch": [s / spe for s in order], "flops_ratio": [float(steps[s]["flops_ratio"]) for s in order],
          "expected_flops_ratio": [float(steps[s]["expected_flops_ratio"]) for s in order],
          "tau": [float(steps[s]["tau"]) for s in order], "epoch_end": [e + 1 for e in sorted(epochs)],
          "flops_ratio_exact": [float(epochs[e]["flops_ratio_exact"]) for e in sorted(epochs)],
          "epoch_tau": [float(epochs[e].get("tau", math.nan)) for e in sorted(epochs)],
          "band": list(result.get("band_ratio") or []), "target": result.get("target_flops_ratio"),
          "final": result.get("flops_ratio"), "steps_per_epoch": spe}


def search_space_of(search_dir: str, shape: shapes_lib.Shape) -> space_lib.SearchSpace:
  """The candidates a finished search chose from, rebuilt from its ``config.json``."""
  config = read_json(os.path.join(search_dir, "config.json")) or {}
  sc = supernet.SupernetConfig(mode=config.get("mode", "shape"), width_multiple=int(config.get("width_multiple", 1)))
  return supernet.make_space(shapes_lib.full_shape(shape), sc)


def arch_prob_data(records: Sequence[Mapping[str, Any]], space: space_lib.SearchSpace) -> dict:
  """The architecture distributions over the epochs of a search, from its ``arch_probs.jsonl``.

  Returns ``epochs``; ``width_ratio`` ``[E][L]``, the expected width of every
  conv under its distribution divided by its unpruned width; ``argmax_ratio``
  ``[E][L]``, the most likely candidate's ratio; ``depth`` ``[E][C]``, the
  probability of every depth choice of every stage, flattened over stages, with
  ``depth_labels`` (stage, blocks) and ``depth_stage`` per column.
  """
  table = np.asarray(space.width_table, np.float64)
  mask = np.asarray(space.width_mask, bool)
  nominal = np.asarray(space.base.nominal, np.float64)[:, None]
  by_epoch = {int(r["epoch"]): r for r in records if "width" in r and "depth" in r}
  epochs = sorted(by_epoch)
  width_ratio, argmax_ratio, depth = [], [], []
  labels, stage_of = [], []
  for s, (row, ok) in enumerate(zip(space.depth_table, space.depth_mask)):
    for v, m in zip(row, ok):
      if m:
        labels.append((s + 1, int(v)))
        stage_of.append(s + 1)
  for e in epochs:
    w = np.asarray(by_epoch[e]["width"], np.float64)
    d = np.asarray(by_epoch[e]["depth"], np.float64)
    if w.shape != table.shape or d.shape != space.depth_table.shape:
      raise ValueError(f"arch_probs epoch {e}: width {w.shape} / depth {d.shape} probabilities do not fit the "
                       f"search space ({table.shape} / {space.depth_table.shape})")
    w = np.where(mask, w, 0.0)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    width_ratio.append(((w * table).sum(1) / nominal[:, 0]).tolist())
    argmax_ratio.append((table[np.arange(len(table)), np.argmax(np.where(mask, w, -1.0), 1)] / nominal[:, 0]).tolist())
    depth.append([float(d[s, j]) for s, row in enumerate(space.depth_mask) for j, m in enumerate(row) if m])
  return {"epochs": epochs, "width_ratio": width_ratio, "argmax_ratio": argmax_ratio, "depth": depth,
          "depth_labels": labels, "depth_stage": stage_of}


def training_curves(records: Sequence[Mapping[str, Any]]) -> dict:
  """Per-epoch cross-entropy and training accuracy of a training run, and its logged test accuracies."""
  epochs = {int(r["epoch"]): r for r in records if "epoch_ce" in r}
  tests = {int(r["epoch"]): r for r in records if "test_top1" in r and "epoch" in r}
  order = sorted(epochs)
  return {"epoch": [e + 1 for e in order], "ce": [float(epochs[e]["epoch_ce"]) for e in order],
          "train_acc": [float(epochs[e].get("epoch_train_acc", math.nan)) for e in order],
          "test_epoch": [e + 1 for e in sorted(tests)],
          "test_top1": [float(tests[e]["test_top1"]) for e in sorted(tests)]}


VARIANT_TITLES = {"kd": "TAS-KD", "scratch-e": "Scratch-E", "scratch-b": "Scratch-B", "finetune": "fine-tuned"}


def protocol_variants(summary: Mapping[str, Any] | None) -> list[dict]:
  """The finished variants of a ``protocol.json``.

  Returns ``{"name", "title", "n", "top1", "top1_std", "top5", "macs",
  "params", "epochs"}`` per variant with at least one finished seed, in the
  protocol's order; ``top1_std`` (over seeds) is None for a single seed.
  """
  out = []
  variants = (summary or {}).get("variants") or {}
  order = list(VARIANT_TITLES) + sorted(set(variants) - set(VARIANT_TITLES))
  for name in order:
    v = variants.get(name)
    if not isinstance(v, Mapping) or not v.get("n"):
      continue
    n = int(v["n"])
    std = float(v.get("test_top1_std") or 0.0) if n > 1 else None
    out.append({"name": name, "title": VARIANT_TITLES.get(name, name), "n": n, "top1": float(v["test_top1_mean"]),
                "top1_std": std, "top5": v.get("test_top5_mean"), "macs": v.get("macs", summary.get("macs")),
                "params": v.get("params", summary.get("params")), "epochs": v.get("epochs")})
  return out


def latency_rows(summary: Mapping[str, Any] | None) -> list[dict]:
  """The protocol's latency measurements: searched shape and unpruned teacher per batch size."""
  summary = summary or {}
  shape_lat = summary.get("latency") or {}
  teacher_lat = (summary.get("teacher_result") or {}).get("latency") or {}
  rows = []
  for bs, m in shape_lat.items():
    t = teacher_lat.get(bs) or {}
    rows.append({"batch_size": int(bs), "device": m.get("device", ""), "searched_ms": m.get("median_ms"),
                 "unpruned_ms": t.get("median_ms")})
  return sorted(rows, key=lambda r: r["batch_size"])


def accuracy_points(workdir: str) -> list[dict]:
  """Every trained variant as ``{"label", "kind", "macs", "params", "top1", "top1_std"}`` (top-1 a fraction)."""
  points = []
  for stage, label, kind in (("base", "unpruned (base)", "base"), ("kd", "searched + KD (kd)", "kd")):
    r = stage_result(workdir, stage)
    if r and r.get("test_top1") is not None:
      points.append({"label": label, "kind": kind, "macs": r["macs"], "params": r.get("params"),
                     "top1": float(r["test_top1"]), "top1_std": None})
  for v in protocol_variants(read_json(os.path.join(workdir, "protocol", "protocol.json"))):
    if v["macs"] is not None:
      seeds = f", {v['n']} seeds" if v["n"] > 1 else ""
      points.append({"label": f"{v['title']} (protocol{seeds})", "kind": "baseline", "macs": v["macs"],
                     "params": v["params"], "top1": v["top1"], "top1_std": v["top1_std"]})
  return points
