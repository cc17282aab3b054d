"""Fault injection, fast cases: bad input, refused and corrupt checkpoints, signals, non-finite losses.

Every fault must end in one clear line and a non-zero exit (or, in process,
one exception naming the problem) and leave whatever the run had written
intact. Most cases run the training program in this process on one tiny run
directory (resnet8 on 64 synthetic images, 12 steps) copied per case; the
command-line cases start their processes all at once. The long kill-and-resume
loops are in faults_slow_test.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import data_fixtures
from conftest import ROOT
from tas_jax.cli import compare as compare_cli
from tas_jax.configs import train as train_configs
from tas_jax.runtime import checkpoint, files, models, runs, metrics
from tas_jax.runtime.settings import TrainSettings

# Orbax leaves failed read coroutines behind when a restore of a damaged step fails.
from tas_jax import data
from tas_jax.programs import train
from tas_jax.steps import train as train_lib
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SEARCH_CONFIG = str(ROOT / "tas_jax" / "configs" / "search.py")
TRAIN_CONFIG = str(ROOT / "tas_jax" / "configs" / "train.py")
TINY_SEARCH = ["--config.model=resnet8", "--config.batch_size=16", "--config.num_train_examples=128",
               "--config.eval_examples=32"]
TINY_TRAIN = ["--config.model=resnet8", "--config.batch_size=16", "--config.eval_batch_size=200",
              "--config.num_train_examples=64"]


# ----------------------------------------------------------------------------- helpers (also used by the slow tests)

def env():
  """The test environment for a subprocess: this checkout importable, the compile cache and devices inherited."""
  return dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")


def command(program: str, config: str, workdir, *overrides: str) -> list[str]:
  return [sys.executable, "-m", f"tas_jax.cli.{program}", "--config", config, *overrides, f"--workdir={workdir}"]


def start(cmd: list[str]) -> subprocess.Popen:
  return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def records(workdir) -> list[dict]:
  return metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def steps_logged(workdir) -> int:
  """The newest step in metrics.jsonl (0 if none): how far a running program has got."""
  return max((r["step"] for r in records(workdir)), default=0)


def checkpoint_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def orbax_arrays(path) -> dict[str, np.ndarray]:
  """Every array of an Orbax pytree directory, read as numpy by tree path (no target needed)."""
  path = os.path.abspath(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def checkpoint_arrays(workdir, step: int | None = None) -> dict[str, np.ndarray]:
  """Every array of a checkpoint's state (default the newest)."""
  step = checkpoint_steps(workdir)[-1] if step is None else step
  return orbax_arrays(os.path.join(workdir, "checkpoints", str(step), "state"))


def assert_same_arrays(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def assert_same_run(done, reference, files=("shape.json", "shape_argmax.json", "arch_probs.jsonl")):
  """Same final checkpoint (bit for bit), metric records and outputs as an uninterrupted run."""
  assert checkpoint_steps(done)[-1] == checkpoint_steps(reference)[-1]
  assert_same_arrays(checkpoint_arrays(done), checkpoint_arrays(reference))
  assert records(done) == records(reference)
  for name in files:
    a, b = pathlib.Path(done) / name, pathlib.Path(reference) / name
    assert a.exists() == b.exists(), name
    if a.exists():
      assert a.read_text() == b.read_text(), name
  shapes_a, shapes_b = pathlib.Path(done) / "shapes", pathlib.Path(reference) / "shapes"
  if shapes_b.is_dir():
    assert sorted(os.listdir(shapes_a)) == sorted(os.listdir(shapes_b))
    for name in os.listdir(shapes_b):
      assert (shapes_a / name).read_text() == (shapes_b / name).read_text(), name


def tree_digest(workdir) -> dict[str, str]:
  """Path -> content hash of every file under a directory: what "nothing was touched" compares."""
  root = pathlib.Path(workdir)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def damage(step_dir: pathlib.Path) -> None:
  """Truncates the array data of a checkpoint step, as a disk error or a careless copy would."""
  files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  assert files, "unexpected checkpoint layout"
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(f.stat().st_size // 2)


# train_config() as command-line overrides of train.py:resnet8,smoke.
TRAIN_ARGS = ["--config.batch_size=16", "--config.eval_batch_size=200", "--config.num_train_examples=64",
              "--config.epochs=3", "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
              "--config.keep_checkpoints=3"]


def train_config(**overrides):
  """resnet8 on 64 synthetic images: 4 steps per epoch, 3 epochs, a checkpoint every 2 steps."""
  c = train_configs.get_config("resnet8,smoke")
  c.batch_size = 16
  c.eval_batch_size = 200
  c.num_train_examples = 64
  c.epochs = 3
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 3
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted training run: what every recovered run must equal."""
  workdir = str(tmp_path_factory.mktemp("faults") / "reference")
  assert train.run(train_config(), workdir)["finished"]
  return workdir


def copy_run(src, dest) -> str:
  shutil.copytree(src, dest)
  return str(dest)


def copy_unfinished(src, dest) -> str:
  """A copy of a finished run as a kill after its last checkpoint, before its outputs, leaves it."""
  copy_run(src, dest)
  for name in ("result.json", "model", "model_best"):
    path = pathlib.Path(dest) / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  return str(dest)


# ----------------------------------------------------------------------------- bad input on the command line

@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
  """Every bad command line of CLI_CASES, started at once (each fails before any step runs)."""
  root = tmp_path_factory.mktemp("cli")
  bad_json = root / "bad_shape.json"
  bad_json.write_text('{"format": "tas_jax.shape/1", "widths": [16, ')
  tree = root / "tree"
  data_fixtures.write_tree(tree, counts={"train": 4, "test": 2})
  archive = data_fixtures.pack_tar(tree, root / "data.tar.gz")
  blob = archive.read_bytes()
  truncated = root / "truncated.tar.gz"
  truncated.write_bytes(blob[: len(blob) // 2])
  paths = {"bad_json": str(bad_json), "truncated": str(truncated)}
  procs = {}
  for name, (program, config, args, _) in CLI_CASES.items():
    args = [a.format(**paths) for a in args]
    procs[name] = start(command(program, config, root / name, *args))
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=600)
    out[name] = (proc.returncode, stdout, stderr, root / name)
  return out


CLI_CASES = {
    # name: (program, config, overrides, what the error line must contain)
    "unknown_model": ("search", f"{SEARCH_CONFIG}:smoke", ["--config.model=resnet7"], "got 7"),
    "unknown_preset": ("search", f"{SEARCH_CONFIG}:bogus", [], "unknown preset 'bogus'"),
    "unknown_variant": ("search", f"{SEARCH_CONFIG}:smoke,bogus", [], "unknown variant 'bogus'"),
    "not_an_int": ("search", f"{SEARCH_CONFIG}:smoke", ["--config.batch_size=abc"], "--config.batch_size=abc"),
    "missing_config_file": ("search", "no/such/config.py:smoke", [], "no/such/config.py"),
    "unknown_key": ("search", f"{SEARCH_CONFIG}:smoke", ["--config.bach_size=3"], "unknown config key 'bach_size'"),
    "unknown_mode": ("search", f"{SEARCH_CONFIG}:smoke", [*TINY_SEARCH, "--config.mode=bogus"], "'bogus'"),
    "unreachable_target": ("search", f"{SEARCH_CONFIG}:smoke", [*TINY_SEARCH, "--config.target_flops_ratio=0.01"],
                           "its MACs ratios span [0.080, 1.0]"),
    "malformed_shape": ("train", f"{TRAIN_CONFIG}:smoke", [*TINY_TRAIN, "--config.mode=scratch",
                                                          "--config.shape={bad_json}"], "not valid JSON"),
    "truncated_archive": ("train", f"{TRAIN_CONFIG}:smoke", [*TINY_TRAIN, "--config.dataset={truncated}"],
                          "truncated"),
    "bad_image_policy": ("train", f"{TRAIN_CONFIG}:smoke", [*TINY_TRAIN, "--config.on_bad_image=maybe"],
                         "on_bad_image must be one of error, skip, got 'maybe'"),
    # Values that cannot be meant: refused by name before the data loads or anything is written.
    "negative_lr": ("train", f"{TRAIN_CONFIG}:smoke", [*TINY_TRAIN, "--config.lr=-0.1"], "config.lr must be >= 0"),
    "zero_tau_min": ("search", f"{SEARCH_CONFIG}:smoke", [*TINY_SEARCH, "--config.tau_min=0"],
                     "config.tau_min must be > 0, got 0.0"),
    "negative_seed": ("search", f"{SEARCH_CONFIG}:smoke", [*TINY_SEARCH, "--config.seed=-1"],
                      "config.seed must be >= 0, got -1"),
    "no_checkpoints_kept": ("train", f"{TRAIN_CONFIG}:smoke", [*TINY_TRAIN, "--config.keep_checkpoints=0"],
                            "config.keep_checkpoints must be >= 1, got 0"),
    "targets_same_file": ("search", f"{SEARCH_CONFIG}:smoke", [*TINY_SEARCH, "--config.targets=0.5,0.5000001"],
                          "config.targets must be distinct ratios"),
    "tau_min_above_max": ("search", f"{SEARCH_CONFIG}:smoke", [*TINY_SEARCH, "--config.tau_min=20"],
                          "config.tau_min (20.0) must not exceed config.tau_max"),
}
REFUSED_AT_THE_DOOR = ("negative_lr", "zero_tau_min", "negative_seed", "no_checkpoints_kept", "targets_same_file",
                       "tau_min_above_max", "unknown_model")


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_bad_command_line_fails_in_one_line(cli_results, case):
  rc, stdout, stderr, workdir = cli_results[case]
  expected = CLI_CASES[case][3]
  assert rc == 2, stderr[-2000:]
  lines = error_lines(stderr)
  assert len(lines) == 1, stderr[-2000:]
  assert expected in lines[0], lines[0]
  assert "Traceback" not in stderr and stdout == ""
  assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
  if case in REFUSED_AT_THE_DOOR:  # before the data loads or config.json is written
    assert not workdir.exists()


# ----------------------------------------------------------------------------- bad data

def test_unreadable_image_missing_and_truncated_data(tmp_path, monkeypatch):
  monkeypatch.setenv("TAS_JAX_CACHE", str(tmp_path / "cache"))
  tree = tmp_path / "tree"
  data_fixtures.write_tree(tree, counts={"train": 4, "test": 2})
  bad = tree / "train" / "cat" / "1.png"
  bad.write_bytes(b"not a png")
  config = train_config(dataset=str(tree), num_train_examples=0)
  with pytest.raises(data.DataError, match=r"unreadable image .*cat/1\.png.*on_bad_image='skip'"):
    runs.load_data(TrainSettings.resolve(config).data)
  config.on_bad_image = "skip"  # the documented way out: leave the file out
  dataset = runs.load_data(TrainSettings.resolve(config).data)
  assert dataset.num_examples("train") == 11 and dataset.num_examples("test") == 6
  with pytest.raises(data.DataError, match="does not exist"):
    runs.load_data(TrainSettings.resolve(train_config(dataset=str(tmp_path / "no" / "such" / "dir"))).data)
  archive = data_fixtures.pack_tar(tree, tmp_path / "data.tar.gz")
  archive.write_bytes(archive.read_bytes()[:200])
  with pytest.raises(data.DataError, match="truncated"):
    runs.load_data(TrainSettings.resolve(train_config(dataset=str(archive))).data)


# ----------------------------------------------------------------------------- checkpoints of another run, corrupt ones

def test_checkpoint_of_another_configuration_is_refused_untouched(reference, tmp_path):
  workdir = copy_unfinished(reference, tmp_path / "run")
  before = tree_digest(workdir)
  with pytest.raises(runs.RunError) as info:
    train.run(train_config(lr=0.05), workdir)
  assert "lr: checkpoint has 0.1, this run has 0.05" in str(info.value)
  with pytest.raises(runs.RunError) as info:
    train.run(train_config(model="resnet14"), workdir)
  message = str(info.value)
  assert "model: checkpoint has 'resnet8', this run has 'resnet14'" in message and "trained_shape" in message
  # config.json still describes the run that wrote the checkpoints.
  assert tree_digest(workdir) == before


def test_rerun_of_a_finished_run_changes_nothing(reference, tmp_path):
  """Catches a finished run that evaluates again, rewrites its metrics or replaces its model when rerun."""
  workdir = copy_run(reference, tmp_path / "run")
  before = tree_digest(workdir)
  recorded = json.loads((pathlib.Path(workdir) / "result.json").read_text())
  assert train.run(train_config(log_every_steps=2), workdir) == recorded  # a cadence change is no difference
  assert tree_digest(workdir) == before
  with pytest.raises(runs.RunError, match=r"finished under another configuration \(lr: 0.1 -> 0.05\)"):
    train.run(train_config(lr=0.05), workdir)
  assert tree_digest(workdir) == before
  again = train.run(train_config(reevaluate=True), workdir)["reevaluation"]
  assert again["test_top1"] == recorded["test_top1"] and again["test_top5"] == recorded["test_top5"]
  after = tree_digest(workdir)
  assert set(after) - set(before) == {train.REEVALUATION_FILE}
  assert {k: v for k, v in after.items() if k != train.REEVALUATION_FILE} == before


def test_model_directory_is_replaced_atomically(reference, tmp_path, monkeypatch):
  """Catches a model directory written in place: a kill during the write left shape.json (the completion
  marker) without params, and a distillation from it failed."""
  workdir = copy_run(reference, tmp_path / "run")
  model_dir = os.path.join(workdir, models.MODEL_DIR)
  shape, model = models.load_model(workdir)
  params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
  renames = []
  real_rename = os.rename

  def killed_after_first_rename(src, dst):
    renames.append((src, dst))
    if os.fspath(src) == model_dir + ".partial":
      raise KeyboardInterrupt  # a kill between moving the old model aside and moving the new one in
    real_rename(src, dst)

  monkeypatch.setattr(os, "rename", killed_after_first_rename)
  with pytest.raises(KeyboardInterrupt):
    models.save_model(model_dir, shape, params, stats)
  monkeypatch.setattr(os, "rename", real_rename)
  assert (model_dir, model_dir + ".old") in renames and not os.path.exists(os.path.join(model_dir, "shape.json"))
  loaded, _ = models.load_model(workdir)  # the previous model, complete, from model.old
  assert loaded == shape
  models.save_model(model_dir, shape, params, stats)  # the next save cleans up
  assert not os.path.exists(model_dir + ".old") and not os.path.exists(model_dir + ".partial")
  assert models.load_model(workdir)[0] == shape


def test_flipped_bit_in_the_newest_checkpoint_falls_back_and_resumes_exactly(reference, tmp_path, capfd):
  """Catches silent damage (no read error) going undetected: training resumed from damaged weights."""
  workdir = copy_unfinished(reference, tmp_path / "run")
  data = max((p for p in (pathlib.Path(workdir) / "checkpoints" / "12" / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  blob = bytearray(data.read_bytes())
  blob[len(blob) // 2] ^= 0x04
  data.write_bytes(bytes(blob))
  assert train.run(train_config(), workdir)["finished"]
  err = capfd.readouterr().err
  assert "warning: checkpoint step 12" in err and "resuming from the previous valid checkpoint, step 10" in err, err
  assert_same_run(workdir, reference)


def test_dataset_of_one_class_is_refused(tmp_path, monkeypatch):
  """Catches a one-class dataset training to a meaningless top-1 of 1.0."""
  monkeypatch.setenv("TAS_JAX_CACHE", str(tmp_path / "cache"))
  tree = tmp_path / "tree"
  data_fixtures.write_tree(tree, counts={"train": 4, "test": 2}, classes=("cat",))
  with pytest.raises(runs.RunError, match="has 1 class; a classifier needs at least two"):
    runs.load_data(TrainSettings.resolve(train_config(dataset=str(tree), num_train_examples=0)).data)


def test_teacher_trained_on_other_data_is_refused(reference, tmp_path):
  """Catches a teacher of another dataset with the same class count being accepted and its accuracy quoted."""
  teacher = copy_run(reference, tmp_path / "teacher")
  result = json.loads((pathlib.Path(teacher) / "result.json").read_text())
  result["data"]["name"] = "another-set"
  (pathlib.Path(teacher) / "result.json").write_text(json.dumps(result))
  kd = train_config(mode="kd", shape="resnet8", teacher=teacher, epochs=1)
  with pytest.raises(runs.RunError, match=r"the teacher .* was trained on other data \(name: 'another-set' there, "
                                          r"'synthetic.*' here\); set config.allow_foreign_teacher=True"):
    train.run(kd, str(tmp_path / "kd"))
  assert not (tmp_path / "kd").exists() or not (tmp_path / "kd" / "checkpoints").exists()
  kd.allow_foreign_teacher, kd.stop_after_steps = True, 1  # the user says it is meant
  assert train.run(kd, str(tmp_path / "kd2")) == {"finished": False, "step": 1}


def test_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(reference, tmp_path, capfd):
  workdir = copy_unfinished(reference, tmp_path / "run")
  assert checkpoint_steps(workdir) == [8, 10, 12]
  damage(pathlib.Path(workdir) / "checkpoints" / "12")
  result = train.run(train_config(), workdir)
  err = capfd.readouterr().err
  warning = [line for line in err.splitlines() if line.startswith("warning: checkpoint step 12")]
  assert len(warning) == 1 and "resuming from the previous valid checkpoint, step 10" in warning[0], err
  assert result["finished"]
  # The damaged step was moved aside, not deleted, and step 12 written again.
  assert (pathlib.Path(workdir) / "checkpoints-corrupt" / "12" / "state").is_dir()
  assert_same_run(workdir, reference)
  assert result["test_top1"] == json.loads((pathlib.Path(reference) / "result.json").read_text())["test_top1"]


def test_no_restorable_checkpoint_is_refused_untouched(reference, tmp_path):
  workdir = copy_unfinished(reference, tmp_path / "run")
  for step in checkpoint_steps(workdir):
    damage(pathlib.Path(workdir) / "checkpoints" / str(step))
  before = tree_digest(workdir)
  with pytest.raises(runs.RunError, match=r"none of the checkpoints \[8, 10, 12\] .* restores.*move .* away"):
    train.run(train_config(), workdir)
  assert tree_digest(workdir) == before


def test_unfinished_save_and_stale_records_are_ignored(reference, tmp_path):
  # A run killed during its first save: a temporary step directory and metric
  # records of steps no checkpoint holds.
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  shutil.copytree(pathlib.Path(reference) / "checkpoints" / "8", workdir / "checkpoints" / "2.orbax-checkpoint-tmp-17")
  shutil.copy(pathlib.Path(reference) / "metrics.jsonl", workdir / "metrics.jsonl")
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"step": 13, "loss": 1.')  # a write cut short
  assert train.run(train_config(), str(workdir))["finished"]
  assert not any("tmp" in name for name in os.listdir(workdir / "checkpoints"))
  assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- stops and resumes

def test_stop_inside_an_epoch_resumes_with_identical_epoch_averages(reference, tmp_path):
  workdir = str(tmp_path / "run")
  assert train.run(train_config(stop_after_steps=5), workdir) == {"finished": False, "step": 5}
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    meta = ckpt.read_meta(5)
  assert meta[runs.LOOP_META]["count"] == 1  # step 5 is the first of epoch 1
  assert train.run(train_config(), workdir)["finished"]
  assert_same_run(workdir, reference)
  assert [r["step"] for r in records(workdir) if "epoch_loss" in r] == [4, 8, 12]


def test_sigterm_saves_says_how_to_resume_and_resumes_exactly(reference, tmp_path):
  # The reference run's configuration on the command line, stopped once past
  # compilation (a few steps logged) at a random moment, as a scheduler would.
  workdir = tmp_path / "run"
  cmd = command("train", f"{TRAIN_CONFIG}:resnet8,smoke", workdir, *TRAIN_ARGS)
  proc = start(cmd)
  deadline = time.time() + 300
  while steps_logged(workdir) < 1 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  time.sleep(random.Random().uniform(0.0, 0.1))
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 3, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert "Rerun the same command to resume: " in last and last.endswith(shlex.join(cmd)), last  # the exact command
  if last.startswith("stopped by SIGTERM at step "):
    stopped_at = int(last.split("at step ")[1].split("/")[0])
  else:  # a fast machine ran all 12 steps first: stopped while writing the outputs, the last step saved
    assert last.startswith("stopped by SIGTERM outside the training steps"), last
    stopped_at = 12
  assert checkpoint_steps(workdir)[-1] == stopped_at >= 1
  assert steps_logged(workdir) == stopped_at  # nothing logged beyond the checkpoint
  again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert_same_run(workdir, reference)


def test_two_runs_on_one_directory_one_runs_the_other_is_refused(reference, tmp_path):
  """Catches a missing or ineffective work-directory lock: two processes started on one directory at once.

  Without the lock the second deletes the first's temporary checkpoint
  directories and both append to one ``metrics.jsonl``; with it, one is
  refused in one line naming the holder, and the survivor equals an
  undisturbed run.
  """
  workdir = tmp_path / "run"
  cmd = command("train", f"{TRAIN_CONFIG}:resnet8,smoke", workdir, *TRAIN_ARGS)
  procs = [start(cmd), start(cmd)]
  outs = [p.communicate(timeout=600) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], [o[1][-2000:] for o in outs]
  refused = outs[[p.returncode for p in procs].index(2)][1]
  lines = error_lines(refused)
  assert len(lines) == 1 and "is in use by another run (pid " in lines[0], refused[-2000:]
  assert "Traceback" not in refused
  assert_same_run(workdir, reference)
  timings = ("wall_s", "train_s", "compile_s", "train_images_per_s")
  done, ref = (json.loads((pathlib.Path(d) / "result.json").read_text()) for d in (workdir, reference))
  assert {k: v for k, v in done.items() if k not in timings} == {k: v for k, v in ref.items() if k not in timings}
  assert not (workdir / ".lock").read_text()  # released: the holder's record is cleared


FULL_DISK = """
import errno, os, sys
from tas_jax.cli import common

def main(config, workdir):
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))
  os.makedirs(os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp"))
  try:
    raise OSError(errno.ENOSPC, "No space left on device")
  except OSError as e:  # as TensorStore reports it, with the OSError as its context
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "x"') from e

common.launch(main)
"""


def test_full_disk_is_one_line_naming_the_path_the_free_space_and_the_kept_checkpoint(tmp_path):
  """Catches a full disk reported as a raw TensorStore message (or a traceback) instead of what to do."""
  workdir = tmp_path / "run"
  out = subprocess.run([sys.executable, "-c", FULL_DISK, "--config", f"{TRAIN_CONFIG}:smoke", f"--workdir={workdir}"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = error_lines(out.stderr)
  assert len(lines) == 1, out.stderr[-2000:]
  assert re.match(rf"error: no space left on the device of {re.escape(str(workdir))} \([\d.]+ MiB free\): the write "
                  r"in progress was abandoned and the last complete checkpoint, step 4, is kept\. Free some space\. "
                  r"Rerun the same command to resume: ", lines[0]), lines[0]


def test_unusable_output_paths_are_refused_before_work(tmp_path, capsys):
  """Catches compare --out ending in a traceback after the work (a missing directory, a path under a file)."""
  (tmp_path / "a-file").write_text("x")
  assert compare_cli.main([str(tmp_path), "--out", str(tmp_path / "a-file" / "table.md")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: --out: cannot write {tmp_path / 'a-file' / 'table.md'}: {tmp_path / 'a-file'} is a file, "
                 "not a directory"]
  assert compare_cli.main([str(tmp_path), "--json", str(tmp_path)]) == 2
  assert "is a directory; name a file" in capsys.readouterr().err
  assert files.output_problem(str(tmp_path / "new" / "dir" / "table.md")) is None  # created when written
  files.write_text(str(tmp_path / "new" / "dir" / "table.md"), "t")
  assert (tmp_path / "new" / "dir" / "table.md").read_text() == "t"


# ----------------------------------------------------------------------------- non-finite losses

def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
  compile_step = train_lib.compile_step

  def poisoned(*args, **kwargs):
    step_fn, seconds = compile_step(*args, **kwargs)

    def fn(state, batch, teacher):
      state, m = step_fn(state, batch, teacher)
      if int(state["step"]) >= 7:  # the loss of step 7 on is NaN
        m = dict(m, loss=m["loss"] * jnp.nan)
      return state, m

    return fn, seconds

  workdir = str(tmp_path / "run")
  monkeypatch.setattr(train_lib, "compile_step", poisoned)
  with pytest.raises(runs.Diverged) as info:
    train.run(train_config(), workdir)
  message = str(info.value)
  assert "non-finite loss at step 7 (loss=nan" in message, message
  assert "the last good checkpoint, step 6, is kept" in message and "last finite check was at step 6" in message
  assert checkpoint_steps(workdir)[-1] == 6
  assert steps_logged(workdir) == 6 and all(np.isfinite(r.get("loss", 0)) for r in records(workdir))
  assert not os.path.exists(os.path.join(workdir, "result.json"))
  # The kept checkpoint is good: without the poison the run finishes as if nothing happened.
  monkeypatch.setattr(train_lib, "compile_step", compile_step)
  assert train.run(train_config(), workdir)["finished"]
  assert_same_run(workdir, reference)


def test_huge_learning_rate_diverges_before_any_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  with pytest.raises(runs.Diverged, match=r"non-finite loss at step \d+ .*no checkpoint was written"):
    train.run(train_config(lr=1e30, checkpoint_every_steps=0), workdir)
  assert checkpoint_steps(workdir) == [] and all(np.isfinite(r["loss"]) for r in records(workdir) if "loss" in r)


# ----------------------------------------------------------------------------- the pieces

def test_keep_records_drops_repeated_epochs_and_cut_lines(tmp_path):
  run = runs.Run(str(tmp_path), None, metrics.MetricWriter(str(tmp_path), tensorboard=False), True, seed=0)
  lines = [json.dumps({"epoch": e}) for e in range(4)] + ['{"epoch": 4, "wid']
  (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
  assert runs.keep_records(run, "log.jsonl", lambda r: (r["epoch"] + 1) * 3 <= 7) == 3
  assert [json.loads(x)["epoch"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1]


def test_quarantine_keeps_the_files_and_frees_the_step(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  state = {"w": jax.device_put(np.arange(4, dtype=np.float32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}
  with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state)
    moved = ckpt.quarantine(2)
    assert ckpt.all_steps() == [1] and os.path.isdir(os.path.join(moved, "state"))
    ckpt.save(2, state)
    assert ckpt.quarantine(2).endswith("2.1")
