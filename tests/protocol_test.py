import json
import os
import statistics

import pytest

from tas_jax.cli import compare as compare_cli
from tas_jax.cli import protocol as protocol_cli
from tas_jax.cli import prune as prune_cli
from tas_jax.configs import train as train_configs
from tas_jax import baselines

# Tiny runs: 32 synthetic examples in 2 steps of 16, one epoch, on one device.
from tas_jax.programs import protocol, train
from tas_jax.report import tables
from tas_jax.core import cost
from tas_jax.core import shape_files
TINY = ["--recipe", "smoke", "--config.num_train_examples=32", "--config.batch_size=16", "--set",
        "eval_batch_size=200", "--set", "num_devices=1", "--set", "epochs=1", "--set", "log_every_steps=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  c = train_configs.get_config("resnet8,smoke")
  c.mode, c.batch_size, c.eval_batch_size, c.num_train_examples, c.epochs, c.num_devices = "base", 16, 200, 32, 1, 1
  assert train.run(c, workdir)["finished"]
  return workdir


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher):
  """A protocol of an L1-pruned resnet8, every variant with 2 seeds."""
  root = tmp_path_factory.mktemp("protocol")
  pruned = str(root / "r8-l1.json")
  assert prune_cli.main(["--method", "l1", "--base", teacher, "--target_flops_ratio", "0.5", "--out", pruned]) == 0
  workdir = str(root / "proto")
  argv = ["--shape", pruned, "--inherit", pruned, "--teacher", teacher, "--seeds", "2", "--workdir", workdir,
          "--latency_batch_sizes", "1,2", "--latency_runs", "2"] + TINY
  assert protocol_cli.main(argv) == 0
  return workdir, pruned, argv


def results_of(workdir, variant):
  return [json.load(open(os.path.join(workdir, variant, f"seed{k}", "result.json"))) for k in range(2)]


@pytest.mark.slow  # eight resnet8 trainings in the fixture: a minute and a half on two cold cores
def test_protocol_trains_every_variant_with_two_seeds(finished, teacher):
  workdir, pruned, _ = finished
  summary = json.load(open(os.path.join(workdir, "protocol.json")))
  shape = shape_files.load(pruned)
  assert summary["label"] == "l1" and summary["seeds"] == 2 and summary["recipe"] == "smoke"
  assert summary["macs"] == cost.count(shape).macs and summary["params"] == cost.count(shape).params
  assert set(summary["variants"]) == set(protocol.VARIANTS)
  expected = {"kd": ("kd", "epochs"), "scratch-e": ("scratch", "epochs"), "scratch-b": ("scratch", "flops"),
              "finetune": ("finetune", "epochs")}
  full = cost.count(shape_files.preset("resnet8")).macs
  for variant, entry in summary["variants"].items():
    results = results_of(workdir, variant)
    assert entry["n"] == 2 and [r["seed"] for r in results] == [0, 1]
    assert [(r["mode"], r["budget"]) for r in results] == [expected[variant]] * 2
    top1 = [r["test_top1"] for r in results]
    assert entry["test_top1"] == top1
    assert entry["test_top1_mean"] == pytest.approx(statistics.mean(top1))
    assert entry["test_top1_std"] == pytest.approx(statistics.stdev(top1))
    assert entry["macs"] == summary["macs"] and entry["recipe"] == "smoke"
    assert set(entry["latency"]) == {"1", "2"} and entry["latency"]["1"]["median_ms"] > 0
  assert summary["variants"]["scratch-b"]["epochs"] == int(1 * full / summary["macs"]) > 1
  assert summary["variants"]["scratch-e"]["epochs"] == 1 and summary["variants"]["finetune"]["epochs"] == 1
  assert results_of(workdir, "kd")[0]["teacher"] == teacher
  assert results_of(workdir, "finetune")[0]["init_from"] == baselines.weights_dir(pruned)
  md = open(os.path.join(workdir, "protocol.md")).read()
  rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
  assert len(rows) == 5  # four variants and the teacher
  for line, variant in zip(rows, protocol.VARIANTS):
    entry = summary["variants"][variant]
    assert line.startswith(f"| {protocol.TITLES[variant]} |") and "| 2/2 |" in line
    assert f"{100 * entry['test_top1_mean']:.2f} ± {100 * entry['test_top1_std']:.2f}" in line
  assert rows[-1].startswith("| unpruned (teacher) |")


@pytest.mark.slow  # eight resnet8 trainings in the fixture: a minute and a half on two cold cores
def test_protocol_skips_finished_runs_and_resumes_unfinished_ones(finished, teacher):
  workdir, pruned, _ = finished
  calls = []

  def counting(config, run_dir):
    calls.append((config.mode, config.budget, config.seed, run_dir))
    return train.run(config, run_dir)

  os.remove(os.path.join(workdir, "scratch-e", "seed1", "result.json"))
  overrides = [v for k, v in zip(TINY, TINY[1:]) if k == "--set"] + ["num_train_examples=32", "batch_size=16"]
  summary = protocol.run(pruned, teacher, 2, workdir, recipe="smoke", inherit=pruned, overrides=overrides,
                         latency_batch_sizes=(), train_fn=counting)
  assert calls == [("scratch", "epochs", 1, os.path.join(workdir, "scratch-e", "seed1"))]
  assert os.path.isfile(os.path.join(workdir, "scratch-e", "seed1", "result.json"))
  assert all(e["n"] == 2 for e in summary["variants"].values())


@pytest.mark.slow  # eight resnet8 trainings in the fixture: a minute and a half on two cold cores
def test_protocol_refuses_bad_requests(tmp_path, teacher, finished, capsys):
  _, pruned, _ = finished
  base = ["--shape", pruned, "--teacher", teacher, "--seeds", "1", "--workdir", str(tmp_path / "p")]
  for argv, message in [
      (["--shape", pruned, "--teacher", str(tmp_path / "none"), "--seeds", "1", "--workdir", str(tmp_path / "p")],
       "does not exist"),
      (base + ["--set", "learning_rate=0.1"], "unknown training configuration key 'learning_rate'"),
      (base + ["--set", "seed=3"], "seed is set by the command"),
      (base + ["--variants", "finetune"], "needs --inherit"),
      (base + ["--recipe", "fast"], "unknown recipe 'fast'"),
      (base + ["--inherit", str(tmp_path / "none.json")], "does not exist"),
      (base + ["--config.epochs=many"], "cannot read epochs='many' as a int")]:
    assert protocol_cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "p")  # refused before anything was written


@pytest.mark.slow  # eight resnet8 trainings in the fixture: a minute and a half on two cold cores
def test_compare_counts_what_it_shows(finished, teacher, tmp_path, capsys):
  workdir, _, _ = finished
  one = os.path.join(workdir, "scratch-e", "seed1")
  dirs = [workdir, teacher, os.path.join(workdir, "kd"), one]
  rows = protocol.collect(dirs)
  assert len(rows) == 4 + 1 + 1 + 1
  assert [r.variant for r in rows] == list(protocol.VARIANTS) + ["base", "kd", "scratch-e"]
  assert [r.label for r in rows] == ["l1"] * 4 + ["unpruned", "l1", "l1"]
  for r, variant in zip(rows[:4], protocol.VARIANTS):
    top1 = [x["test_top1"] for x in results_of(workdir, variant)]
    assert r.n == 2 and r.top1 == top1 and r.top1_mean == pytest.approx(statistics.mean(top1))
  t = json.load(open(os.path.join(teacher, "result.json")))
  assert (rows[4].n, rows[4].top1_mean, rows[4].macs, rows[4].params, rows[4].ratio) == (
      1, t["test_top1"], t["macs"], t["params"], 1.0)
  r = json.load(open(os.path.join(one, "result.json")))
  assert (rows[6].top1_mean, rows[6].top1_std, rows[6].macs, rows[6].epochs) == (r["test_top1"], 0.0, r["macs"],
                                                                                  r["epochs"])
  out, png, js = (str(tmp_path / n) for n in ("cmp.md", "cmp.png", "cmp.json"))
  assert compare_cli.main(dirs + ["--out", out, "--png", png, "--json", js]) == 0
  printed = capsys.readouterr().out
  table = open(out).read()
  assert printed == table
  lines = table.strip().splitlines()
  assert len(lines) == 2 + len(rows)
  assert f"| {100 * r['test_top1']:.2f} |" in lines[-1] and f"{r['macs']:,}" in lines[-1]
  assert f"| {100 * t['test_top1']:.2f} |" in lines[6] and "| 1.0000 |" in lines[6]
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
  assert len(json.load(open(js))) == len(rows)


def test_compare_refuses_what_it_cannot_read(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  for argv, message in [([str(tmp_path / "missing")], "no such directory"),
                        ([str(tmp_path / "empty")], "neither a finished training run")]:
    assert compare_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_overrides_and_labels():
  c = train_configs.get_config("resnet8,smoke")
  protocol.apply_overrides(c, ["milestones=3,6", "nesterov=false", "lr=0.05", "epochs=4", "dataset=cifar10"])
  assert (c.milestones, c.nesterov, c.lr, c.epochs, c.dataset) == ((3, 6), False, 0.05, 4, "cifar10")
  assert protocol.config_flags_to_set(["--config.lr=0.1", "--config.epochs", "3", "--seeds", "2"]) == [
      "--set", "lr=0.1", "--set", "epochs=3", "--seeds", "2"]
  assert protocol.family_preset(shape_files.preset("tas-c10-resnet56")) == "resnet56"
  assert protocol.family_preset(shape_files.preset("imagenet-resnet50")) == "imagenet-resnet50"
  assert protocol.label_for("tas-c10-resnet20") == "searched"
  assert protocol.label_for("resnet20", shape=shape_files.preset("resnet20")) == "unpruned"
  assert tables.mean_std([0.5]) == (0.5, 0.0)
