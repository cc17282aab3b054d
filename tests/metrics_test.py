"""MetricWriter, read_metrics, Progress and PreemptionGuard."""

from __future__ import annotations

import io
import json
import logging
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from tas_jax.runtime import metrics as metrics_lib
from tas_jax.runtime.metrics import MetricWriter, Progress, read_metrics
from tas_jax.runtime.preemption import PreemptionGuard


def _event_files(workdir):
  tb = os.path.join(workdir, "tb")
  return [os.path.join(root, f) for root, _, files in os.walk(tb) for f in files
          if f.startswith("events.out.tfevents")]


def _tb_events(path):
  """The events of one TensorBoard event file (TFRecord framing, CRCs not checked)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  with open(path, "rb") as f:
    data = f.read()
  events, offset = [], 0
  while offset < len(data):
    length = int.from_bytes(data[offset:offset + 8], "little")
    events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def _tb_scalars(path):
  """(tag, step, value) of the scalar summaries in one event file."""
  return [(v.tag, e.step, v.simple_value) for e in _tb_events(path) for v in e.summary.value]


def test_write_jsonl_and_tensorboard(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write(1, {"loss": jnp.float32(2.5), "acc": np.float64(0.25), "epoch": 0},
                 arch=[16, 8], phase="search")
    writer.write(2, {"loss": jnp.array(1.5), "step": 99.0})  # the step argument wins
  records = read_metrics(tmp_path)
  assert records == [
      {"step": 1, "loss": 2.5, "acc": 0.25, "epoch": 0, "arch": [16, 8], "phase": "search"},
      {"step": 2, "loss": 1.5},
  ]
  assert read_metrics(tmp_path / "metrics.jsonl") == records
  files = _event_files(tmp_path)
  assert len(files) == 1 and os.path.getsize(files[0]) > 0
  scalars = _tb_scalars(files[0])
  assert ("loss", 1, 2.5) in scalars and ("loss", 2, 1.5) in scalars and ("acc", 1, 0.25) in scalars


def test_records_are_flushed_per_write(tmp_path):
  writer = MetricWriter(tmp_path, tensorboard=False)
  writer.write(7, {"x": 1.0})
  # Readable before close: a crash right after a write loses nothing.
  assert read_metrics(tmp_path) == [{"step": 7, "x": 1.0}]
  writer.close()
  assert not os.path.exists(tmp_path / "tb")


def test_non_scalar_metric_is_refused(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(TypeError, match="'v' is not a scalar"):
      writer.write(1, {"v": "high"})


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with MetricWriter(workdir, enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.write_text(1, "arch", "x")
    writer.write_hparams({"lr": 0.1})
    assert writer.truncate_after(0) == 0
  assert not workdir.exists()


def test_truncate_after_drops_ghost_steps_on_resume(tmp_path):
  with MetricWriter(tmp_path) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step)})
  # A crash mid-write leaves half a record at the end.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

  # Resumed from the checkpoint of step 3: steps 4..6 will be logged again.
  with MetricWriter(tmp_path) as writer:
    assert writer.truncate_after(3) == 2
    for step in range(4, 7):
      writer.write(step, {"loss": 10.0 * step})
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
  # TensorBoard hides older events from step 4 on when it sees a session
  # restart at step 4 in the newer file.
  files = _event_files(tmp_path)
  assert len(files) == 2
  newest = [f for f in files if ("loss", 4, 40.0) in _tb_scalars(f)]
  assert len(newest) == 1
  restarts = [e.step for e in _tb_events(newest[0]) if e.session_log.status == 1]
  assert restarts == [4]

  with MetricWriter(tmp_path, tensorboard=False) as writer:
    assert writer.truncate_after(-1) == 6
  assert read_metrics(tmp_path) == []


def test_write_hparams_and_text(tmp_path):
  with MetricWriter(tmp_path) as writer:
    writer.write_hparams({"lr": 0.1, "widths": [0.5, 1.0], "model": "resnet20"}, {"acc": 0.0})
    writer.write_text(0, "arch", "16-16-32")
  with open(tmp_path / "hparams.json") as f:
    assert json.load(f) == {"lr": 0.1, "widths": [0.5, 1.0], "model": "resnet20"}
  assert _event_files(tmp_path)


def test_read_metrics_of_missing_file(tmp_path):
  assert read_metrics(tmp_path / "nothing.jsonl") == []


def test_progress_prints_plain_lines_without_a_tty():
  stream = io.StringIO()
  progress = Progress(10, initial=2, desc="search", stream=stream, log_every_s=0.0)
  progress.set_postfix({"loss": jnp.float32(0.123456), "tau": 5})
  progress.update(3)
  progress.close()
  lines = stream.getvalue().splitlines()
  assert lines and lines[-1].startswith("search: 5/10 (50.0%)")
  assert "ETA" in lines[-1] and "loss=0.1235" in lines[-1] and "tau=5" in lines[-1]
  quiet = io.StringIO()
  disabled = Progress(10, stream=quiet, enabled=False)
  disabled.update(5)
  disabled.close()
  assert quiet.getvalue() == ""


def test_progress_rate_limits_plain_lines():
  stream = io.StringIO()
  with Progress(1000, stream=stream, log_every_s=3600.0) as progress:
    for _ in range(999):
      progress.update()
  # Nothing until the end but the first step's time, then one final line.
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2 and lines[0].startswith("first step") and "999/1000" in lines[1]


def test_eta_counts_from_the_steady_state_not_the_compiling_first_step(monkeypatch):
  """Catches an ETA that spreads the first step's compilation over every step (20 min announced for 2), and a
  log whose first ETA comes only after the slow cadence (a short run would show none)."""
  clock = [0.0]
  monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: clock[0])
  stream = io.StringIO()
  progress = Progress(100, stream=stream, log_every_s=3600.0)
  clock[0] = 120.0  # the first step compiles for two minutes
  progress.update()
  for _ in range(9):  # then a second a step
    clock[0] += 1.0
    progress.update()
  line = progress.line()
  assert "1 it/s" in line and "ETA 0:01:30" in line, line  # 90 steps left at 1 step/s
  # A log gets its first ETA five steady seconds after compilation (step 6: 94 left), then at its cadence.
  lines = stream.getvalue().splitlines()
  assert len(lines) == 2, lines
  assert lines[0].startswith("first step 0:02:00 (with any compilation")
  assert lines[1].startswith("6/100") and "ETA 0:01:34" in lines[1], lines[1]
  clock[0] += 30.0  # the first evaluation compiles: left out of the rate too
  progress.exclude(30.0)
  clock[0] += 1.0
  progress.update()
  assert "1 it/s" in progress.line() and "ETA 0:01:29" in progress.line(), progress.line()


def test_preemption_guard_sigterm_sets_flag_and_restores_handlers():
  before_term = signal.getsignal(signal.SIGTERM)
  before_int = signal.getsignal(signal.SIGINT)
  with PreemptionGuard() as guard:
    assert not guard.requested and not guard.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    # The handler runs at the next bytecode boundary of the main thread.
    assert guard.requested
    assert guard.signal_name == "SIGTERM"
    assert guard.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
    assert guard.requested
  assert signal.getsignal(signal.SIGTERM) is before_term
  assert signal.getsignal(signal.SIGINT) is before_int
  message = guard.resume_message(42, "runs/x")
  assert "step 42" in message and "SIGTERM" in message and "--workdir=runs/x" in message


def test_second_sigint_interrupts_at_once():
  """Catches a second Ctrl-C that only sets the flag again (a stuck save could not be interrupted), and a guard
  that leaves its handler behind. The handler before it is restored, whatever it was (SIG_IGN under nohup)."""
  before = signal.getsignal(signal.SIGINT)
  with PreemptionGuard() as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.requested and guard.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # give the handler a bytecode boundary to run at
        pass
  assert signal.getsignal(signal.SIGINT) is before


def test_request_without_signal_and_reentry():
  guard = PreemptionGuard()
  with guard:
    assert not guard.should_stop()
    guard.request("time limit")
    assert guard.should_stop() and guard.signal_name == "time limit"
    with pytest.raises(RuntimeError, match="already active"):
      guard.__enter__()


@pytest.mark.parametrize("damage", ["remove", "truncate", "replace"])
def test_metrics_file_damaged_during_a_run_is_rebuilt(tmp_path, damage, caplog):
  """Catches a writer that keeps appending to a deleted file (the history silently lost) or after a cut."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # the records of an earlier session
  with MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(2, {"loss": 2.0})
    path = tmp_path / "metrics.jsonl"
    if damage == "remove":
      path.unlink()
    elif damage == "truncate":
      path.write_text(path.read_text()[:10])
    else:
      path.write_text('{"step": 99}\n')
    with caplog.at_level(logging.WARNING):
      writer.write(3, {"loss": 3.0})
  assert "rebuilt from the 2 records" in caplog.text
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
