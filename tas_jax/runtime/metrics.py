"""Metrics on disk (JSON lines + TensorBoard) and a progress bar, for process 0.

:class:`MetricWriter` appends one JSON object per call to
``<workdir>/metrics.jsonl`` (the record scripts and tests read back with
:func:`read_metrics`) and mirrors the scalars into TensorBoard event files
under ``<workdir>/tb/`` through tensorboardX, which needs no TensorFlow.

A resumed run continues from its checkpoint step, so whatever the interrupted
run logged after that step is stale: :meth:`MetricWriter.truncate_after`
drops those JSON records and makes TensorBoard hide the stale events, so each
step appears once.

Only process 0 should write: build writers with ``enabled=is_main_process()``;
disabled writers and progress bars do nothing.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import time
from typing import IO, Any, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

_log = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
  """``json.dumps`` hook for numpy and JAX values."""
  if isinstance(value, np.generic):
    return value.item()
  if hasattr(value, "__array__"):  # numpy and JAX arrays
    return np.asarray(value).tolist()
  if isinstance(value, (set, frozenset)):
    return sorted(value)
  raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def to_json_value(value: Any) -> Any:
  """``value`` as plain JSON types (arrays become lists, tuples lists).

  Raises:
    TypeError: for values JSON cannot represent.
  """
  return json.loads(json.dumps(value, default=_json_default))


def _scalar(name: str, value: Any) -> int | float:
  """A metric value as a Python number; ints stay ints (counts, epochs)."""
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"metric {name!r} is not a scalar: {value!r}") from e


def _metrics_path(path: str | os.PathLike[str]) -> str:
  path = os.fspath(path)
  return os.path.join(path, METRICS_FILE) if os.path.isdir(path) else path


def _parse_lines(lines: list[str], path: str) -> list[dict[str, Any]]:
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      # A run killed in the middle of a write leaves half a line at the end.
      _log.warning("%s:%d: skipping an unreadable record", path, number)
  return records


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Records of a ``metrics.jsonl`` file (or of the one in directory ``path``).

  Unreadable lines (a write cut short by a crash) are skipped with a warning.
  Returns an empty list when the file does not exist.
  """
  path = _metrics_path(path)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return _parse_lines(f.readlines(), path)


class MetricWriter:
  """Writes scalar metrics to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: run directory; created if missing.
    enabled: when False (processes other than 0) every method does nothing.
    tensorboard: also write TensorBoard event files under ``workdir/tb``.
  """

  def __init__(self, workdir: str | os.PathLike[str], enabled: bool = True, tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self.tensorboard = tensorboard
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self._file: IO[str] | None = None
    self._lines: list[str] = []
    self._tb: Any = None
    # Steps >= this are hidden by TensorBoard when the event writer opens.
    self._purge_step: int | None = None
    if enabled:
      os.makedirs(self.workdir, exist_ok=True)

  def _jsonl(self) -> IO[str]:
    if self._file is None:
      # What the file holds, kept in memory: the history it is rebuilt from if it is removed or cut short.
      self._lines = [json.dumps(r) + "\n" for r in read_metrics(self.path)]
      self._file = open(self.path, "a", encoding="utf-8")
      if self._file.tell() != sum(len(line.encode()) for line in self._lines):  # a half line at the end
        self._rewrite()
    elif self._damaged():
      _log.warning("%s was removed, replaced or cut short during the run; rebuilt from the %d records of this run",
                   self.path, len(self._lines))
      self._rewrite()
    return self._file

  def _damaged(self) -> bool:
    try:
      on_disk = os.stat(self.path)
    except FileNotFoundError:
      return True
    mine = os.fstat(self._file.fileno())
    return (on_disk.st_ino, on_disk.st_dev) != (mine.st_ino, mine.st_dev) or on_disk.st_size < self._file.tell()

  def _rewrite(self) -> None:
    """Replaces the file with the records this writer knows (atomically) and appends to it from there."""
    if self._file is not None:
      self._file.close()
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(self._lines)
    os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def _summary(self) -> Any:
    # Opened on first use so that truncate_after() can still set purge_step.
    if self._tb is None:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      # Event file names only carry whole seconds; a writer reopened within
      # the same second (a quick restart) would overwrite the previous file.
      # The nanosecond suffix keeps names unique and in time order, which
      # TensorBoard relies on to apply purge_step.
      self._tb = tensorboardX.SummaryWriter(
          logdir=os.path.join(self.workdir, TB_DIR), purge_step=self._purge_step,
          filename_suffix=f".{time.time_ns()}")
    return self._tb

  def write(self, step: int, scalars: Mapping[str, Any], **extra: Any) -> None:
    """Appends ``{"step": step, **scalars, **extra}`` to the JSON lines file.

    Args:
      step: global step the values belong to.
      scalars: name -> number (Python, numpy or 0-d JAX arrays); also written
        to TensorBoard.
      **extra: further JSON-able fields for the JSON record only (e.g. the
        current architecture as a list of widths).
    """
    if not self.enabled:
      return
    step = int(step)
    values = {str(k): _scalar(k, v) for k, v in scalars.items()}
    record = {"step": step, **values, **to_json_value(extra)}
    record["step"] = step
    f = self._jsonl()
    line = json.dumps(record) + "\n"
    f.write(line)
    f.flush()
    self._lines.append(line)
    if self.tensorboard:
      tb = self._summary()
      for name, value in values.items():
        tb.add_scalar(name, value, global_step=step)
      tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A text summary (e.g. the derived architecture) in TensorBoard."""
    if self.enabled and self.tensorboard:
      self._summary().add_text(tag, text, global_step=int(step))
      self._summary().flush()

  def write_hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> None:
    """Saves ``hparams.json`` in the workdir and an HParams summary in TensorBoard.

    TensorBoard only takes numbers, strings and booleans as values; anything
    else (lists, nested dicts) is shown as its JSON text.
    """
    if not self.enabled:
      return
    plain = to_json_value(dict(hparams))
    tmp = os.path.join(self.workdir, "hparams.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(plain, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(self.workdir, "hparams.json"))
    if self.tensorboard:
      flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in plain.items()}
      scores = {str(k): _scalar(k, v) for k, v in (metrics or {}).items()}
      self._summary().add_hparams(flat, scores, name="hparams")
      self._summary().flush()

  def truncate_after(self, step: int) -> int:
    """Forgets everything logged for steps after ``step``, before a resumed run logs.

    Rewrites ``metrics.jsonl`` without records whose ``step`` is greater
    than ``step`` (atomically: a crash leaves the old or the new file), and
    has TensorBoard hide events from step ``step + 1`` on. Pass the restored
    checkpoint step, or -1 when starting from scratch in a used workdir.

    Returns:
      the number of records dropped.
    """
    if not self.enabled:
      return 0
    self._close_files()
    self._purge_step = int(step) + 1
    if not os.path.exists(self.path):
      return 0
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    kept, dropped = [], 0
    for record in _parse_lines(lines, self.path):
      if int(record.get("step", -1)) > step:
        dropped += 1
      else:
        kept.append(json.dumps(record) + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    if dropped:
      _log.info("Dropped %d metric records after step %d from %s.", dropped, step, self.path)
    return dropped

  def _close_files(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def close(self) -> None:
    """Flushes and closes the files; the writer reopens them if used again."""
    self._close_files()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _format_value(value: Any) -> str:
  if isinstance(value, str):
    return value
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)


FIRST_ETA_S = 5.0  # steady-state seconds before a log's first status line


class Progress:
  """A progress bar with rate and ETA on process 0.

  On a terminal this is a tqdm bar. When stderr is not a terminal (log files,
  batch jobs) it prints a plain line at most every ``log_every_s`` seconds
  instead (the first one ``FIRST_ETA_S`` seconds after the first step), so
  logs stay readable. Disabled, it does nothing.

  The rate and ETA count from the end of the first step: that step compiles
  (tens of seconds to minutes) and would make every early ETA many times too
  long. Its time is reported once, as such. Other one-off work (the first
  epoch's evaluation compiles too) is left out with :meth:`exclude`.

  Args:
    total: number of steps of the whole run.
    initial: steps already done (a resumed run), excluded from the rate.
    desc: label in front of the bar.
    enabled: False on processes other than 0.
    log_every_s: interval of the plain lines when stderr is not a terminal.
    stream: where to write; default ``sys.stderr``.
  """

  def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True, *,
               log_every_s: float = 60.0, stream: IO[str] | None = None):
    self.total = int(total)
    self.n = int(initial)
    self.desc = desc
    self.enabled = enabled
    self.log_every_s = log_every_s
    self._stream = stream if stream is not None else sys.stderr
    self._initial = self.n
    self._start = time.monotonic()
    self._last_line = self._start
    self._printed_n = self.n
    self._postfix: dict[str, str] = {}
    self._steady: tuple[float, int] | None = None  # (time, steps) at the end of the first step
    self._bar: Any = None
    if enabled and getattr(self._stream, "isatty", lambda: False)():
      import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm.tqdm(total=self.total, initial=self.n, desc=desc or None, file=self._stream,
                            dynamic_ncols=True, smoothing=0.05)

  def update(self, n: int = 1) -> None:
    """Marks ``n`` more steps as done."""
    if not self.enabled:
      return
    self.n += n
    if self._steady is None:
      now = time.monotonic()
      self._steady = (now, self.n)
      self._last_line = now
      self.write(f"{self.desc + ': ' if self.desc else ''}first step {_format_duration(now - self._start)} "
                 "(with any compilation; the ETA counts from here)")
      if self._bar is not None:  # restart tqdm's clock and rate here
        self._bar.reset(total=self.total)
        self._bar.initial = self._bar.n = self.n
        self._bar.refresh()
      return
    if self._bar is not None:
      self._bar.update(n)
    else:
      # The first ETA of a log comes soon after compilation; later lines at the slower cadence.
      interval = self.log_every_s if self._printed_n > self._steady[1] else min(self.log_every_s, FIRST_ETA_S)
      if time.monotonic() - self._last_line >= interval or self.n >= self.total:
        self._print_line()

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` of one-off work (the first evaluation, which compiles) out of the rate and ETA."""
    if self._steady is not None:
      self._steady = (self._steady[0] + seconds, self._steady[1])

  def write(self, text: str) -> None:
    """A line of its own (an epoch summary), above the bar on a terminal."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=self._stream)
    else:
      print(text, file=self._stream, flush=True)

  def set_postfix(self, values: Mapping[str, Any]) -> None:
    """Shows ``values`` (e.g. loss, accuracy; JAX scalars are fine) after the bar."""
    if not self.enabled:
      return
    self._postfix = {str(k): _format_value(v) for k, v in values.items()}
    if self._bar is not None:
      self._bar.set_postfix(self._postfix, refresh=False)

  def line(self) -> str:
    """The plain status line: position, rate, elapsed time, ETA and postfix."""
    now = time.monotonic()
    elapsed = now - self._start
    since, steps = self._steady or (self._start, self._initial)
    rate = (self.n - steps) / (now - since) if now > since and self.n > steps else 0.0
    eta = (self.total - self.n) / rate if rate > 0 else float("inf")
    pct = 100.0 * self.n / self.total if self.total else 100.0
    parts = [f"{self.desc + ': ' if self.desc else ''}{self.n}/{self.total} ({pct:.1f}%)",
             f"{rate:.3g} it/s", f"elapsed {_format_duration(elapsed)}", f"ETA {_format_duration(eta)}"]
    parts += [f"{k}={v}" for k, v in self._postfix.items()]
    return ", ".join(parts)

  def _print_line(self) -> None:
    self._last_line = time.monotonic()
    self._printed_n = self.n
    print(self.line(), file=self._stream, flush=True)

  def close(self) -> None:
    """Closes the bar (or prints the final line)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self.n != self._printed_n:
      self._print_line()
    self.enabled = False

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
