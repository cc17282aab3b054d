"""Stopping cleanly on SIGTERM / Ctrl-C: finish the step, checkpoint, exit.

Schedulers (SLURM, Kubernetes, preemptible VMs) send SIGTERM some seconds
before killing a job; a user presses Ctrl-C. Under :class:`PreemptionGuard`
both only set a flag, and the training loop polls it::

  with PreemptionGuard() as guard:
    for step in range(start, total):
      state = train_step(state, batch)
      if step % 100 == 0 and guard.should_stop():
        checkpointer.save(step, state, meta)
        print(guard.resume_message(step))
        break

A second Ctrl-C while a stop is pending raises ``KeyboardInterrupt`` at
once, for a user who does not want to wait for the checkpoint.

With several processes the signal may reach only some of them, or reach them
at different steps; acting on the local flag would then send processes into
different code paths and hang the collectives. :meth:`should_stop` therefore
ORs the flag over processes, and must be called by all processes at the same
steps.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Callable, Sequence

import jax

from tas_jax.runtime import parallel

_Handler = Callable[[int, FrameType | None], Any] | int | None


class PreemptionGuard:
  """Context manager turning termination signals into a polled stop request.

  Args:
    signals: signals to catch; default SIGTERM and SIGINT.

  Handlers can only be installed from the main thread; elsewhere the guard
  installs none (and says so on stderr) but :meth:`request` still works.
  """

  def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)):
    self._signals = tuple(signals)
    self._previous: dict[signal.Signals, _Handler] = {}
    self._requested = False
    self._signal_name: str | None = None
    self._agreed = False
    self._active = False

  @property
  def requested(self) -> bool:
    """Whether a stop was requested on this process."""
    return self._requested

  @property
  def signal_name(self) -> str | None:
    """Name of the signal that requested the stop (e.g. ``"SIGTERM"``), or None."""
    return self._signal_name

  def request(self, reason: str = "request") -> None:
    """Asks for a stop without a signal (a time limit, a test)."""
    if not self._requested:
      self._requested = True
      self._signal_name = reason

  def should_stop(self) -> bool:
    """Whether any process was asked to stop; call it on all processes at once.

    With one process this only reads the flag; with several it is one small
    all-gather. Once true it stays true without further communication, which
    is consistent because every process saw the same answer.
    """
    if self._agreed:
      return True
    if jax.process_count() == 1:
      self._agreed = self._requested
    else:
      self._agreed = parallel.any_process(self._requested)
    return self._agreed

  def resume_message(self, step: int, workdir: str | None = None) -> str:
    """A line for the log: why the run stopped and how to continue it."""
    why = self._signal_name or "a stop request on another process"
    where = f"--workdir={workdir}" if workdir else "the same workdir"
    return (f"Stopped at step {step} after {why}; a checkpoint of step {step} was saved. "
            f"Run the same command again with {where} to resume from it.")

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    name = signal.Signals(signum).name
    if self._requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if not self._requested:
      self._requested = True
      self._signal_name = name
      # os.write, not print: a handler that runs while the main code is inside
      # a print to the same stream would hit a reentrant-call error.
      hint = " (Ctrl-C again to stop at once)" if signal.SIGINT in self._signals else ""
      _write_stderr(f"\n{name} received: stopping after the current step and saving a "
                    f"checkpoint{hint}.\n")

  def __enter__(self) -> PreemptionGuard:
    if self._active:
      raise RuntimeError("PreemptionGuard is already active")
    self._active = True
    if threading.current_thread() is not threading.main_thread():
      _write_stderr("PreemptionGuard: not the main thread, signal handlers not installed.\n")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      # None means a handler not installed from Python; the default is the
      # closest that can be put back.
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()
    self._active = False


def _write_stderr(text: str) -> None:
  try:
    os.write(2, text.encode())
  except OSError:
    pass
