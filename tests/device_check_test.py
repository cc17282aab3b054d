"""The prepared accelerator check (tools/device_check.py) and the side-by-side benchmark (tools/official_speed.py)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(str(ROOT), "tools"))
import device_check  # noqa: E402  pylint: disable=g-import-not-at-top


def test_study_is_scaled_to_fit_the_time_left():
  """Catches a study sized without its per-run overhead or without the search (the check would overrun its
  lease), or scaled differently per phase. Reference: teacher 30 and 7 runs x 30 epochs at 10 s per training
  epoch, search 60 epochs of half the set at 5 s, plus 30 s per run for 9 runs."""
  rates, examples = {"train": 5000.0, "search": 5000.0}, 50000
  full = 30 * 10 + 60 * 5 + 7 * 30 * 10  # 2700 s of epochs at full size
  e = device_check.study_epochs(270 + full / 2, rates, runs=7, overhead_s=30.0, examples=examples)
  assert e["scale"] == pytest.approx(0.5)
  assert (e["teacher"], e["search"], e["shapes"]) == (15, 30, 15)
  assert e["estimated_s"] == pytest.approx(270 + full / 2)
  ample = device_check.study_epochs(1e6, rates, runs=7, overhead_s=30.0, examples=examples)
  assert (ample["teacher"], ample["search"], ample["shapes"], ample["scale"]) == (30, 60, 30, 1.0)
  tiny = device_check.study_epochs(100.0, rates, runs=7, overhead_s=30.0, examples=examples)
  assert (tiny["teacher"], tiny["search"], tiny["shapes"]) == (1, 1, 1)  # at least one epoch of each


@pytest.mark.slow
def test_small_mode_writes_every_phase(tmp_path):
  """`make gpu-check-small`: the script the GPU machine runs, at toy size on the CPU, in under 5 minutes."""
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, os.path.join(str(ROOT), "tools", "device_check.py"), "--mode", "small",
                         "--out", str(out), "--workdir", str(tmp_path / "study")],
                        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.load(open(out / device_check.JSON_FILE))
  phases = record["phases"]
  assert not [name for name, v in phases.items() if "error" in v], phases
  assert phases["peak"]["bf16_tflops"] > 0
  assert {(r["model"], r["dtype"]) for r in phases["steps"]["rows"]} == {("resnet8", "float32"),
                                                                          ("resnet8", "bfloat16")}
  assert phases["pipeline"]["keeps_up"] in (True, False)
  assert "| tas-s0 | tas |" in phases["study"]["markdown"]
  md = open(out / device_check.MD_FILE).read()
  assert "| resnet8 | float32 | 32 |" in md and "Study: teacher" in md


def test_official_speed_without_its_environment_is_one_line(tmp_path):
  """Catches the side-by-side benchmark ending in a traceback when the parity environment is missing."""
  proc = subprocess.run([sys.executable, os.path.join(str(ROOT), "tools", "official_speed.py"), "--torch_python",
                         str(tmp_path / "nope" / "python")], capture_output=True, text=True, timeout=120)
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith(("W", "I"))]
  assert proc.returncode == 2 and len(lines) == 1 and "make .venv-parity/.installed" in lines[0], proc.stderr
