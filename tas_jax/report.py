"""A pipeline's report: ``report.md`` with figures of the searched shape, the search and the accuracies.

  python -m tas_jax.report runs/demo        # (re)writes runs/demo/report.md and runs/demo/figures/

:func:`write_report` reads what the stages left in a pipeline directory (see
:mod:`tas_jax.pipeline`) and writes the markdown and PNG figures. The data
behind every figure comes from a function of its own (:func:`width_data`,
:func:`depth_data`, :func:`search_curves`, :func:`arch_prob_data`,
:func:`training_curves`, :func:`accuracy_points`) so that what a figure shows
can be checked without looking at it; the ``plot_*`` functions only draw.
Figures whose stage has not finished are left out, and the markdown says so.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from tas_jax import cost as cost_lib
from tas_jax import metrics as metrics_lib
from tas_jax import pipeline as pipeline_lib
from tas_jax import shapes as shapes_lib

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"

# One colour per role, the same in every figure.
UNPRUNED = "#c6dbef"
SEARCHED = "#08519c"
DROPPED = "#bdbdbd"
EXPECTED = "#fd8d3c"
BAND = "#a1d99b"
BASE_COLOUR = "#252525"
KD_COLOUR = "#d62728"
BASELINE_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


# ----------------------------------------------------------------------------- reading a pipeline directory

def _read_json(path: str) -> dict | None:
  return pipeline_lib.read_json(path)


def _load_shape(path: str) -> shapes_lib.Shape | None:
  try:
    return shapes_lib.load(path) if os.path.isfile(path) else None
  except shapes_lib.ShapeError:
    return None


def _read_jsonl(path: str) -> list[dict]:
  return metrics_lib.read_metrics(path) if os.path.isfile(path) else []


def _stage_result(workdir: str, stage: str) -> dict | None:
  result = _read_json(os.path.join(workdir, stage, "result.json"))
  return result if result and result.get("finished", True) else None


def _network_name(shape: shapes_lib.Shape) -> str:
  prefix = "ResNet" if shape.arch == "cifar" else "ImageNet ResNet"
  return f"{prefix}-{shape.depth}"


# ----------------------------------------------------------------------------- figure data

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
          "choices": [list(c) for c in shapes_lib.depth_choices(shape.arch, shape.layers)]}


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


def search_space_of(search_dir: str, shape: shapes_lib.Shape) -> shapes_lib.SearchSpace:
  """The candidates a finished search chose from, rebuilt from its ``config.json``."""
  from tas_jax import supernet  # pylint: disable=g-import-not-at-top
  config = _read_json(os.path.join(search_dir, "config.json")) or {}
  sc = supernet.SupernetConfig(mode=config.get("mode", "shape"), width_multiple=int(config.get("width_multiple", 1)))
  return supernet.make_space(shapes_lib.full_shape(shape), sc)


def arch_prob_data(records: Sequence[Mapping[str, Any]], space: shapes_lib.SearchSpace) -> dict:
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


# Names of the protocol's variants (tas_jax.protocol.VARIANTS) in tables and legends.
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
    r = _stage_result(workdir, stage)
    if r and r.get("test_top1") is not None:
      points.append({"label": label, "kind": kind, "macs": r["macs"], "params": r.get("params"),
                     "top1": float(r["test_top1"]), "top1_std": None})
  for v in protocol_variants(_read_json(os.path.join(workdir, "protocol", "protocol.json"))):
    if v["macs"] is not None:
      seeds = f", {v['n']} seeds" if v["n"] > 1 else ""
      points.append({"label": f"{v['title']} (protocol{seeds})", "kind": "baseline", "macs": v["macs"],
                     "params": v["params"], "top1": v["top1"], "top1_std": v["top1_std"]})
  return points


# ----------------------------------------------------------------------------- drawing

def _figure(width: float, height: float, **kw):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=110, **kw)
  return fig


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, bbox_inches="tight")
  os.replace(tmp, path)
  return path


def plot_widths(data: Mapping[str, Any], path: str, title: str = "") -> str:
  """Unpruned widths as light bars, searched widths dark, dropped blocks hatched grey, stages marked."""
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  n = len(data["index"])
  fig = _figure(max(7.0, 0.28 * n + 2.0), 3.8)
  ax = fig.add_subplot()
  x = np.asarray(data["index"])
  nominal = np.asarray(data["nominal"])
  searched = np.asarray(data["searched"])
  kept = np.asarray(data["kept"], bool)
  ax.bar(x, nominal, width=0.8, color=UNPRUNED, edgecolor="none", zorder=1)
  ax.bar(x[kept], searched[kept], width=0.56, color=SEARCHED, zorder=2)
  if (~kept).any():
    ax.bar(x[~kept], nominal[~kept], width=0.8, color=DROPPED, hatch="///", edgecolor="white", linewidth=0,
           zorder=2)
  top = nominal.max() * 1.16
  ax.set_ylim(0, top)
  for s, (a, b) in enumerate(data["stage_spans"]):
    if s > 0 or a > 0:
      ax.axvline(a - 0.5, color="#555555", linestyle="--", linewidth=0.9, zorder=3)
    ax.text((a + b) / 2, top * 0.97, f"stage {s + 1}", ha="center", va="top", fontsize=9, color="#333333")
  ax.text(0, top * 0.97, "stem", ha="center", va="top", fontsize=8, color="#333333")
  ax.set_xlim(-0.7, n - 0.3)
  ax.set_xticks(x)
  ax.set_xticklabels([str(i) for i in x], fontsize=7 if n <= 60 else 5, rotation=0 if n <= 60 else 90)
  ax.set_xlabel("conv layer index (stem, then the convs of every block in order)")
  ax.set_ylabel("output channels")
  handles = [Patch(color=UNPRUNED, label="unpruned width"), Patch(color=SEARCHED, label="searched width")]
  if (~kept).any():
    handles.append(Patch(facecolor=DROPPED, hatch="///", edgecolor="white", label="block dropped by the search"))
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.16), ncol=3, frameon=False, fontsize=8)
  ax.spines[["top", "right"]].set_visible(False)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def plot_depth(data: Mapping[str, Any], path: str, title: str = "") -> str:
  """Blocks kept per stage (dark) against the blocks available (light), with the search's choices."""
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  s = np.asarray(data["stage"])
  fig = _figure(max(3.6, 1.3 * len(s) + 1.5), 3.4)
  ax = fig.add_subplot()
  ax.bar(s, data["available"], width=0.7, color=UNPRUNED)
  ax.bar(s, data["kept"], width=0.45, color=SEARCHED)
  for x, k, a in zip(s, data["kept"], data["available"]):
    ax.text(x, a + 0.04 * max(data["available"]), f"{k} of {a}", ha="center", va="bottom", fontsize=9)
  ax.set_xticks(s)
  ax.set_xticklabels([f"stage {i}\nchoices {_choices_text(c)}" for i, c in zip(s, data["choices"])], fontsize=8)
  ax.set_ylabel("residual blocks")
  ax.set_ylim(0, max(data["available"]) * 1.22)
  ax.yaxis.get_major_locator().set_params(integer=True)
  ax.legend(handles=[Patch(color=UNPRUNED, label="blocks of the unpruned net"),
                     Patch(color=SEARCHED, label="blocks kept")],
            loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2, frameon=False, fontsize=8)
  ax.spines[["top", "right"]].set_visible(False)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def _choices_text(choices: Sequence[int]) -> str:
  c = list(choices)
  if len(c) > 2 and c == list(range(c[0], c[-1] + 1)):
    return f"{c[0]}-{c[-1]}"
  return ", ".join(str(v) for v in c)


def plot_search(data: Mapping[str, Any], path: str, title: str = "") -> str:
  """Flops ratios (argmax and expected) over the search with the target band shaded; tau below."""
  fig = _figure(7.5, 5.0)
  gs = fig.add_gridspec(2, 1, height_ratios=(3, 1.3), hspace=0.08)
  ax = fig.add_subplot(gs[0])
  ax_tau = fig.add_subplot(gs[1], sharex=ax)
  if data["band"]:
    lo, hi = data["band"]
    ax.axhspan(lo, hi, color=BAND, alpha=0.45, label=f"target band [{lo:.3f}, {hi:.3f}]", zorder=0)
  if data["target"] is not None:
    ax.axhline(data["target"], color="#31a354", linewidth=0.9, linestyle=":", label=f"target {data['target']:.3f}")
  ax.plot(data["epoch"], data["flops_ratio"], color=SEARCHED, linewidth=1.4, marker=".", markersize=4,
          label="argmax shape (logged steps)")
  ax.plot(data["epoch"], data["expected_flops_ratio"], color=EXPECTED, linewidth=1.4, linestyle="--",
          label="expected under the distributions")
  if data["epoch_end"]:
    ax.plot(data["epoch_end"], data["flops_ratio_exact"], linestyle="none", marker="o", markersize=6,
            markerfacecolor="white", markeredgecolor=SEARCHED, label="argmax shape at epoch end (exact count)")
  if data["final"] is not None:
    x_end = max(data["epoch"] + data["epoch_end"] or [1])
    ax.plot([x_end], [data["final"]], linestyle="none", marker="*", markersize=13, color=KD_COLOUR,
            label=f"returned shape {data['final']:.3f}", zorder=5)
  values = data["flops_ratio"] + data["expected_flops_ratio"] + data["flops_ratio_exact"] + list(data["band"])
  values += [data["final"]] if data["final"] is not None else []
  if values:
    lo, hi = min(values), max(values)
    pad = max(0.03, 0.08 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.05, hi + pad))
  ax.set_ylabel("MACs / unpruned MACs")
  ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  ax.grid(alpha=0.3)
  ax.tick_params(labelbottom=False)
  if data["epoch_tau"]:
    ax_tau.stairs(data["epoch_tau"], np.arange(len(data["epoch_tau"]) + 1), color="#636363", linewidth=1.4,
                  baseline=None)
  else:
    ax_tau.plot(data["epoch"], data["tau"], color="#636363", linewidth=1.3)
  ax_tau.set_ylabel("tau")
  ax_tau.set_xlabel("epoch of the search")
  ax_tau.grid(alpha=0.3)
  if data["epoch"]:
    ax_tau.set_xlim(0, max(data["epoch"] + data["epoch_end"]) * 1.02)
    ax_tau.set_ylim(0, max(data["tau"] + data["epoch_tau"]) * 1.15)
  for a in (ax, ax_tau):
    a.spines[["top", "right"]].set_visible(False)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def width_colour_range(ratios, min_span: float = 0.02) -> tuple[float, float]:
  """The colour range of the width heatmap: the data's own, so that a short search's small moves show.

  Never narrower than ``min_span``, so that noise in a flat map is not blown up.
  """
  r = np.asarray(ratios, np.float64)
  lo, hi = float(r.min()), float(r.max())
  if hi - lo < min_span:
    mid = (lo + hi) / 2
    lo, hi = mid - min_span / 2, mid + min_span / 2
  return lo, hi


def plot_arch_probs(data: Mapping[str, Any], widths: Mapping[str, Any] | None, path: str, title: str = "") -> str:
  """Heatmaps: expected width ratio per conv per epoch, and the depth choices' probabilities per epoch."""
  epochs = data["epochs"]
  wr = np.asarray(data["width_ratio"])
  dp = np.asarray(data["depth"])
  n_l, n_c = wr.shape[1], dp.shape[1]
  fig = _figure(max(8.0, 0.26 * (n_l + n_c) + 4.0), max(3.0, 0.32 * len(epochs) + 2.0))
  gs = fig.add_gridspec(1, 2, width_ratios=(max(n_l, 4), max(n_c, 3) * 1.4), wspace=0.28)
  ax = fig.add_subplot(gs[0])
  lo, hi = width_colour_range(wr)
  im = ax.imshow(wr, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, origin="lower",
                 extent=(-0.5, n_l - 0.5, -0.5, len(epochs) - 0.5), interpolation="nearest")
  if wr.size <= 160:
    for i in range(wr.shape[0]):
      for j in range(n_l):
        ax.text(j, i, f"{wr[i, j]:.2f}"[1:] if wr[i, j] < 1 else "1.0", ha="center", va="center", fontsize=6,
                color="white" if wr[i, j] < (lo + hi) / 2 else "black")
  if widths is not None:
    for s, (a, _) in enumerate(widths["stage_spans"]):
      ax.axvline(a - 0.5, color="white", linewidth=1.2)
  ax.set_yticks(range(len(epochs)))
  ax.set_yticklabels([str(e + 1) for e in epochs], fontsize=7)
  ax.set_ylabel("after epoch")
  ax.set_xlabel("conv layer index (white lines: stage boundaries)")
  ax.set_xticks(range(n_l))
  ax.set_xticklabels([str(i) for i in range(n_l)], fontsize=6 if n_l <= 60 else 4)
  ax.set_title("expected width / unpruned width", fontsize=9)
  cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
  cb.ax.tick_params(labelsize=7)
  ax2 = fig.add_subplot(gs[1])
  im2 = ax2.imshow(dp, aspect="auto", cmap="magma_r", vmin=0.0, vmax=1.0, origin="lower",
                   extent=(-0.5, n_c - 0.5, -0.5, len(epochs) - 0.5), interpolation="nearest")
  stages = data["depth_stage"]
  for j in range(1, n_c):
    if stages[j] != stages[j - 1]:
      ax2.axvline(j - 0.5, color="#1f1f1f", linewidth=1.5)
  if dp.size <= 120:
    for i in range(dp.shape[0]):
      for j in range(n_c):
        ax2.text(j, i, f"{dp[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                 color="white" if dp[i, j] > 0.55 else "black")
  ax2.set_xticks(range(n_c))
  ax2.set_xticklabels([f"s{s}:{b}" for s, b in data["depth_labels"]], fontsize=7, rotation=60)
  ax2.set_yticks(range(len(epochs)))
  ax2.set_yticklabels([str(e + 1) for e in epochs], fontsize=7)
  ax2.set_xlabel("stage:blocks kept")
  ax2.set_title("probability of each depth choice", fontsize=9)
  cb2 = fig.colorbar(im2, ax=ax2, fraction=0.08, pad=0.03)
  cb2.ax.tick_params(labelsize=7)
  if title:
    fig.suptitle(title, fontsize=10, y=1.04)
  return _save(fig, path)


def plot_training(curves: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> str:
  """Per-epoch cross-entropy and training accuracy of the trained networks, test accuracy as markers."""
  fig = _figure(9.0, 3.4)
  ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  colours = {"base": BASE_COLOUR, "kd": KD_COLOUR}
  names = {"base": "unpruned (base)", "kd": "searched + KD (kd)"}
  for stage, c in curves.items():
    colour = colours.get(stage, "#1f77b4")
    ax.plot(c["epoch"], c["ce"], color=colour, marker=".", label=names.get(stage, stage))
    ax2.plot(c["epoch"], [100 * a for a in c["train_acc"]], color=colour, marker=".",
             label=f"{names.get(stage, stage)}: train")
    if c["test_epoch"]:
      ax2.plot(c["test_epoch"], [100 * a for a in c["test_top1"]], color=colour, linestyle="none", marker="D",
               markersize=6, markerfacecolor="white", label=f"{names.get(stage, stage)}: test")
  ax.set_xlabel("epoch")
  ax.set_ylabel("cross-entropy on training batches")
  ax2.set_xlabel("epoch")
  ax2.set_ylabel("top-1 accuracy (%)")
  ax.legend(fontsize=8)
  ax2.legend(fontsize=7.5)
  for a in (ax, ax2):
    a.grid(alpha=0.3)
    a.spines[["top", "right"]].set_visible(False)
    a.xaxis.get_major_locator().set_params(integer=True)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.subplots_adjust(wspace=0.3)
  return _save(fig, path)


def dodge(xs: Sequence[float], step: float) -> list[float]:
  """x positions with the points of equal x spread ``step`` apart around it (baselines share one shape)."""
  out = list(xs)
  groups: dict[float, list[int]] = {}
  for i, x in enumerate(xs):
    groups.setdefault(round(x, 9), []).append(i)
  for x, idx in groups.items():
    for j, i in enumerate(idx):
      out[i] = x + (j - (len(idx) - 1) / 2) * step
  return out


def plot_accuracy(points: Sequence[Mapping[str, Any]], path: str, title: str = "", full_macs: int | None = None) -> str:
  """Test top-1 against MACs for every trained variant; the values are in the legend."""
  fig = _figure(7.6, 4.0)
  ax = fig.add_subplot()
  style = {"base": dict(marker="s", color=BASE_COLOUR, markersize=9),
           "kd": dict(marker="*", color=KD_COLOUR, markersize=15)}
  xmax = max([p["macs"] / 1e6 for p in points] + [(full_macs or 0) / 1e6] + [1e-6]) * 1.12
  xs = dodge([p["macs"] / 1e6 for p in points], 0.03 * xmax)
  k = 0
  for p, x in zip(points, xs):
    s = style.get(p["kind"])
    if s is None:
      s = dict(marker="o", color=BASELINE_COLOURS[k % len(BASELINE_COLOURS)], markersize=8)
      k += 1
    y, std = 100 * p["top1"], p.get("top1_std")
    value = f"{y:.2f} ± {100 * std:.2f} %" if std is not None else f"{y:.2f} %"
    ax.errorbar([x], [y], yerr=[100 * (std or 0.0)], linestyle="none", capsize=3,
                label=f"{p['label']}: {value}, {p['macs'] / 1e6:.2f}M MACs", **s)
  if full_macs:
    ax.axvline(full_macs / 1e6, color="#969696", linestyle=":", linewidth=0.9)
  lows = [100 * (p["top1"] - (p.get("top1_std") or 0.0)) for p in points]
  highs = [100 * (p["top1"] + (p.get("top1_std") or 0.0)) for p in points]
  if points:
    ax.set_xlim(0.0, xmax)
    span = max(highs) - min(lows) or 1.0
    ax.set_ylim(min(lows) - 0.2 * span - 0.3, max(highs) + 0.2 * span + 0.3)
  ax.set_xlabel("MACs (millions)")
  ax.set_ylabel("test top-1 accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
  ax.spines[["top", "right"]].set_visible(False)
  if title:
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


# ----------------------------------------------------------------------------- the markdown

def _fmt_int(v) -> str:
  return f"{int(v):,}" if v is not None else "–"


def _fmt_pct(v, std=None) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  return f"{100 * v:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * v:.2f}"


def _fmt_s(v) -> str:
  if v is None:
    return "–"
  v = int(round(float(v)))
  if v < 60:
    return f"{v} s"
  if v < 3600:
    return f"{v // 60} min {v % 60:02d} s"
  return f"{v / 3600:.1f} h"


def _wall(state: Mapping[str, Any], stage: str, result: Mapping[str, Any] | None):
  rec = state.get("stages", {}).get(stage) or {}
  if rec.get("wall_s"):
    return rec["wall_s"]
  return (result or {}).get("wall_s")


def summary_rows(workdir: str) -> list[dict]:
  """The summary table: one row per stage (and baseline variant) with MACs, params, ratio, accuracy, wall time."""
  state = pipeline_lib.read_state(workdir)
  base, search, kd = (_stage_result(workdir, s) for s in ("base", "search", "kd"))
  full = (base or {}).get("macs")
  rows = []
  if base:
    rows.append({"name": "unpruned (base)", "macs": base["macs"], "params": base.get("params"), "ratio": 1.0,
                 "top1": base.get("test_top1"), "top5": base.get("test_top5"), "epochs": base.get("epochs"),
                 "wall_s": _wall(state, "base", base)})
  if search:
    rows.append({"name": "TAS search (searched shape)", "macs": search["macs"], "params": search.get("params"),
                 "ratio": search.get("flops_ratio"), "top1": None, "top5": None, "epochs": search.get("epochs"),
                 "wall_s": _wall(state, "search", search)})
  if kd:
    rows.append({"name": "searched + KD (kd)", "macs": kd["macs"], "params": kd.get("params"),
                 "ratio": kd.get("flops_ratio"), "top1": kd.get("test_top1"), "top5": kd.get("test_top5"),
                 "epochs": kd.get("epochs"), "wall_s": _wall(state, "kd", kd)})
  protocol = _read_json(os.path.join(workdir, "protocol", "protocol.json"))
  for v in protocol_variants(protocol):
    seeds = f", mean ± std of {v['n']} seeds" if v["n"] > 1 else ""
    rows.append({"name": f"protocol: {v['title']}{seeds}", "macs": v["macs"], "params": v["params"],
                 "ratio": (v["macs"] / full) if (v["macs"] and full) else None, "top1": v["top1"],
                 "top1_std": v["top1_std"], "top5": v["top5"], "epochs": v["epochs"], "wall_s": None})
  if protocol is not None and rows:
    rows.append({"name": "protocol (the stage, all its runs)", "macs": None, "params": None, "ratio": None,
                 "top1": None, "top5": None, "epochs": None, "wall_s": _wall(state, "protocol", None)})
  return rows


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  lines = ["| | MACs | ratio | params | test top-1 (%) | test top-5 (%) | epochs | wall time |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else "–"
    lines.append(f"| {r['name']} | {_fmt_int(r['macs'])} | {ratio} | {_fmt_int(r['params'])} | "
                 f"{_fmt_pct(r['top1'], r.get('top1_std'))} | {_fmt_pct(r['top5'])} | "
                 f"{r['epochs'] if r.get('epochs') is not None else '–'} | {_fmt_s(r['wall_s'])} |")
  return lines


def _shape_text(shape: shapes_lib.Shape) -> str:
  return f"widths {list(shape.widths)}, blocks kept per stage {list(shape.blocks)} of {list(shape.layers)}"


def _flat_note(data: Mapping[str, Any], tolerance: float = 0.05) -> str:
  """A caption's remark when the final depth distributions are still close to uniform."""
  if not data["depth"]:
    return ""
  final = np.asarray(data["depth"][-1])
  stages = np.asarray(data["depth_stage"])
  counts = np.array([np.sum(stages == s) for s in stages])
  chosen = counts > 1  # a stage with a single depth choice has nothing to learn
  if not chosen.any() or np.abs(final - 1.0 / counts)[chosen].max() >= tolerance:
    return ""
  return (" In this search the depth probabilities are still within "
          f"{tolerance:.2f} of uniform at the end, so the blocks kept come from near-ties.")


def _top1_note(record: Mapping[str, Any]) -> str:
  """A caption's remark on how far the final width distributions moved from uniform."""
  w = np.asarray(record.get("width") or [], dtype=float)
  if w.size == 0:
    return ""
  valid = (w > 0).sum(axis=1)
  return (f" At the end the most likely width of a conv has probability {w.max(axis=1).mean():.3f} on average "
          f"(uniform: {np.mean(1.0 / np.maximum(valid, 1)):.3f}).")


def write_report(pipeline_dir: str) -> str:
  """Write ``pipeline_dir/report.md`` and its figures in ``pipeline_dir/figures``; returns the report's path.

  Works on a partial pipeline too: figures and rows of unfinished stages are
  left out and the report says which stages are missing.

  Raises:
    FileNotFoundError: ``pipeline_dir`` is not a directory.
  """
  workdir = os.path.normpath(pipeline_dir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{pipeline_dir} is not a directory")
  fig_dir = os.path.join(workdir, FIGURES_DIR)
  os.makedirs(fig_dir, exist_ok=True)
  state = pipeline_lib.read_state(workdir)
  base, search, kd = (_stage_result(workdir, s) for s in ("base", "search", "kd"))
  shape = _load_shape(os.path.join(workdir, "search", "shape.json"))
  figures: list[tuple[str, str, str]] = []  # (file, heading, caption)

  def add(name: str, heading: str, caption: str) -> None:
    figures.append((f"{FIGURES_DIR}/{name}", heading, caption))

  if shape is not None:
    net = _network_name(shape)
    c = cost_lib.count(shape)
    full = cost_lib.count(shapes_lib.full_shape(shape))
    wd = width_data(shape)
    dropped = sum(1 for k in wd["kept"] if not k)
    plot_widths(wd, os.path.join(fig_dir, "widths.png"),
                f"{net}: searched widths ({c.macs / 1e6:.2f}M of {full.macs / 1e6:.2f}M MACs, "
                f"ratio {c.macs / full.macs:.3f})")
    add("widths.png", "Searched width of every conv",
        f"The output channels of every conv of {net}, in network order (index 0 is the stem). Light bars: the "
        f"unpruned width; dark bars: the width TAS chose. Dashed lines separate the stages"
        + (f"; {dropped} convs belong to blocks the search dropped (hatched grey)." if dropped else
           "; the search kept every block."))
    dd = depth_data(shape)
    plot_depth(dd, os.path.join(fig_dir, "depth.png"), f"{net}: blocks kept per stage")
    add("depth.png", "Blocks kept per stage",
        "Residual blocks each stage keeps after the search (dark) out of the unpruned network's (light); under "
        "each stage, the depths the search could choose for it (a stage keeps a prefix of its blocks). "
        f"Kept: {dd['kept']} of {dd['available']}.")
  if search:
    curves = search_curves(_read_jsonl(os.path.join(workdir, "search", "metrics.jsonl")), search)
    if curves["epoch"]:
      plot_search(curves, os.path.join(fig_dir, "search_flops.png"), "MACs ratio and temperature during the search")
      band = curves["band"]
      add("search_flops.png", "Cost over the search",
          "Top: the MACs of the most likely (argmax) shape as a fraction of the unpruned network's, at every "
          "logged step (dark line) and exactly counted at each epoch's end (circles), the expected MACs ratio "
          "under the width and depth distributions (dashed), and the target band the cost loss aims for (shaded"
          + (f", [{band[0]:.3f}, {band[1]:.3f}]" if band else "") + "). The star is the shape the search returned"
          + (" after moving it into the band" if search.get("fit_moves") else "")
          + f" ({search['flops_ratio']:.3f}). While the distributions are nearly flat the argmax flips between "
          "almost equally likely candidates, and the cost loss pulls it back whenever it leaves the band. "
          "Bottom: the Gumbel-softmax temperature tau, one value per epoch.")
  probs = _read_jsonl(os.path.join(workdir, "search", "arch_probs.jsonl"))
  if shape is not None and probs:
    try:
      ad = arch_prob_data(probs, search_space_of(os.path.join(workdir, "search"), shape))
    except (ValueError, shapes_lib.ShapeError):
      ad = None
    if ad and ad["epochs"]:
      plot_arch_probs(ad, width_data(shape), os.path.join(fig_dir, "arch_probs.png"),
                      "Architecture distributions at the end of each search epoch")
      lo, hi = width_colour_range(ad["width_ratio"])
      add("arch_probs.png", "Architecture distributions over the search",
          "Left: for every conv (columns, network order) and search epoch (rows), the expected width under "
          "its learned distribution divided by the unpruned width (the numbers in the cells); the colours span "
          f"the range of these values (here {lo:.3f} to {hi:.3f}), so dark marks the convs the search pushes "
          "narrowest. Right: the probability of each depth choice ('s2:1' = stage 2 keeps 1 block) per epoch; "
          "each stage's choices sum to 1." + _top1_note(probs[-1]) + _flat_note(ad))
  train_curves = {}
  for stage in ("base", "kd"):
    curves_of_stage = training_curves(_read_jsonl(os.path.join(workdir, stage, "metrics.jsonl")))
    if curves_of_stage["epoch"]:
      train_curves[stage] = curves_of_stage
  if train_curves:
    plot_training(train_curves, os.path.join(fig_dir, "training.png"), "Training of the unpruned and searched networks")
    add("training.png", "Training curves",
        "Per-epoch mean cross-entropy (left) and training accuracy (right, lines) of the unpruned network (base) "
        "and of the searched shape trained with distillation (kd; the cross-entropy part of its loss); diamonds "
        "are test accuracies (at the end, and every `eval_every_epochs` epochs when set).")
  points = accuracy_points(workdir)
  if points:
    plot_accuracy(points, os.path.join(fig_dir, "accuracy_macs.png"), "Test accuracy against cost",
                  full_macs=(base or {}).get("macs"))
    has_baselines = any(p["kind"] == "baseline" for p in points)
    add("accuracy_macs.png", "Accuracy against MACs",
        "Test top-1 accuracy against MACs (millions) of every trained network: the unpruned base (square), "
        "the searched shape distilled from it (star)"
        + (" and the Rethinking baselines (circles; error bars: standard deviation over seeds). The searched "
           "shape and its baselines have the same MACs; their points are spread sideways so that none hides "
           "another" if has_baselines else "") + ". The legend gives the values; the dotted line marks the "
        "unpruned MACs. Up and left is better.")

  missing = [s for s in pipeline_lib.enabled_stages(state.get("config")) if not pipeline_lib.is_complete(workdir, s)]
  lines = _markdown(workdir, state, base, search, kd, shape, figures, missing)
  path = os.path.join(workdir, REPORT_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)
  return path


def _markdown(workdir, state, base, search, kd, shape, figures, missing) -> list[str]:
  model = state.get("model") or (base or {}).get("model") or (search or {}).get("model") or "?"
  dataset = (base or search or kd or {}).get("dataset") or state.get("dataset") or "?"
  lines = [f"# TAS pipeline: {model} on {dataset}", ""]
  if state.get("preset"):
    lines += [f"Preset `{state['preset']}`; stages in `{workdir}`.", ""]
  summary = []
  if base:
    summary.append(f"The unpruned {model} reached **{_fmt_pct(base.get('test_top1'))} %** test top-1 at "
                   f"{base['macs'] / 1e6:.2f}M MACs.")
  if search:
    band = search.get("band_ratio") or [None, None]
    where = "inside" if search.get("in_band") else "outside"
    summary.append(f"TAS searched a shape of {search['macs'] / 1e6:.2f}M MACs (ratio **{search['flops_ratio']:.3f}**, "
                   f"{where} the target band [{band[0]:.3f}, {band[1]:.3f}]) in {search.get('epochs')} epochs.")
  if kd:
    delta = (kd["test_top1"] - base["test_top1"]) * 100 if base else None
    summary.append(f"Trained from scratch with knowledge distillation from the unpruned network, it reaches "
                   f"**{_fmt_pct(kd.get('test_top1'))} %**" + (f" ({delta:+.2f} points)." if delta is not None
                                                                else "."))
  if summary:
    lines += [" ".join(summary), ""]
  if missing:
    lines += [f"**Not finished yet:** {', '.join(missing)}. Rerun the pipeline command below to go on; this "
              "report covers what is done.", ""]
  lines += ["## Summary", ""]
  rows = summary_rows(workdir)
  lines += _table(rows) if rows else ["No stage has finished yet."]
  total = sum(float(r.get("wall_s") or 0.0) for r in state.get("stages", {}).values())
  lines += ["", "MACs count the multiply-accumulates of convs and the classifier (FLOPs = 2 × MACs); ratio = MACs / "
            "the unpruned network's; params are all trainable parameters. Test accuracies are the final epoch's. "
            "Wall times are per stage, summed over resumed invocations, compilation and evaluation included"
            + (f"; the stages took {_fmt_s(total)} in all." if total else "."), ""]
  lat = latency_rows(_read_json(os.path.join(workdir, "protocol", "protocol.json")))
  if lat:
    parts = [f"batch {r['batch_size']}: {r['searched_ms']:.2f} ms searched"
             + (f" vs {r['unpruned_ms']:.2f} ms unpruned" if r["unpruned_ms"] is not None else "") for r in lat]
    lines += [f"Inference latency (median eval-mode forward on {lat[0]['device']}, from `protocol/protocol.json`): "
              + "; ".join(parts) + ".", ""]
  if shape is not None:
    lines += [f"Searched shape (`search/shape.json`): {_shape_text(shape)}.", ""]
  for file, heading, caption in figures:
    lines += [f"## {heading}", "", f"![{heading}]({file})", "", caption, ""]
  lines += _reproduce(workdir, state)
  return lines


def _reproduce(workdir: str, state: Mapping[str, Any]) -> list[str]:
  shown = workdir
  command = state.get("command") or ("python -m experiments.pipeline --config experiments/configs/pipeline.py:"
                                     f"{state.get('preset') or 'demo'} --workdir {shlex.quote(shown)}")
  lines = ["## Reproduce", "", "The whole pipeline (rerunning it resumes; finished stages are not run again):", "",
           "```bash", command, "```", "", "This report, from the stages' outputs:", "", "```bash",
           f"python -m tas_jax.report {shlex.quote(shown)}", "```", "",
           "Every stage's curves (losses, accuracies, learning rate, tau, MACs ratios) in TensorBoard:", "",
           "```bash", f"tensorboard --logdir {shlex.quote(shown)}", "```", ""]
  stage_commands = state.get("stage_commands") or {}
  if stage_commands:
    lines += ["Each stage by itself (its `config.json` holds the full configuration):", "", "```bash"]
    for stage in pipeline_lib.STAGES:
      if stage in stage_commands:
        lines += [f"# {stage}", stage_commands[stage]]
    lines += ["```", ""]
  lines += ["Stage directories: `base/` (the unpruned network, `model/` its weights), `search/` (`shape.json`, "
            "`shapes/epoch_NNN.json`, `arch_probs.jsonl`), `kd/`" + (", `protocol/`" if os.path.isdir(
                os.path.join(workdir, "protocol")) else "") + "; each has `result.json`, `metrics.jsonl`, "
            "`config.json` and TensorBoard events in `tb/`.", ""]
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m tas_jax.report PIPELINE_DIR", file=sys.stderr)
    return 2
  if not os.path.isdir(argv[0]):
    print(f"error: {argv[0]} is not a directory", file=sys.stderr)
    return 2
  print(write_report(argv[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
