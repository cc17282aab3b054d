"""The pipeline report on stand-in pipeline directories (no training): files, figure data, markdown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tas_jax.core import cost, shapes
from tas_jax.core import shape_files

from tas_jax.runtime import stages as pipeline_dir
from tas_jax import report
from tas_jax.nets import supernet
FIGURES = ("widths.png", "depth.png", "search_flops.png", "arch_probs.png", "training.png", "accuracy_macs.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def searched_shape() -> shapes.Shape:
  """A pruned ResNet-20: narrower convs everywhere, stage 2 keeps 2 of its 3 blocks."""
  base = shape_files.preset("resnet20")
  space = supernet.make_space(base, supernet.SupernetConfig())
  wi = np.array([(l * 3) % 8 for l in range(space.num_convs)], np.int32)
  wi = np.minimum(wi, space.width_mask.sum(1) - 1)
  di = np.array([2, 1, 2], np.int32)  # 3, 2, 3 blocks
  return space.shape_from_indices(wi, di)


def _save_shape(shape, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape_files.save(shape, path)


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def write_base(root, epochs=3, top1=0.61):
  full = shape_files.preset("resnet20")
  c = cost.count(full)
  d = os.path.join(root, "base")
  _write(os.path.join(d, "result.json"), {"finished": True, "mode": "base", "recipe": "official", "test_top1": top1,
                                          "test_top5": 0.97, "macs": c.macs, "params": c.params, "flops_ratio": 1.0,
                                          "epochs": epochs, "model": "resnet20", "dataset": "synthetic(seed=0)",
                                          "wall_s": 50.0})
  _save_shape(full, os.path.join(d, "model", "shape.json"))
  _write_jsonl(os.path.join(d, "metrics.jsonl"),
               [{"step": 10 * (e + 1), "epoch": e, "epoch_ce": 2.0 - 0.4 * e, "epoch_loss": 2.0 - 0.4 * e,
                 "epoch_train_acc": 0.2 + 0.15 * e} for e in range(epochs)]
               + [{"step": 10 * epochs, "epoch": epochs - 1, "test_top1": top1, "test_top5": 0.97}])
  return d


def write_search(root, shape=None, epochs=3, spe=10, log_every=2):
  shape = shape or searched_shape()
  space = supernet.make_space(shapes.full_shape(shape), supernet.SupernetConfig())
  full = cost.count(shapes.full_shape(shape)).macs
  c = cost.count(shape)
  d = os.path.join(root, "search")
  _save_shape(shape, os.path.join(d, "shape.json"))
  _save_shape(shape, os.path.join(d, "shape_argmax.json"))
  _write(os.path.join(d, "config.json"), {"model": "resnet20", "mode": "shape", "width_multiple": 1,
                                          "target_flops_ratio": 0.5, "epochs": epochs})
  _write(os.path.join(d, "result.json"), {"finished": True, "macs": c.macs, "params": c.params,
                                          "flops_ratio": c.macs / full, "argmax_flops_ratio": c.macs / full,
                                          "fit_moves": 0, "target_flops_ratio": 0.5, "epochs": epochs,
                                          "steps": epochs * spe, "model": "resnet20", "dataset": "synthetic(seed=0)",
                                          "band": [0.45 * full, 0.5 * full], "band_ratio": [0.45, 0.5],
                                          "in_band": True, "wall_s": 80.0})
  recs = []
  for step in range(log_every, epochs * spe + 1, log_every):
    e = (step - 1) // spe
    recs.append({"step": step, "epoch": e, "weight_loss": 2.0, "arch_loss": 1.0, "cost_loss": 0.1,
                 "flops_ratio": 0.8 - 0.01 * step, "expected_flops_ratio": 0.7 - 0.005 * step,
                 "tau": 5.0 - e, "lr": 0.1})
    if step % spe == 0:
      recs.append({"step": step, "epoch": e, "epoch_flops_ratio": 0.6, "flops_ratio_exact": 0.8 - 0.01 * step,
                   "macs": c.macs, "val_acc": 0.3, "tau": 5.0 - e})
  _write_jsonl(os.path.join(d, "metrics.jsonl"), recs)
  rng = np.random.default_rng(0)
  probs = []
  for e in range(epochs):
    w = rng.random(space.width_table.shape) * space.width_mask
    dd = rng.random(space.depth_table.shape) * space.depth_mask
    probs.append({"epoch": e, "width": (w / w.sum(1, keepdims=True)).tolist(),
                  "depth": (dd / dd.sum(1, keepdims=True)).tolist()})
  _write_jsonl(os.path.join(d, "arch_probs.jsonl"), probs)
  return d


def write_kd(root, shape=None, epochs=3, top1=0.58):
  shape = shape or searched_shape()
  c = cost.count(shape)
  full = cost.count(shapes.full_shape(shape)).macs
  d = os.path.join(root, "kd")
  _write(os.path.join(d, "result.json"), {"finished": True, "mode": "kd", "recipe": "official", "test_top1": top1,
                                          "test_top5": 0.95, "macs": c.macs, "params": c.params,
                                          "flops_ratio": c.macs / full, "epochs": epochs, "model": "resnet20",
                                          "dataset": "synthetic(seed=0)", "wall_s": 40.0, "shape": shape.to_dict()})
  _write_jsonl(os.path.join(d, "metrics.jsonl"),
               [{"step": 10 * (e + 1), "epoch": e, "epoch_ce": 2.1 - 0.4 * e, "epoch_loss": 0.5,
                 "epoch_train_acc": 0.2 + 0.13 * e} for e in range(epochs)])
  return d


def write_protocol(root, shape=None):
  shape = shape or searched_shape()
  c = cost.count(shape)
  lat = {"1": {"median_ms": 1.5, "images_per_s": 666.0, "device": "cpu"}}
  variants = {}
  for name, accs in (("scratch-e", [0.50, 0.54]), ("scratch-b", [0.56, 0.57]), ("finetune", [0.52, 0.52])):
    variants[name] = {"n": 2, "planned": 2, "test_top1": accs, "test_top1_mean": float(np.mean(accs)),
                      "test_top1_std": float(np.std(accs, ddof=1)), "test_top5_mean": 0.9, "test_top5_std": 0.0,
                      "macs": c.macs, "params": c.params, "epochs": 3, "variant": name, "latency": lat}
  summary = {"label": "searched", "recipe": "official", "seeds": 2, "macs": c.macs, "params": c.params,
             "shape": shape.to_dict(),
             "latency": lat, "variants": variants,
             "teacher_result": {"test_top1": 0.61, "latency": {"1": {"median_ms": 2.5, "device": "cpu"}}}}
  _write(os.path.join(root, "protocol", "protocol.json"), summary)
  return summary


def write_state(root, protocol=True):
  _write(os.path.join(root, pipeline_dir.STATE_FILE),
         {"preset": "demo", "model": "resnet20", "dataset": "synthetic", "finished": True,
          "command": "python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:demo --workdir runs/x",
          "stage_commands": {"base": "python -m tas_jax.cli.train --workdir runs/x/base"},
          "config": {"protocol": protocol},
          "stages": {s: {"status": "done", "wall_s": 10.0 * (i + 1), "invocations": 1}
                     for i, s in enumerate(pipeline_dir.STAGES if protocol else pipeline_dir.STAGES[:3])}})


def make_standin(root, protocol=True) -> str:
  """A finished pipeline directory with every file the report reads, written without training."""
  root = str(root)
  write_base(root)
  write_search(root)
  write_kd(root)
  if protocol:
    write_protocol(root)
  write_state(root, protocol)
  return root


def test_report_writes_and_references_every_figure(tmp_path):
  root = make_standin(tmp_path / "p")
  path = report.write_report(root)
  assert path == os.path.join(root, "report.md")
  text = open(path).read()
  referenced = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert sorted(referenced) == sorted(f"figures/{f}" for f in FIGURES)
  for rel in referenced:
    with open(os.path.join(root, rel), "rb") as f:
      assert f.read(8) == PNG_MAGIC, rel
  assert not any(name.endswith(".tmp.png") for name in os.listdir(os.path.join(root, "figures")))
  for needle in ("## Summary", "| unpruned (base) |", "| searched + KD (kd) |", "protocol: Scratch-B",
                 "tensorboard --logdir", "python -m tas_jax.cli.report", "python -m tas_jax.cli.pipeline",
                 "python -m tas_jax.cli.train", "Inference latency"):
    assert needle in text, needle
  # Every figure has a caption paragraph right after it.
  for rel in referenced:
    after = text.split(f"]({rel})", 1)[1].lstrip("\n").split("\n", 1)[0]
    assert len(after) > 40, rel


def test_summary_table_values(tmp_path):
  root = make_standin(tmp_path / "p")
  rows = {r["name"]: r for r in report.summary_rows(root)}
  base = rows["unpruned (base)"]
  assert base["macs"] == cost.count(shape_files.preset("resnet20")).macs and base["top1"] == 0.61 and base["wall_s"] == 10.0
  kd = rows["searched + KD (kd)"]
  assert kd["macs"] == cost.count(searched_shape()).macs and kd["top1"] == 0.58 and kd["wall_s"] == 30.0
  assert kd["ratio"] == pytest.approx(kd["macs"] / base["macs"])
  scratch = rows["protocol: Scratch-E, mean ± std of 2 seeds"]
  assert scratch["top1"] == pytest.approx(0.52) and scratch["top1_std"] == pytest.approx(np.std([0.5, 0.54], ddof=1))
  text = open(report.write_report(root)).read()
  assert "| 61.00 |" in text and "| 58.00 |" in text and "52.00 ± 2.83" in text


def test_width_data_is_the_shape():
  shape = searched_shape()
  d = report.width_data(shape)
  assert d["searched"] == list(shape.widths) and d["nominal"] == list(shape.nominal)
  assert d["index"] == list(range(len(shape.widths))) and d["stage"][0] == -1
  # Stage 2 (index 1) keeps 2 of 3 blocks: exactly the two convs of its third block are dropped.
  dropped = [i for i, k in enumerate(d["kept"]) if not k]
  third = [b for b in shape.layout.blocks if b.stage == 1 and b.index == 2][0]
  assert dropped == list(third.convs)
  spans = d["stage_spans"]
  assert spans[0][0] == 1 and spans[-1][1] == len(shape.widths) - 1
  assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:]))


def test_depth_data():
  d = report.depth_data(searched_shape())
  assert d == {"stage": [1, 2, 3], "kept": [3, 2, 3], "available": [3, 3, 3], "choices": [[1, 2, 3]] * 3}


def test_search_curves(tmp_path):
  d = write_search(str(tmp_path), epochs=3, spe=10, log_every=2)
  result = json.load(open(os.path.join(d, "result.json")))
  c = report.search_curves(report.read_jsonl(os.path.join(d, "metrics.jsonl")), result)
  assert c["epoch"] == [s / 10 for s in range(2, 31, 2)]
  assert c["flops_ratio"] == pytest.approx([0.8 - 0.01 * s for s in range(2, 31, 2)])
  assert c["expected_flops_ratio"] == pytest.approx([0.7 - 0.005 * s for s in range(2, 31, 2)])
  assert c["epoch_end"] == [1, 2, 3] and c["epoch_tau"] == [5.0, 4.0, 3.0]
  assert c["band"] == [0.45, 0.5] and c["target"] == 0.5 and c["final"] == result["flops_ratio"]


def test_arch_prob_data_expected_widths():
  shape = searched_shape()
  space = supernet.make_space(shapes.full_shape(shape), supernet.SupernetConfig())
  wi, di = space.indices_of(shape)
  onehot_w = np.eye(space.width_table.shape[1])[wi]
  onehot_d = np.eye(space.depth_table.shape[1])[di]
  uniform_w = space.width_mask / space.width_mask.sum(1, keepdims=True)
  recs = [{"epoch": 0, "width": uniform_w.tolist(), "depth": onehot_d.tolist()},
          {"epoch": 1, "width": onehot_w.tolist(), "depth": onehot_d.tolist()}]
  d = report.arch_prob_data(recs, space)
  assert d["epochs"] == [0, 1]
  # All the mass on the searched candidate: the expected width is the searched width.
  np.testing.assert_allclose(np.asarray(d["width_ratio"][1]) * np.asarray(shape.nominal), shape.widths)
  np.testing.assert_allclose(np.asarray(d["argmax_ratio"][1]) * np.asarray(shape.nominal), shape.widths)
  mean = [np.mean(space.width_table[l][space.width_mask[l]]) / shape.nominal[l] for l in range(space.num_convs)]
  np.testing.assert_allclose(d["width_ratio"][0], mean)
  assert d["depth_labels"] == [(s, b) for s in (1, 2, 3) for b in (1, 2, 3)]
  assert d["depth"][0] == [1.0 if b == k else 0.0 for s, k in enumerate(shape.blocks) for b in (1, 2, 3)]
  assert report.markdown.flat_note(d) == ""  # one-hot depths: the search has decided
  flat = report.arch_prob_data([{"epoch": 0, "width": uniform_w.tolist(),
                                 "depth": (space.depth_mask / space.depth_mask.sum(1, keepdims=True)).tolist()}], space)
  assert "near-ties" in report.markdown.flat_note(flat)
  with pytest.raises(ValueError, match="do not fit"):
    report.arch_prob_data([{"epoch": 0, "width": [[1.0]], "depth": [[1.0]]}], space)


def test_accuracy_points(tmp_path):
  root = make_standin(tmp_path / "p")
  points = {p["label"]: p for p in report.accuracy_points(root)}
  assert points["unpruned (base)"]["macs"] == cost.count(shape_files.preset("resnet20")).macs
  assert points["searched + KD (kd)"]["top1"] == 0.58
  assert points["Scratch-B (protocol, 2 seeds)"]["top1"] == pytest.approx(0.565)
  assert {p["kind"] for p in points.values()} == {"base", "kd", "baseline"}


def test_partial_pipeline_report(tmp_path):
  root = str(tmp_path / "p")
  write_base(root)
  write_state(root, protocol=False)
  text = open(report.write_report(root)).read()
  assert "**Not finished yet:** search, kd" in text
  assert re.findall(r"\]\((figures/[^)]+)\)", text) == ["figures/training.png", "figures/accuracy_macs.png"]


def test_command_line(tmp_path):
  root = make_standin(tmp_path / "p", protocol=False)
  out = subprocess.run([sys.executable, "-m", "tas_jax.cli.report", root], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == os.path.join(root, "report.md")
  assert all(os.path.isfile(os.path.join(root, "figures", f)) for f in FIGURES)
  bad = subprocess.run([sys.executable, "-m", "tas_jax.cli.report", str(tmp_path / "missing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and "not a directory" in bad.stderr
