"""The programs: search, train, study, pipeline, protocol; each resolves its configuration at the door."""

from tas_jax.runtime.loop import Cadence
from tas_jax.runtime.settings import RunSettings


def cadence(cfg: RunSettings) -> Cadence:
  """The loop cadence of a run's settings: ``log_every_steps``, ``checkpoint_every_steps``, ``stop_after_steps``."""
  return Cadence(cfg.log_every_steps, cfg.checkpoint_every_steps, cfg.stop_after_steps)
