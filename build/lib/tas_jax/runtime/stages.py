"""The layout of a pipeline directory: its stages, their run directories, ``pipeline.json``, and when a stage is done.

The pipeline program writes it and the report reads it, both through this
module, so neither needs the other.
"""

from __future__ import annotations

import os

from tas_jax.runtime import files


STAGES = ("base", "search", "kd", "protocol")


STATE_FILE = "pipeline.json"


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(os.path.normpath(workdir), stage)


def enabled_stages(config) -> tuple[str, ...]:
  """The stages a pipeline config (or the ``config`` recorded in ``pipeline.json``) runs, in order."""
  return STAGES if (config or {}).get("protocol", False) else STAGES[:3]


def read_json(path: str) -> dict | None:
  """A JSON object file, or None when it is missing, cut short or not an object."""
  return files.read_json(path, None)


def is_complete(workdir: str, stage: str, config=None) -> bool:
  """Whether ``stage``'s results in ``workdir`` are all there (so the stage need not run).

  For the protocol, ``config`` (its :func:`stage_config`) names the variants
  and seeds wanted; without it every variant recorded must have all its seeds.
  """
  d = stage_dir(workdir, stage)
  if stage == "protocol":
    return _protocol_complete(d, config)
  result = read_json(os.path.join(d, "result.json"))
  if not result or not result.get("finished"):
    return False
  if stage == "search":
    return os.path.isfile(os.path.join(d, "shape.json"))
  if stage == "base":  # the KD teacher and the fine-tuning source
    return os.path.isfile(os.path.join(d, "model", "shape.json"))
  return "test_top1" in result


def _protocol_complete(directory: str, config=None) -> bool:
  summary = read_json(os.path.join(directory, "protocol.json"))
  if not summary or not isinstance(summary.get("variants"), dict):
    return False
  variants = summary["variants"]
  wanted = list(config.variants) if config is not None else list(variants)
  seeds = int(config.seeds) if config is not None else None
  for v in wanted:
    entry = variants.get(v) or {}
    if int(entry.get("n", 0)) < (seeds if seeds is not None else int(entry.get("planned", 1))):
      return False
  return bool(wanted)


def read_state(workdir: str) -> dict:
  """``pipeline.json``: ``{"preset", "stages": {name: {"status", "wall_s", "invocations", ...}}, ...}``."""
  state = read_json(os.path.join(os.path.normpath(workdir), STATE_FILE)) or {}
  state.setdefault("stages", {})
  return state
