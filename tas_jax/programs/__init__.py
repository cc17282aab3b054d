"""The programs: search, train, study, pipeline, protocol; each resolves its configuration at the door."""

from tas_jax.runtime.loop import Cadence


def cadence(config) -> Cadence:
  """The loop cadence a config names: ``log_every_steps``, ``checkpoint_every_steps``, ``stop_after_steps``."""
  return Cadence(int(config.log_every_steps), int(config.checkpoint_every_steps),
                 int(config.get("stop_after_steps", 0) or 0))
