"""A pipeline's report: ``report.md`` with figures of the searched shape, the search and the accuracies.

:func:`write_report` reads what the stages left in a pipeline directory and
writes the markdown and PNG figures. Figures whose stage has not finished are
left out, and the markdown says so.
"""

from __future__ import annotations

import math
import os
import shlex
from typing import Any, Mapping, Sequence

import numpy as np

from tas_jax.core import cost as cost_lib
from tas_jax.runtime import stages as pipeline_lib
from tas_jax.core import shapes as shapes_lib

from tas_jax.report import data
from tas_jax.report import figures as plots

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


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
  base, search, kd = (data.stage_result(workdir, s) for s in ("base", "search", "kd"))
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
  protocol = data.read_json(os.path.join(workdir, "protocol", "protocol.json"))
  for v in data.protocol_variants(protocol):
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


def flat_note(data: Mapping[str, Any], tolerance: float = 0.05) -> str:
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
  base, search, kd = (data.stage_result(workdir, s) for s in ("base", "search", "kd"))
  shape = data.load_shape(os.path.join(workdir, "search", "shape.json"))
  figures: list[tuple[str, str, str]] = []  # (file, heading, caption)

  def add(name: str, heading: str, caption: str) -> None:
    figures.append((f"{FIGURES_DIR}/{name}", heading, caption))

  if shape is not None:
    net = data.network_name(shape)
    c = cost_lib.count(shape)
    full = cost_lib.count(shapes_lib.full_shape(shape))
    wd = data.width_data(shape)
    dropped = sum(1 for k in wd["kept"] if not k)
    plots.plot_widths(wd, os.path.join(fig_dir, "widths.png"),
                f"{net}: searched widths ({c.macs / 1e6:.2f}M of {full.macs / 1e6:.2f}M MACs, "
                f"ratio {c.macs / full.macs:.3f})")
    add("widths.png", "Searched width of every conv",
        f"The output channels of every conv of {net}, in network order (index 0 is the stem). Light bars: the "
        f"unpruned width; dark bars: the width TAS chose. Dashed lines separate the stages"
        + (f"; {dropped} convs belong to blocks the search dropped (hatched grey)." if dropped else
           "; the search kept every block."))
    dd = data.depth_data(shape)
    plots.plot_depth(dd, os.path.join(fig_dir, "depth.png"), f"{net}: blocks kept per stage")
    add("depth.png", "Blocks kept per stage",
        "Residual blocks each stage keeps after the search (dark) out of the unpruned network's (light); under "
        "each stage, the depths the search could choose for it (a stage keeps a prefix of its blocks). "
        f"Kept: {dd['kept']} of {dd['available']}.")
  if search:
    curves = data.search_curves(data.read_jsonl(os.path.join(workdir, "search", "metrics.jsonl")), search)
    if curves["epoch"]:
      plots.plot_search(curves, os.path.join(fig_dir, "search_flops.png"),
                        "MACs ratio and temperature during the search")
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
  probs = data.read_jsonl(os.path.join(workdir, "search", "arch_probs.jsonl"))
  if shape is not None and probs:
    try:
      ad = data.arch_prob_data(probs, data.search_space_of(os.path.join(workdir, "search"), shape))
    except (ValueError, shapes_lib.ShapeError):
      ad = None
    if ad and ad["epochs"]:
      plots.plot_arch_probs(ad, data.width_data(shape), os.path.join(fig_dir, "arch_probs.png"),
                      "Architecture distributions at the end of each search epoch")
      lo, hi = plots.width_colour_range(ad["width_ratio"])
      add("arch_probs.png", "Architecture distributions over the search",
          "Left: for every conv (columns, network order) and search epoch (rows), the expected width under "
          "its learned distribution divided by the unpruned width (the numbers in the cells); the colours span "
          f"the range of these values (here {lo:.3f} to {hi:.3f}), so dark marks the convs the search pushes "
          "narrowest. Right: the probability of each depth choice ('s2:1' = stage 2 keeps 1 block) per epoch; "
          "each stage's choices sum to 1." + _top1_note(probs[-1]) + flat_note(ad))
  train_curves = {}
  for stage in ("base", "kd"):
    curves_of_stage = data.training_curves(data.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl")))
    if curves_of_stage["epoch"]:
      train_curves[stage] = curves_of_stage
  if train_curves:
    plots.plot_training(train_curves, os.path.join(fig_dir, "training.png"),
                        "Training of the unpruned and searched networks")
    add("training.png", "Training curves",
        "Per-epoch mean cross-entropy (left) and training accuracy (right, lines) of the unpruned network (base) "
        "and of the searched shape trained with distillation (kd; the cross-entropy part of its loss); diamonds "
        "are test accuracies (at the end, and every `eval_every_epochs` epochs when set).")
  points = data.accuracy_points(workdir)
  if points:
    plots.plot_accuracy(points, os.path.join(fig_dir, "accuracy_macs.png"), "Test accuracy against cost",
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
  lat = data.latency_rows(data.read_json(os.path.join(workdir, "protocol", "protocol.json")))
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
  command = state.get("command") or ("python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:"
                                     f"{state.get('preset') or 'demo'} --workdir {shlex.quote(shown)}")
  lines = ["## Reproduce", "", "The whole pipeline (rerunning it resumes; finished stages are not run again):", "",
           "```bash", command, "```", "", "This report, from the stages' outputs:", "", "```bash",
           f"python -m tas_jax.cli.report {shlex.quote(shown)}", "```", "",
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
