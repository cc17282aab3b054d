import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from tas_jax import data
from tas_jax.cli import latency as latency_cli
from tas_jax.configs import train as train_configs
from tas_jax.core import cost, shape_files, shapes
from tas_jax.latency import measure as latency
from tas_jax.nets import resnet, surgery
from tas_jax.programs import train
from tas_jax.runtime import models, runs, settings
from tas_jax.runtime.settings import TrainSettings
from tas_jax.steps import train as train_lib

# resnet8 with a pruned stage-1 block whose input (16) and output (12) widths
# differ: a stride-1 projection the unpruned network does not have.
PRUNED = shape_files.preset("resnet8").replace(widths=(16, 8, 12, 24, 32, 48, 64))


def tiny_config(mode="base", **overrides):
  c = train_configs.get_config("resnet8,smoke")
  c.mode = mode
  c.batch_size = 16
  c.eval_batch_size = 200
  c.num_train_examples = 64  # 4 steps per epoch
  c.epochs = 2
  c.log_every_steps = 2
  c.finetune_epochs = 1
  c.finetune_lr = 0.01
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def records(workdir, key="loss"):
  return [(r["step"], r[key]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if key in r]


def eval_logits(model, seed=0, n=8):
  images = jax.random.normal(jax.random.key(seed), (n, 32, 32, 3))
  return np.asarray(model(images))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("base"))
  result = train.run(tiny_config(), workdir)
  assert result["finished"]
  return workdir


def test_base_run_outputs(base_run):
  result = json.load(open(os.path.join(base_run, "result.json")))
  for key in ("test_top1", "test_top5", "macs", "params", "epochs", "mode", "recipe", "shape", "seed", "wall_s",
              "train_images_per_s"):
    assert key in result, key
  assert result["mode"] == "base" and result["recipe"] == "smoke" and result["epochs"] == 2
  assert result["macs"] == cost.count(shape_files.preset("resnet8")).macs
  assert 0.0 <= result["test_top1"] <= result["test_top5"] <= 1.0 and result["train_images_per_s"] > 0
  losses = records(base_run)
  assert [s for s, _ in losses] == [2, 4, 6, 8]
  assert {"lr", "train_acc"} <= set(json.loads(open(os.path.join(base_run, "metrics.jsonl")).readline()))


def test_epoch_line_names_the_figures_of_the_epoch():
  """Catches an epoch summary that drops the evaluation of the epoch or shows another epoch's number."""
  t = types.SimpleNamespace(plan=types.SimpleNamespace(epochs=30))
  record = {"epoch_loss": 1.23456, "epoch_train_acc": 0.5, "epoch_lr": 0.05, "test_top1": 0.61234, "step": 40}
  assert train.epoch_line(t, 3, record) == "epoch 4/30; loss 1.2346; train acc 0.5000; lr 0.05; test top-1 0.6123"


def test_load_model_round_trip(base_run):
  shape, model = models.load_model(base_run)
  assert shape == shape_files.preset("resnet8")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ds = data.load("synthetic")
  logits = model(data.normalize(ds.test_images, ds.mean, ds.std))
  top1 = float((np.asarray(logits).argmax(-1) == ds.test_labels).mean())
  result = json.load(open(os.path.join(base_run, "result.json")))
  assert abs(top1 - result["test_top1"]) <= 2e-3  # 8-device vs 1-device float sums may flip a near tie
  _, again = models.load_model(os.path.join(base_run, "model"))
  np.testing.assert_array_equal(eval_logits(model), eval_logits(again))
  with pytest.raises(runs.RunError, match="no trained model"):
    models.load_model(os.path.join(base_run, "checkpoints"))


def test_scratch_b_epochs_and_schedules():
  assert train_lib.scratch_b_epochs(160, 2_000, 1_000) == 320
  assert train_lib.scratch_b_epochs(160, 1_000, 700) == 228  # int(228.57...)
  assert train_lib.scale_milestones((80, 120), 160, 228) == (114, 171)
  shape = shape_files.preset("tas-c10-resnet20")
  full, mine = cost.count(shape_files.preset("resnet20")).macs, cost.count(shape).macs
  c = train_configs.get_config("resnet20,rethinking")
  c.mode, c.budget = "scratch", "flops"
  plan = train_lib.make_plan(c, shape)
  assert plan.epochs == int(160 * full / mine) > 160
  assert plan.milestones == (80 * plan.epochs // 160, 120 * plan.epochs // 160)
  assert plan.budget_ratio == pytest.approx(full / mine) and plan.warmup_epochs == 0
  c.budget = "epochs"
  assert train_lib.make_plan(c, shape).epochs == 160 and train_lib.make_plan(c, shape).milestones == (80, 120)
  o = train_configs.get_config("resnet20")
  assert train_lib.make_plan(o, shape) == train_lib.Plan(300, 300, 5, 0.1, "cosine", (), 0.1, False, 1.0)
  o.official_tail = True
  assert (train_lib.make_plan(o, shape).epochs, train_lib.make_plan(o, shape).schedule_epochs) == (305, 300)
  o.official_tail, o.epochs = False, 1
  assert train_lib.make_plan(o, shape).warmup_epochs == 0  # a 1-epoch run does not warm up
  o.epochs = 20
  assert train_lib.make_plan(o, shape).warmup_epochs == 2
  o.mode = "finetune"
  p = train_lib.make_plan(o, shape)
  assert (p.epochs, p.lr, p.lr_schedule, p.warmup_epochs) == (40, 0.001, "constant", 0)


def test_per_step_schedule_equals_the_per_epoch_one_but_anneals_within_epochs():
  steps = np.arange(0, 12 * 7)
  for kind, ms in (("multistep", (5, 9)), ("constant", ())):
    plan = train_lib.Plan(12, 12, 2, 0.1, kind, ms, 0.1, False, 1.0)
    per_step = np.asarray(jax.vmap(plan.lr_fn(7))(steps))
    per_epoch = np.asarray(jax.vmap(dataclasses.replace(plan, per_epoch=True).lr_fn(7))(steps))
    np.testing.assert_allclose(per_step, per_epoch, rtol=1e-6)  # warmup ramps every step either way
  one = train_lib.Plan(1, 1, 0, 0.1, "cosine", (), 0.1, False, 1.0)
  lrs = np.asarray(jax.vmap(one.lr_fn(10))(np.arange(10)))
  assert lrs[0] == pytest.approx(0.1) and np.all(np.diff(lrs) < 0) and lrs[-1] < 0.003
  assert np.all(np.asarray(jax.vmap(dataclasses.replace(one, per_epoch=True).lr_fn(10))(np.arange(10))) == lrs[0])


def test_finetune_inherits_weights(base_run):
  _, base = models.load_model(base_run)
  shape, net = train.initial_network(tiny_config("finetune", init_from=base_run), 10)
  assert shape == shape_files.preset("resnet8")
  net.eval()
  np.testing.assert_array_equal(eval_logits(net), eval_logits(base))  # the full shape reproduces the base exactly
  pruned = surgery.inherit(base, PRUNED)
  b0 = pruned.blocks[0]
  np.testing.assert_array_equal(np.asarray(b0.convs[0].conv.kernel[...]),
                                np.asarray(base.blocks[0].convs[0].conv.kernel[...])[:, :, :16, :8])
  np.testing.assert_array_equal(np.asarray(b0.convs[1].bn.mean[...]),
                                np.asarray(base.blocks[0].convs[1].bn.mean[...])[:12])
  np.testing.assert_array_equal(np.asarray(b0.shortcut.conv.kernel[...])[0, 0], np.eye(16, 12))
  np.testing.assert_array_equal(np.asarray(pruned.blocks[1].convs[0].conv.kernel[...]),
                                np.asarray(base.blocks[1].convs[0].conv.kernel[...])[:, :, :12, :24])
  np.testing.assert_array_equal(np.asarray(pruned.head.kernel[...]), np.asarray(base.head.kernel[...])[:64])
  with pytest.raises(shapes.ShapeError, match="channels"):
    surgery.inherit(pruned, shape_files.preset("resnet8"))  # wider than the source
  r14 = shape_files.preset("resnet14")
  with pytest.raises(shapes.ShapeError, match="drops it"):
    surgery.inherit(resnet.build(r14.replace(blocks=(1, 2, 2))), r14)


def test_resume_equals_uninterrupted(tmp_path, base_run):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  make = lambda **kw: tiny_config("finetune", init_from=base_run, finetune_epochs=2, **kw)
  assert train.run(make(), whole)["finished"]
  first = train.run(make(stop_after_steps=3), parts)
  assert first == {"finished": False, "step": 3} and not os.path.exists(os.path.join(parts, "result.json"))
  train.run(make(stop_after_steps=2), parts)  # 3 -> 5: a stop and a resume inside an epoch
  done = train.run(make(), parts)
  assert done["finished"] and done["mode"] == "finetune"
  _, a = models.load_model(whole)
  _, b = models.load_model(parts)
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert records(whole) == records(parts)
  with pytest.raises(runs.RunError, match="finetune_lr"):
    train.run(make(finetune_lr=0.5), parts)


def test_kd_runs_end_to_end(tmp_path, base_run):
  workdir = str(tmp_path / "kd")
  result = train.run(tiny_config("kd", teacher=base_run, shape=_save(PRUNED, tmp_path), val_examples=16,
                                 budget="flops", dtype="bfloat16"), workdir)
  assert result["finished"] and result["mode"] == "kd"
  assert result["epochs"] == int(2 * cost.count(shape_files.preset("resnet8")).macs / cost.count(PRUNED).macs)
  assert result["teacher_test_top1"] == json.load(open(os.path.join(base_run, "result.json")))["test_top1"]
  assert result["macs"] == cost.count(PRUNED).macs and 0 <= result["best_epoch"] < result["epochs"]
  assert "best_test_top1" in result and "val_top1" in result
  assert records(workdir, "kl") and records(workdir, "val_top1")
  shape, model = models.load_model(workdir)
  assert shape.widths == PRUNED.widths
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_bad_configurations_are_refused(tmp_path, base_run):
  with pytest.raises(settings.SettingsError, match="config.mode must be"):
    train.run(tiny_config("prune"), str(tmp_path / "a"))
  with pytest.raises(runs.RunError, match="config.teacher"):
    train.run(tiny_config("kd", shape="resnet8"), str(tmp_path / "b"))
  with pytest.raises(runs.RunError, match="config.shape"):
    train.run(tiny_config("scratch"), str(tmp_path / "c"))
  # Labels are facts: a shape of another network than config.model is refused, before anything is written.
  with pytest.raises(runs.RunError, match=r"config.shape \(resnet14\) is a pruned CIFAR ResNet \(basic blocks, stages "
                                          r"of 2/2/2\), but config.model resnet8 is the CIFAR ResNet \(basic blocks, "
                                          r"stages of 1/1/1\)"):
    train.run(tiny_config("finetune", init_from=base_run, shape="resnet14"), str(tmp_path / "d"))
  with pytest.raises(runs.RunError, match=r"config.model imagenet-resnet18 is the ImageNet ResNet"):
    train.run(tiny_config("kd", shape="resnet8", teacher=base_run, model="imagenet-resnet18"), str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()
  with pytest.raises(runs.RunError, match="config.init_from"):
    train.run(tiny_config("finetune"), str(tmp_path / "e"))


def _save(shape, tmp_path):
  path = str(tmp_path / "shape.json")
  shape_files.save(shape, path)
  return path


def test_latency_of_a_network_against_itself_is_exactly_one(capsys):
  """Catches the unpruned network timed apart from the row it is compared with (a speedup of 0.43 against itself)."""
  assert latency_cli.main(["resnet8", "resnet8", "tas-c10-resnet20", "--batch_sizes", "2", "--runs", "3", "--warmup",
                           "0", "--json"]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["speedup"] for r in rows[:2]] == [1.0, 1.0]
  assert rows[0]["median_ms"] == rows[1]["median_ms"]  # one network, measured once
  assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows)


def test_measure_latency_and_cli(capsys):
  m = latency.measure_latency(shape_files.preset("resnet8"), batch_size=2, runs=2, warmup=1)
  assert m["median_ms"] > 0 and m["images_per_s"] == pytest.approx(2000 / m["median_ms"])
  assert latency_cli.main(["resnet8", "--batch_sizes", "2", "--runs", "1", "--warmup", "0", "--no_speedup",
                           "--json"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["shape"] == "resnet8" and line["batch_size"] == 2 and line["macs"] == cost.count(
      shape_files.preset("resnet8")).macs
  proc = subprocess.run([sys.executable, "-m", "tas_jax.cli.latency", "resnet8", "no-such-shape"], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip().startswith("error: unknown preset 'no-such-shape'")
  assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a search compiles its supernet step: about a minute here
def test_finetune_from_a_search_run(tmp_path):
  from tas_jax.configs import search as search_configs
  from tas_jax.programs import search
  c = search_configs.get_config("smoke")
  c.model, c.batch_size, c.num_train_examples, c.eval_examples, c.epochs = "resnet8", 16, 64, 16, 1
  search_dir = str(tmp_path / "search")
  search.run(c, search_dir)
  searched = shape_files.load(os.path.join(search_dir, "shape.json"))
  shape, net = models.load_model(search_dir)  # the search's export of its final shape
  assert (shape.widths, shape.blocks) == (searched.widths, searched.blocks)
  workdir = str(tmp_path / "ft")
  result = train.run(tiny_config("finetune", init_from=search_dir), workdir)
  assert result["finished"] and result["shape"]["widths"] == list(searched.widths)


def test_imagenet_scratch_b_rule():
  """Catches the ImageNet Scratch-B rule drifting from Rethinking's main_B.py: the 2x cap (180 epochs, decays every
  60), int(90 * ratio) below it, and lr steps every epochs // 3 (including a third one below the end)."""
  assert train_lib.scratch_b_imagenet(90, 2_000, 1_000) == (180, (60, 120))
  assert train_lib.scratch_b_imagenet(90, 3_000, 1_000) == (180, (60, 120))  # capped
  assert train_lib.scratch_b_imagenet(90, 1_000, 700) == (128, (42, 84, 126))  # int(128.57), step 42
  assert train_lib.scratch_b_imagenet(90, 1_000, 1_000) == (90, (30, 60))
  base = shape_files.preset("imagenet-resnet18")
  shape = base.replace(widths=tuple(max(1, w * 3 // 4) for w in base.widths))
  full, mine = cost.count(base).macs, cost.count(shape).macs
  c = train_configs.get_config("imagenet-resnet18,rethinking-imagenet")
  c.mode, c.budget = "scratch", "flops"
  plan = train_lib.make_plan(c, shape)
  epochs = int(90 * full / mine) if full / mine < 2 else 180
  assert plan.epochs == epochs and plan.milestones == tuple(range(epochs // 3, epochs, epochs // 3))
  assert plan.lr_schedule == "multistep" and plan.warmup_epochs == 0
  c.budget = "epochs"
  assert (train_lib.make_plan(c, shape).epochs, train_lib.make_plan(c, shape).milestones) == (90, (30, 60))
  c.scratch_b_rule, c.budget = "cifar", "flops"  # the CIFAR rule: uncapped, milestones scaled
  new = int(90 * full / mine)
  assert train_lib.make_plan(c, shape).epochs == new
  assert train_lib.make_plan(c, shape).milestones == train_lib.scale_milestones((30, 60), 90, new)


def test_rethinking_recipes_follow_the_family():
  """Catches an ImageNet network silently getting Rethinking's CIFAR schedule (160 epochs, batch 64, decays at
  80/120), or a CIFAR network the ImageNet one."""
  c = train_configs.get_config("imagenet-resnet50,rethinking")
  assert c.recipe == "rethinking-imagenet" and c.epochs == 90 and c.milestones == (30, 60)
  assert (c.batch_size, c.lr, c.momentum, c.nesterov, c.weight_decay) == (256, 0.1, 0.9, False, 1e-4)
  assert (c.scratch_b_rule, c.color_augment, c.dataset, c.finetune_epochs) == ("imagenet", "off", "imagenet2012", 20)
  r = train_configs.get_config("resnet56,rethinking")
  assert (r.recipe, r.epochs, r.batch_size, r.scratch_b_rule) == ("rethinking", 160, 64, "cifar")
  with pytest.raises(ValueError, match="rethinking-imagenet is for imagenet"):
    train_configs.get_config("resnet56,rethinking-imagenet")
  r.model = "imagenet-resnet18"  # the CIFAR recipe with an ImageNet model swapped in afterwards
  with pytest.raises(runs.RunError, match="use the rethinking-imagenet recipe"):
    train.check_inputs(TrainSettings.resolve(r))
  c.model = "resnet20"
  with pytest.raises(runs.RunError, match="use the rethinking recipe"):
    train.check_inputs(TrainSettings.resolve(c))
  c.model, c.scratch_b_rule = "imagenet-resnet18", "capped"
  with pytest.raises(settings.SettingsError, match="config.scratch_b_rule must be"):
    TrainSettings.resolve(c)


def test_color_augmentation_is_on_for_streamed_sets_only():
  """Catches ImageNet training without TAS's colour jitter and lighting (or CIFAR training with them), and a train
  step that ignores the switch."""
  c = TrainSettings.resolve(train_configs.get_config("imagenet-resnet18"))
  assert c.color_augment == "auto" and train_lib.color_augment(c, True) and not train_lib.color_augment(c, False)
  assert not train_lib.color_augment(c.replace(color_augment="off"), True)
  assert train_lib.color_augment(c.replace(color_augment="on"), False)
  with pytest.raises(settings.SettingsError, match="config.color_augment must be"):
    c.replace(color_augment="yes")
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  key, mean, std = jax.random.key(1), data.IMAGENET_MEAN, data.IMAGENET_STD
  problem = train_lib.Problem(None, None, None, None, mean, std, True, 0, color=True)
  np.testing.assert_array_equal(np.asarray(train_lib._augment(problem, key, images)),
                                np.asarray(data.augment_imagenet(key, images, mean, std)))
  plain = dataclasses.replace(problem, color=False)
  np.testing.assert_array_equal(np.asarray(train_lib._augment(plain, key, images)),
                                np.asarray(data.flip_and_normalize(key, images, mean, std)))
