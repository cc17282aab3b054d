"""The study command: band check, significance rule, configuration at the door, and the smoke preset end to end."""

import json
import math
import os
import subprocess
import sys

import pytest

from tas_jax.configs import study as study_configs
from tas_jax import baselines

from tas_jax.programs import study
from tas_jax.report import study as study_report
from tas_jax.core import shape_files
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**changes) -> study.StudyConfig:
  c = study_configs.get_config("smoke").to_dict()
  # One device: the test process has 8 fake ones, and sharding 16-example batches 8 ways only adds compile time.
  c["train_overrides"] += ";num_devices=1"
  c["search_overrides"] += ";num_devices=1"
  c.update(changes)
  return study.StudyConfig.from_mapping(c)


# ----------------------------------------------------------------------------- band

def test_band_check_refuses_an_out_of_band_shape():
  base = shape_files.preset("resnet20")
  inside = baselines.uniform(base, 0.5, 0.02)
  assert abs(study.check_band(inside, 0.5, 0.05) - baselines.macs_ratio(inside)) < 1e-12
  outside = baselines.uniform(base, 0.3, 0.02)
  with pytest.raises(study.StudyError, match=r"outside the band \[0\.4500, 0\.5500\]"):
    study.check_band(outside, 0.5, 0.05, "uniform")
  with pytest.raises(study.StudyError, match="outside the band"):
    study.check_band(base, 0.5, 0.05)  # the unpruned network itself


def test_a_baseline_out_of_band_is_refused_before_training(tmp_path):
  """A stored baseline shape that no longer fits the band (e.g. after changing the target) stops the study."""
  cfg = smoke_config()
  out = str(tmp_path)
  baselines.save(baselines.uniform(cfg.base_shape(), 0.3, 0.05), os.path.join(out, "shapes", "uniform.json"))

  def never(*a, **k):
    raise AssertionError("nothing may train")

  with pytest.raises(study.StudyError, match="uniform.*outside the band"):
    study.run(cfg, out, train_fn=never, search_fn=never)


# ----------------------------------------------------------------------------- significance

def test_significance_against_a_hand_computation():
  a, b = [0.90, 0.92], [0.85, 0.86]
  # means 0.91 and 0.855; sample variances 2e-4 and 5e-5; se = sqrt(2e-4/2 + 5e-5/2) = sqrt(1.25e-4)
  se = math.sqrt(1.25e-4)
  s = study_report.significance(a, b)
  assert s["diff"] == pytest.approx(0.055)
  assert s["se"] == pytest.approx(se)
  assert s["t"] == pytest.approx(0.055 / se)  # 4.919
  # Welch-Satterthwaite: (1e-4 + 2.5e-5)^2 / ((1e-4)^2 / 1 + (2.5e-5)^2 / 1)
  assert s["df"] == pytest.approx(1.5625e-8 / 1.0625e-8)
  assert s["significant"] is True and s["verdict"] == "higher"
  # A difference under 2 se is noise: 0.91 vs 0.90 with the same spreads (t = 0.894).
  s = study_report.significance(a, [0.895, 0.905])
  assert s["significant"] is False and s["verdict"] == "within seed noise"
  # The rule is symmetric in sign.
  assert study_report.significance(b, a)["verdict"] == "lower"
  # One seed a side: no noise estimate, no verdict.
  s = study_report.significance([0.9], [0.8, 0.81])
  assert s["significant"] is None and s["se"] is None and "too few" in s["verdict"]


def test_comparisons_pool_shapes_of_a_method_and_skip_out_of_band_ones():
  def row(name, method, values, in_band=True):
    return {"name": name, "method": method, "in_band": in_band,
            "variants": {"kd": {"test_top1": values}}}

  rows = [row("tas-s0", "tas", [0.90]), row("tas-s1", "tas", [0.92]), row("tas-paper", "tas-paper", [0.99, 0.99], False),
          row("random-d0", "random", [0.85]), row("random-d1", "random", [0.86]), row("uniform", "uniform", [0.8, 0.7])]
  out = study_report.comparisons(rows, ["kd"])
  assert [(c["a"], c["b"]) for c in out] == [("tas", "uniform"), ("tas", "random")]
  assert out[1]["n_a"] == 2 and out[1]["n_b"] == 2 and out[1]["t"] == pytest.approx(0.055 / math.sqrt(1.25e-4))


# ----------------------------------------------------------------------------- configuration

def test_configuration_is_checked_at_the_door():
  cfg = smoke_config()
  assert cfg.variants == ("scratch", "kd") and cfg.latency_batch_sizes == ()
  assert "num_devices=1" in cfg.train_overrides
  for bad, message in [({"tolerance": 1.5}, "tolerance"), ({"variants": "scratch,finetune"}, "variants"),
                       ({"seeds": 0}, "seeds"), ({"model": "resnet7"}, "model"), ({"paper_shape": "nope"}, "preset"),
                       ({"paper_shape": "tas-c10-resnet56"}, "not a shape of resnet8"),
                       ({"train_overrides": "no_such_key=1"}, "no_such_key"), ({"recipe": "fast"}, "recipe"),
                       ({"search_seeds": 0}, "nothing searched"), ({"epochs": "ten"}, "epochs"),
                       ({"colour": "red"}, "unknown study key")]:
    with pytest.raises(study.StudyError, match=message):
      smoke_config(**bad)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
  cmd = [sys.executable, "-m", "tas_jax.cli.study", "--config", "tas_jax/configs/study.py:smoke",
         "--config.tolerance=2", "--workdir", str(tmp_path / "s")]
  p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and "tolerance" in lines[-1]
  assert not os.path.exists(tmp_path / "s")


# ----------------------------------------------------------------------------- orchestration

def _fake_programs(calls, uniform_ratio):
  """Stand-ins for train.run and search.run that write what the real ones leave behind, instantly."""
  from tas_jax.runtime import files

  def fake_train(config, workdir):
    name = os.path.basename(os.path.dirname(config.shape)) if config.shape else "teacher"
    calls.append((name, config.mode, int(config.seed)))
    shape = shape_files.load(config.shape) if config.shape else shape_files.preset(config.model)
    os.makedirs(os.path.join(workdir, "model"), exist_ok=True)
    if config.mode == "base":
      shape_files.save(shape, os.path.join(workdir, "model", "shape.json"))
    # Searched shapes score 0.6 + seed noise, the others 0.5 + seed noise.
    top1 = (0.6 if name.startswith("tas") else 0.5) + 0.01 * int(config.seed)
    files.write_json(os.path.join(workdir, "result.json"), {"finished": True, "test_top1": top1, "seed": config.seed,
                                                            "mode": config.mode, "epochs": config.epochs, "macs": 1, "params": 1})
    return {"finished": True}

  def fake_search(config, workdir):
    calls.append(("search", "search", int(config.seed)))
    base = shape_files.preset(config.model)
    os.makedirs(workdir, exist_ok=True)
    shape_files.save(baselines.uniform(base, uniform_ratio, 0.05), os.path.join(workdir, "shape.json"))
    files.write_json(os.path.join(workdir, "result.json"), {"finished": True, "flops_ratio": uniform_ratio})
    return {"finished": True}

  return fake_train, fake_search


def test_study_trains_seeds_in_rounds_and_reruns_skip_finished_runs(tmp_path):
  cfg = smoke_config(seeds=2, search_seeds=2, l1=False, random_draws=1)
  calls = []
  fake_train, fake_search = _fake_programs(calls, 0.48)
  out = str(tmp_path / "study")
  summary = study.run(cfg, out, train_fn=fake_train, search_fn=fake_search)
  assert calls[:3] == [("teacher", "base", 0), ("search", "search", 0), ("search", "search", 1)]
  shape_runs = calls[3:]
  # Round 1 trains seed 0 of every shape (scratch, then kd), round 2 seed 1.
  assert [c[2] for c in shape_runs] == [0] * 8 + [1] * 8
  assert [c[0] for c in shape_runs[:8:2]] == ["tas-s0", "tas-s1", "uniform", "random-d0"]
  assert [c[1] for c in shape_runs[:2]] == ["scratch", "kd"]
  by = {(c["variant"], c["b"]): c for c in summary["comparisons"]}
  # TAS pools two searches x two seeds: [0.6, 0.61, 0.6, 0.61] against [0.5, 0.51].
  c = by[("kd", "uniform")]
  assert (c["n_a"], c["n_b"]) == (4, 2) and c["diff"] == pytest.approx(0.1) and c["verdict"] == "higher"
  md = open(os.path.join(out, study_report.MD_FILE)).read()
  assert "TAS higher" in md and "| tas-s1 | tas |" in md
  assert os.path.getsize(os.path.join(out, study_report.PNG_FILE)) > 0

  def never(*a, **k):
    raise AssertionError("a finished run was trained again")

  assert study.run(cfg, out, train_fn=never, search_fn=never)["shapes"] == summary["shapes"]


def test_an_out_of_band_searched_shape_is_trained_but_flagged(tmp_path):
  cfg = smoke_config(seeds=1, l1=False, random_draws=0)
  fake_train, fake_search = _fake_programs([], 0.3)
  summary = study.run(cfg, str(tmp_path), train_fn=fake_train, search_fn=fake_search)
  tas = summary["shapes"][0]
  assert tas["name"] == "tas-s0" and not tas["in_band"] and tas["variants"]["kd"]["n"] == 1
  assert summary["comparisons"] == []  # nothing in band to compare it with
  assert "**no** (flagged)" in open(os.path.join(tmp_path, study_report.MD_FILE)).read()


def test_cli_ends_by_printing_the_study_table(tmp_path, monkeypatch, capsys):
  """Catches the command failing at its last line, after the whole study has run (its table never printed)."""
  import ml_collections
  from tas_jax.cli import study as study_cli
  fake_train, fake_search = _fake_programs([], 0.48)
  real = study.run
  monkeypatch.setattr(study_cli.study, "run", lambda cfg, workdir, **kw: real(cfg, workdir, train_fn=fake_train,
                                                                              search_fn=fake_search, **kw))
  config = ml_collections.ConfigDict(dict(smoke_config().__dict__, seeds=1, l1=False, random_draws=1,
                                          variants="kd", train_overrides="", search_overrides=""))
  study_cli.main(config, str(tmp_path / "s"))
  out = capsys.readouterr().out
  assert "round 1/1 done" in out and "| tas-s0 | tas |" in out, out[-2000:]


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_smoke_preset_end_to_end_and_rerun_skips_everything(tmp_path):
  cfg = smoke_config()
  out = str(tmp_path / "study")
  summary = study.run(cfg, out)
  names = [r["name"] for r in summary["shapes"]]
  assert names == ["tas-s0", "uniform", "random-d0", "l1"]
  for r in summary["shapes"]:
    assert r["in_band"] and abs(r["ratio"] - 0.5) <= 0.05 + 1e-9
    for v in ("scratch", "kd"):
      assert r["variants"][v]["n"] == 1 and 0.0 <= r["variants"][v]["mean"] <= 1.0
  assert {(c["variant"], c["b"]) for c in summary["comparisons"]} == {
      (v, b) for v in ("scratch", "kd") for b in ("uniform", "random", "l1")}
  for name in (study_report.JSON_FILE, study_report.MD_FILE, study_report.PNG_FILE):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, study_report.JSON_FILE)) as f:
    assert json.load(f)["shapes"][0]["method"] == "tas"
  md = open(os.path.join(out, study_report.MD_FILE)).read()
  assert "| tas-s0 | tas |" in md and "## Significance" in md
  # The searched shape is the search's shape.json.
  assert shape_files.load(os.path.join(out, "shapes", "tas-s0.json")) == shape_files.load(
      os.path.join(out, "search", "seed0", "shape.json"))

  def never(*a, **k):
    raise AssertionError("a finished run was trained again")

  again = study.run(cfg, out, train_fn=never, search_fn=never)
  assert again["shapes"] == summary["shapes"]
