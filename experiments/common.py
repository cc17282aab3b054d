"""Command-line plumbing shared by the entry scripts: flags, logging, one-line errors."""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configuration file[:argument]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (rerun the same command to resume)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs "
                                   "outside TPU pods and SLURM (which JAX detects by itself)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes of a multi-process run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "index of this process in a multi-process run")


def distributed() -> dict:
  """The multi-process flags, for ``engine.start``."""
  return {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
          "process_id": _PROCESS_ID.value}


def _errors():
  from tas_jax import checkpoint, data, engine, shapes
  return (engine.RunError, shapes.ShapeError, data.DataError, checkpoint.CheckpointError)


def launch(main):
  """Parse --config/--workdir, run ``main(config, workdir)``; known failures become one line and exit 2."""

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None:
      raise app.UsageError("--workdir is required")
    if _CONFIG.value is None:
      raise app.UsageError("--config is required")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every save at INFO
    logging.getLogger("tas_jax").setLevel(logging.INFO)
    try:
      main(_CONFIG.value, _WORKDIR.value)
    except _errors() as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  try:
    app.run(_main)
  except SystemExit:
    raise
  except Exception as e:  # a config file that does not load, a bad --config.KEY=VALUE
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(2)
