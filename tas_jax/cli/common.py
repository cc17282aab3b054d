"""Command-line plumbing shared by the entry scripts: flags, logging, signals, one-line errors.

Exit status of :func:`launch`: 0 done (or stopped by ``stop_after_steps``),
2 an error reported in one ``error: ...`` line on stderr (a bad flag or
config, missing data, a refused checkpoint, a non-finite loss), 3 stopped by
SIGTERM/SIGINT with every finished step saved (rerun the same command to
resume), 130 a second Ctrl-C that did not wait for the checkpoint. See
docs/RELIABILITY.md.
"""

from __future__ import annotations

import ast
import errno
import logging
import os
import shlex
import shutil
import signal
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tas_jax import data  # noqa: E402
from tas_jax.core import shapes  # noqa: E402
from tas_jax.runtime import checkpoint, lock, runs, settings  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configuration file[:argument]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (rerun the same command to resume)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs "
                                   "outside TPU pods and SLURM (which JAX detects by itself)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "index of this process in a multi-process run")

# Keys every engine reads with a default (tas_jax.runtime.runs.load_data), added to
# configs that lack them so that --config.KEY=VALUE can set them.
ENGINE_DEFAULTS = {"on_bad_image": "error"}

ERROR, PREEMPTED, INTERRUPTED = 2, 3, 130


def packaged_config(argument: str) -> str:
  """``NAME[.py][:ARG]`` names a config file of the package (``search``, ``train``, ``pipeline``, ``study``).

  A path that exists is taken as it is, so a config file of one's own works
  the same way; the package's files are found wherever it is installed.
  """
  path, sep, arg = str(argument).partition(":")
  if not path or os.path.exists(path):
    return argument
  name = os.path.basename(path)
  name = name if name.endswith(".py") else f"{name}.py"
  packaged = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", name)
  if os.path.dirname(path) not in ("", "tas_jax/configs") or not os.path.isfile(packaged):
    return argument
  return packaged + sep + arg


class _WithEngineDefaults:
  """The config file flag's parser, adding the missing :data:`ENGINE_DEFAULTS` to a config that names a dataset."""

  def __init__(self, parser):
    self._parser = parser

  def parse(self, argument):
    config = self._parser.parse(packaged_config(argument))
    if isinstance(config, ml_collections.ConfigDict) and "dataset" in config:
      missing = {k: v for k, v in ENGINE_DEFAULTS.items() if k not in config}
      if missing:
        with config.unlocked():
          config.update(missing)
    return config

  def __getattr__(self, name):
    return getattr(self._parser, name)


# The overrides (--config.KEY=VALUE) are applied to what this parser returns.
flags.FLAGS["config"].parser = _WithEngineDefaults(flags.FLAGS["config"].parser)


def distributed() -> dict:
  """The multi-process flags, for ``runs.start``."""
  return {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
          "process_id": _PROCESS_ID.value}


def command() -> str:
  """The command that started this program, quoted: what a stopped run tells the user to rerun."""
  return shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])


def _errors():
  return (runs.RunError, lock.LockError, settings.SettingsError, shapes.ShapeError, data.DataError, checkpoint.CheckpointError)


def one_line(error: BaseException) -> str:
  """An exception as one line: flag and config-file errors carry tracebacks and indented detail.

  Keeps the first line (what failed) and, when there are more, the last
  (why: the exception at the bottom of a traceback, the errno of a file).
  """
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) == 1:
    return lines[0]
  return f"{lines[0].rstrip(':')}: {lines[-1]}"


def _fail(message: str, status: int = ERROR):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or --config.KEY value reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(one_line(e))
  except (AttributeError, KeyError) as e:  # --config.KEY for a KEY the config lacks
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    for _ in range(2):  # ml_collections quotes the KeyError's message, sometimes twice
      if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
          text = ast.literal_eval(text)
        except (ValueError, SyntaxError):
          break
    _fail(f"unknown config key {one_line(ValueError(text))}")


def _stop_outside_loop(hint: str):
  """The handler of SIGTERM/SIGINT while no step loop runs (loading data, compiling, writing the final outputs).

  Nothing is in flight that a checkpoint would keep: steps are saved by the
  loop, whose own handler takes over while it runs, and every file is written
  atomically. So exit at once, as a kill would, but saying so.
  """

  def handle(signum, frame):
    del frame
    name = signal.Signals(signum).name
    os.write(2, (f"\nstopped by {name} outside the training steps (while setting up or writing the final "
                 f"outputs); no finished step is lost. {hint}\n").encode())
    os._exit(PREEMPTED)

  return handle


def _quiet_abandoned_reads(default):
  """An unraisable-exception hook that drops the noise of a damaged checkpoint.

  When reading a checkpoint fails, Orbax gives up on its event loop while
  TensorStore still completes the other reads; each completion then fails on
  the closed loop with a harmless "Event loop is closed" traceback. The
  failure itself is reported, in one line, by the checkpoint code.
  """

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    default(unraisable)

  return hook


def _out_of_space(error: BaseException | None) -> bool:
  """Whether a failure comes from a full disk (or quota): an OSError, or TensorStore's RESOURCE_EXHAUSTED on a write."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "No space left on device" in text or ("RESOURCE_EXHAUSTED" in text and "writing" in text.lower()):
      return True
    error = error.__cause__ or error.__context__
  return False


def _disk_full(workdir: str) -> str:
  """The line for a write that failed on a full disk: where, how much is free, what is kept, what to do."""
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  free = shutil.disk_usage(existing).free
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if os.path.isdir(ckpt_dir) else []
  kept = f"the last complete checkpoint, step {steps[-1]}, is kept" if steps else "no checkpoint had been written yet"
  return (f"no space left on the device of {workdir} ({free / 2**20:.1f} MiB free): the write in progress was "
          f"abandoned and {kept}. Free some space. {runs.resume_hint(command())}")


class _BackgroundWriteErrors(logging.Filter):
  """Drops Orbax's error reports from its writer threads: the failure reaches the main thread, which reports it once."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname
                and record.threadName != threading.main_thread().name)


def launch(main):
  """Parse --config/--workdir, run ``main(config, workdir)``; known failures become one line and exit 2."""

  def _main(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None:
      _fail("--workdir is required")
    if _CONFIG.value is None:
      _fail("--config is required")
    try:
      config = _CONFIG.value
      config.get("dataset")  # a config file that did not load raises on first use
    except Exception as e:  # pylint: disable=broad-except
      _fail(f"cannot load --config: {one_line(e)}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every save at INFO
    logging.getLogger("tas_jax").setLevel(logging.INFO)
    sys.unraisablehook = _quiet_abandoned_reads(sys.unraisablehook)
    handler = _stop_outside_loop(runs.resume_hint(command()))
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    logging.getLogger("absl").addFilter(_BackgroundWriteErrors())
    try:
      main(config, _WORKDIR.value)
    except _errors() as e:
      _fail(_disk_full(_WORKDIR.value) if _out_of_space(e) else one_line(e))
    except KeyboardInterrupt:
      _fail("interrupted by a second Ctrl-C before the checkpoint was written: the steps since the last checkpoint "
            f"are lost. {runs.resume_hint(command())}", INTERRUPTED)
    finally:
      for sig, old in previous.items():
        signal.signal(sig, old)

  try:
    app.run(_main, flags_parser=_parse_flags)
  except SystemExit as e:
    if e.code == 1 and _asked_for_help(sys.argv[1:]):  # absl ends --help with status 1; help is not an error
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except  # an unexpected failure: still one line
    if _out_of_space(e) and _WORKDIR.value:
      _fail(_disk_full(_WORKDIR.value))
    _fail(f"{type(e).__name__}: {one_line(e)}")


def _asked_for_help(args) -> bool:
  return any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in args)
