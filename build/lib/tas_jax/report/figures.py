"""The report's figures: each ``plot_*`` function draws the data of one :mod:`tas_jax.report.data` function."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np


# One colour per role, the same in every figure.
UNPRUNED = "#c6dbef"
SEARCHED = "#08519c"
DROPPED = "#bdbdbd"
EXPECTED = "#fd8d3c"
BAND = "#a1d99b"
BASE_COLOUR = "#252525"
KD_COLOUR = "#d62728"
BASELINE_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


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
