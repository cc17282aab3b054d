"""Fault injection, slow cases: a search and a training run killed again and again, resumed each time.

  .venv/bin/pytest -m slow -s tests/faults_slow_test.py   # or: make test-slow

Each run is started as the command a user types, interrupted at random steps
once past compilation by SIGTERM, SIGINT or SIGKILL (some SIGKILLs aimed at
the moment a checkpoint is being written), checked after every interruption
(the newest checkpoint reads back; a stop by signal saved the step it names)
and rerun with the same command until it finishes. The result must equal an
uninterrupted run's bit for bit: the final checkpoint's arrays, every metric
record, the shapes and architecture logs of a search, the trained model of a
training run. ``FAULTS_SEED`` picks other random moments; ``-s`` prints what
happened at each interruption.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import time

import pytest

from conftest import ROOT
from tas_jax.configs import search as search_configs
from tas_jax.configs import train as train_configs
from faults_test import (SEARCH_CONFIG, TRAIN_CONFIG, assert_same_arrays, assert_same_run, checkpoint_arrays,
                         checkpoint_steps, command, env, orbax_arrays, records, start,
                         steps_logged)
from tas_jax.runtime import checkpoint

from tas_jax.programs import search, train
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

SEED = int(os.environ.get("FAULTS_SEED", "20240611"))

# 24 search steps (4 per epoch) and 48 training steps (8 per epoch), logged every step.
SEARCH = {"model": "resnet8", "batch_size": 16, "num_train_examples": 128, "eval_examples": 32, "epochs": 6,
          "log_every_steps": 1, "checkpoint_every_steps": 3, "keep_checkpoints": 2}
TRAIN = {"model": "resnet8", "batch_size": 16, "eval_batch_size": 200, "num_train_examples": 144, "val_examples": 16,
         "epochs": 6, "log_every_steps": 1, "checkpoint_every_steps": 4, "keep_checkpoints": 2}


def as_args(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def as_config(config, overrides: dict):
  for k, v in overrides.items():
    setattr(config, k, v)
  return config


def wait_past_compilation(proc, workdir, inode, resumed: int, limit_s: float = 400) -> bool:
  """Until the program has logged a step after ``resumed``; False if it exited first.

  A resumed run rewrites metrics.jsonl (a new inode) when it drops the
  records of steps it will repeat, so older records do not count.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + limit_s
  while time.time() < deadline and proc.poll() is None:
    try:
      fresh = path.stat().st_ino != inode
    except FileNotFoundError:
      fresh = False
    if fresh and steps_logged(workdir) > resumed:
      return True
    time.sleep(0.02)
  return False


def wait_for_save(proc, workdir, nth: int, limit_s: float = 120) -> bool:
  """Until the ``nth`` checkpoint of this process is being written (Orbax's temporary step directory exists)."""
  d = pathlib.Path(workdir) / "checkpoints"
  seen = set()
  deadline = time.time() + limit_s
  while time.time() < deadline and proc.poll() is None:
    try:
      seen.update(name for name in os.listdir(d) if ".orbax-checkpoint-tmp" in name)
    except FileNotFoundError:
      pass
    if len(seen) >= nth:
      return True
    time.sleep(0.0005)
  return False


def check_newest_checkpoint(workdir) -> int:
  """The newest step reads back in full (arrays and metadata); returns it (0: none written yet)."""
  steps = checkpoint_steps(workdir)
  if not steps:
    return 0
  step = steps[-1]
  checkpoint_arrays(workdir, step)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None) as ckpt:
    assert ckpt.read_meta(step)["step"] == step
  return step


def interrupt_until_done(cmd, workdir, plan, rng, delay_s: float) -> list[dict]:
  """Runs ``cmd`` once per (signal, moment) of ``plan``, interrupting it, then to the end; returns the events."""
  events = []
  for sig, moment in plan:
    steps = checkpoint_steps(workdir)
    resumed = steps[-1] if steps else 0
    path = pathlib.Path(workdir) / "metrics.jsonl"
    inode = path.stat().st_ino if path.exists() else None
    proc = start(cmd)
    if not wait_past_compilation(proc, workdir, inode, resumed):
      proc.communicate(timeout=600)
      assert proc.returncode == 0, "exited before its first step"
      break
    if moment == "save":
      caught = wait_for_save(proc, workdir, rng.randint(1, 4))
    else:
      time.sleep(rng.uniform(0.0, delay_s))
      caught = False
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    tmp = [n for n in os.listdir(pathlib.Path(workdir) / "checkpoints") if "tmp" in n]
    event = {"signal": sig.name, "moment": moment, "resumed_from": resumed, "rc": proc.returncode,
             "logged": steps_logged(workdir), "checkpoints": checkpoint_steps(workdir), "in_save": caught,
             "tmp_left": tmp, "last_line": last}
    events.append(event)
    print(json.dumps(event))
    if proc.returncode == 0:  # it finished before the signal arrived
      break
    newest = check_newest_checkpoint(workdir)
    if sig == signal.SIGKILL:
      assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    else:
      assert proc.returncode == 3, stderr[-3000:]
      assert last.startswith(f"stopped by {sig.name}") and "Rerun the same command to resume: " in last, last
      if " at step " in last:  # stopped inside the loop: the step it names is saved
        assert newest == int(last.split(" at step ")[1].split("/")[0])
  done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return events


def plan_of(rng, signals) -> list[tuple[signal.Signals, str]]:
  plan = list(signals)
  rng.shuffle(plan)
  return plan


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("train") / "reference")
  assert train.run(as_config(train_configs.get_config("smoke"), TRAIN), workdir)["finished"]
  return workdir


def assert_same_training(done, reference):
  assert_same_run(done, reference, files=())
  for model in ("model", "model_best"):
    assert_same_arrays(*(orbax_arrays(os.path.join(d, model, "params")) for d in (done, reference)))
  ra, rb = (json.loads(pathlib.Path(d, "result.json").read_text()) for d in (done, reference))
  timing = {"wall_s", "train_s", "compile_s", "train_images_per_s", "num_devices"}
  assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}


def test_search_survives_repeated_interruptions(tmp_path):
  rng = random.Random(SEED)
  workdir = tmp_path / "run"
  cmd = command("search", f"{SEARCH_CONFIG}:smoke", workdir, *as_args(SEARCH))
  plan = plan_of(rng, [(signal.SIGTERM, "random"), (signal.SIGKILL, "random"), (signal.SIGKILL, "save"),
                       (signal.SIGINT, "random"), (signal.SIGKILL, "random")])
  events = interrupt_until_done(cmd, workdir, plan, rng, delay_s=3.0)
  assert len(events) >= 3 and any(e["signal"] == "SIGKILL" for e in events)
  reference = tmp_path / "reference"
  assert search.run(as_config(search_configs.get_config("smoke"), SEARCH), str(reference))["finished"]
  assert_same_run(workdir, reference)
  assert len(records(workdir)) == len(records(reference))


def test_training_survives_repeated_interruptions(tmp_path, train_reference):
  rng = random.Random(SEED + 1)
  workdir = tmp_path / "run"
  cmd = command("train", f"{TRAIN_CONFIG}:smoke", workdir, *as_args(TRAIN))
  plan = plan_of(rng, [(signal.SIGTERM, "random"), (signal.SIGKILL, "random"), (signal.SIGKILL, "save"),
                       (signal.SIGINT, "random"), (signal.SIGKILL, "random"), (signal.SIGTERM, "random")])
  events = interrupt_until_done(cmd, workdir, plan, rng, delay_s=1.5)
  assert len(events) >= 3 and any(e["signal"] == "SIGKILL" for e in events)
  assert_same_training(workdir, train_reference)


def test_sigkill_while_saving_never_leaves_a_corrupt_checkpoint(tmp_path, train_reference):
  # A save at every step, and every kill aimed at a save in progress.
  rng = random.Random(SEED + 2)
  workdir = tmp_path / "run"
  cmd = command("train", f"{TRAIN_CONFIG}:smoke", workdir, *as_args({**TRAIN, "checkpoint_every_steps": 1}))
  events = interrupt_until_done(cmd, workdir, [(signal.SIGKILL, "save")] * 4, rng, delay_s=0)
  assert sum(e["in_save"] for e in events) >= 2, events
  assert_same_training(workdir, train_reference)


def test_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, train_reference):
  """Catches a full disk ending in writer-thread tracebacks, or leaving no usable checkpoint.

  Needs to mount a small tmpfs (root on Linux); skipped where it cannot.
  """
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    workdir = mount / "run"
    cmd = command("train", f"{TRAIN_CONFIG}:smoke", workdir, *as_args(TRAIN))
    full = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    lines = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"no space left on the device of {workdir}" in lines[0], full.stderr[-3000:]
    assert "MiB free" in lines[0] and "Rerun the same command to resume" in lines[0]
    subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training(workdir, train_reference)
  finally:
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)
