"""The pipeline: stage configs and wiring, skipping finished stages, resuming, refusing stale ones; one real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import report_test
from conftest import ROOT
from tas_jax.cli import pipeline as pipeline_cli
from tas_jax.configs import pipeline as pipeline_configs
from tas_jax.runtime import runs
from tas_jax.runtime import files


from tas_jax.programs import pipeline
from tas_jax.runtime import stages as pipeline_dir
from tas_jax.core import shape_files
def test_presets_build():
  for name in pipeline_configs.PRESETS:
    c = pipeline_configs.get_config(name)
    assert c.base.mode == "base" and c.kd.mode == "kd"
    assert c.search.dataset == c.base.dataset == c.dataset
  paper = pipeline_configs.get_config("cifar100-resnet56")
  assert (paper.dataset, paper.model, paper.base.epochs, paper.search.epochs) == ("cifar100", "resnet56", 300, 600)
  assert paper.target_flops_ratio == 0.47 and paper.kd.recipe == "official"
  with pytest.raises(ValueError, match="unknown pipeline preset"):
    pipeline_configs.get_config("nope")


def test_stage_configs_share_keys_and_wire_paths():
  c = pipeline_configs.get_config("demo")
  c.dataset, c.seed, c.model, c.target_flops_ratio, c.num_train_examples = "cifar100", 3, "resnet8", 0.6, 100
  stages = {s: pipeline.stage_config(c, "runs/x/", s) for s in pipeline_dir.STAGES}
  for s in ("base", "search", "kd"):
    assert (stages[s].dataset, stages[s].seed, stages[s].model, stages[s].num_train_examples) == \
        ("cifar100", 3, "resnet8", 100), s
  assert stages["search"].target_flops_ratio == 0.6 and "target_flops_ratio" not in stages["base"]
  assert stages["base"].mode == "base" and stages["kd"].mode == "kd"
  assert stages["kd"].shape == os.path.join("runs", "x", "search", "shape.json")
  assert stages["kd"].teacher == os.path.join("runs", "x", "base")
  assert c.kd.shape == ""  # the pipeline config itself is left alone
  p = stages["protocol"]
  assert p.shape == stages["kd"].shape and p.teacher == p.inherit == stages["kd"].teacher
  assert p.recipe == "official" and p.variants == ("scratch-e", "scratch-b", "finetune") and p.seeds == 1
  # The baselines train like the kd stage: its departures from the recipe become overrides.
  assert {"dataset=cifar100", "epochs=5", "batch_size=64", "num_train_examples=100"} <= set(p.overrides)
  assert p.overrides[-2:] == ("finetune_epochs=2", "finetune_lr=0.01")
  assert not any(o.split("=")[0] in ("seed", "mode", "shape", "teacher") for o in p.overrides)
  c.baselines.recipe = "rethinking"
  p = pipeline.stage_config(c, "runs/x", "protocol")
  assert p.recipe == "rethinking" and "epochs=5" not in p.overrides and "dataset=cifar100" in p.overrides


def test_stage_commands_rerun_a_stage_alone():
  c = pipeline_configs.get_config("demo")
  c.protocol = True
  base = pipeline_cli.stage_command("base", pipeline.stage_config(c, "runs/d", "base"), "runs/d/base")
  assert base.startswith("python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet14,official ")
  assert "--config.epochs=5" in base and "--config.dataset=synthetic" in base and base.endswith("--workdir runs/d/base")
  assert "--config.lr=" not in base  # only what differs from the recipe
  search = pipeline_cli.stage_command("search", pipeline.stage_config(c, "runs/d", "search"), "runs/d/search")
  assert search.startswith("python -m tas_jax.cli.search --config tas_jax/configs/search.py:resnet14,official")
  proto = pipeline_cli.stage_command("protocol", pipeline.stage_config(c, "runs/d", "protocol"), "runs/d/protocol")
  assert "--shape runs/d/search/shape.json --teacher runs/d/base" in proto and "--set epochs=5" in proto


class FakeStages:
  """Stand-in runners that write what the real stages write, counting calls; ``stop`` makes one stop early."""

  def __init__(self, stop: dict | None = None):
    self.calls: list[str] = []
    self.stop = dict(stop or {})

  def runner(self, stage):
    def run(config, workdir, distributed=None, *, command=""):
      self.calls.append(stage)
      if self.stop.get(stage, 0) > 0:
        self.stop[stage] -= 1
        os.makedirs(workdir, exist_ok=True)
        return {"finished": False, "step": 1}
      root = os.path.dirname(workdir)
      if stage == "base":
        report_test.write_base(root)
      elif stage == "search":
        report_test.write_search(root)
      elif stage == "kd":
        assert os.path.isfile(config.shape) and os.path.isdir(config.teacher)
        report_test.write_kd(root)
      else:
        report_test.write_protocol(root)
      if stage != "protocol":
        files.write_json(os.path.join(workdir, "config.json"), config.record())
      return {"finished": True}

    return run


def small_config(protocol=False):
  c = pipeline_configs.get_config("demo")
  c.protocol = protocol
  c.baselines.seeds = 2
  return c


def test_finished_stages_are_skipped_and_stopped_ones_resumed(tmp_path, monkeypatch):
  fake = FakeStages(stop={"search": 1})
  monkeypatch.setattr(pipeline, "_runner", fake.runner)
  workdir = str(tmp_path / "p")
  seen = []
  out = pipeline.run(small_config(), workdir, report=False, on_stage=lambda s, st: seen.append((s, st)))
  assert not out["finished"] and out["stages"] == {"base": "done", "search": "stopped"}
  assert fake.calls == ["base", "search"]
  state = pipeline_dir.read_state(workdir)
  assert state["stages"]["search"]["status"] == "stopped" and not state["finished"]
  base_result = os.path.join(workdir, "base", "result.json")
  mtime = os.stat(base_result).st_mtime_ns
  out = pipeline.run(small_config(), workdir, report=False, on_stage=lambda s, st: seen.append((s, st)))
  assert out["finished"] and out["stages"] == {"base": "skipped", "search": "done", "kd": "done"}
  assert fake.calls == ["base", "search", "search", "kd"]
  assert os.stat(base_result).st_mtime_ns == mtime
  state = pipeline_dir.read_state(workdir)
  assert state["stages"]["search"]["invocations"] == 2 and state["finished"]
  assert all(state["stages"][s]["status"] == "done" for s in ("base", "search", "kd"))
  assert ("kd", "started") in seen and ("base", "skipped") in seen
  # Everything done: nothing runs, the report is written.
  out = pipeline.run(small_config(), workdir)
  assert fake.calls == ["base", "search", "search", "kd"] and set(out["stages"].values()) == {"skipped"}
  assert out["report"] == os.path.join(workdir, "report.md") and os.path.isfile(out["report"])
  # Asking for the baselines afterwards runs only them.
  out = pipeline.run(small_config(protocol=True), workdir, report=False)
  assert fake.calls[-1] == "protocol" and out["stages"]["protocol"] == "done"
  assert pipeline_dir.is_complete(workdir, "protocol", pipeline.stage_config(small_config(True), workdir, "protocol"))
  more = small_config(True)
  more.baselines.seeds = 3
  assert not pipeline_dir.is_complete(workdir, "protocol", pipeline.stage_config(more, workdir, "protocol"))


def test_incomplete_results_are_not_finished(tmp_path):
  root = str(tmp_path)
  report_test.write_base(root)
  assert pipeline_dir.is_complete(root, "base")
  os.remove(os.path.join(root, "base", "model", "shape.json"))  # no teacher to distil from
  assert not pipeline_dir.is_complete(root, "base")
  report_test.write_search(root)
  with open(os.path.join(root, "search", "result.json"), "w") as f:
    f.write('{"finished": tr')  # cut short
  assert not pipeline_dir.is_complete(root, "search")


def test_a_finished_stage_under_another_configuration_is_refused(tmp_path, monkeypatch):
  fake = FakeStages()
  monkeypatch.setattr(pipeline, "_runner", fake.runner)
  workdir = str(tmp_path / "p")
  pipeline.run(small_config(), workdir, report=False)
  changed = small_config()
  before, changed.search.epochs = changed.search.epochs, 7
  with pytest.raises(runs.RunError, match=rf"stage search .* another configuration \(epochs: {before} -> 7\)"):
    pipeline.run(changed, workdir, report=False)
  harmless = small_config()
  harmless.kd.log_every_steps = 1  # does not change what is trained
  assert pipeline.run(harmless, workdir, report=False)["finished"]
  # A search run again (another shape) leaves the distilled network stale.
  shape = shape_files.load(os.path.join(workdir, "search", "shape.json"))
  shape_files.save(shape.replace(blocks=(3, 3, 3)), os.path.join(workdir, "search", "shape.json"))
  with pytest.raises(runs.RunError, match=r"stage kd .* another configuration \(searched shape: "):
    pipeline.run(small_config(), workdir, report=False)


def test_report_only_command_line(tmp_path):
  root = report_test.make_standin(tmp_path / "p", protocol=False)
  out = subprocess.run([sys.executable, "-m", "tas_jax.cli.pipeline", "--config",
                        "tas_jax/configs/pipeline.py:demo", "--workdir", root, "--report_only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stderr
  assert f"report: {os.path.join(root, 'report.md')}" in out.stdout
  bad = subprocess.run([sys.executable, "-m", "tas_jax.cli.pipeline", "--config",
                        "tas_jax/configs/pipeline.py:nope", "--workdir", root], cwd=ROOT, capture_output=True,
                       text=True, timeout=180)
  assert bad.returncode != 0 and "unknown pipeline preset" in bad.stderr


def tiny_config():
  """A ResNet-8 pipeline on a few hundred synthetic examples: every stage runs for real, in about a minute."""
  c = pipeline_configs.get_config("demo")
  c.model = "resnet8"
  c.num_train_examples = 128
  for stage in (c.base, c.kd):
    stage.epochs = 2
    stage.batch_size = 32
    stage.eval_batch_size = 200
    stage.eval_every_epochs = 0
    stage.log_every_steps = 2
  c.search.epochs = 2
  c.search.batch_size = 32
  c.search.eval_examples = 64
  return c


@pytest.mark.slow  # `make demo` runs the same stages at full demo size
def test_end_to_end_on_synthetic_data(tmp_path):
  workdir = str(tmp_path / "p")
  out = pipeline.run(tiny_config(), workdir, command="python -m tas_jax.cli.pipeline ...")
  assert out["finished"] and out["stages"] == {"base": "done", "search": "done", "kd": "done"}
  searched = shape_files.load(os.path.join(workdir, "search", "shape.json"))
  kd = json.load(open(os.path.join(workdir, "kd", "result.json")))
  assert kd["shape"] == searched.to_dict() and kd["teacher"] == os.path.join(workdir, "base")
  text = open(out["report"]).read()
  for name in report_test.FIGURES:
    assert f"figures/{name}" in text and os.path.isfile(os.path.join(workdir, "figures", name)), name
  mtimes = {s: os.stat(os.path.join(workdir, s, "result.json")).st_mtime_ns for s in ("base", "search", "kd")}
  again = pipeline.run(tiny_config(), workdir, report=False)
  assert again["stages"] == {"base": "skipped", "search": "skipped", "kd": "skipped"}
  assert {s: os.stat(os.path.join(workdir, s, "result.json")).st_mtime_ns for s in mtimes} == mtimes
