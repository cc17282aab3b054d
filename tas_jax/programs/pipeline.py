"""The whole TAS recipe as one resumable program: base training, search, distillation, baselines, report.

A pipeline directory holds one run directory per stage, each written by its
own engine, and a ``pipeline.json`` of its own:

* ``base/``: :func:`tas_jax.programs.train.run` in mode ``base``, the unpruned teacher (step 1);
* ``search/``: :func:`tas_jax.programs.search.run`, TAS's search of widths and depths (step 2);
* ``kd/``: :func:`tas_jax.programs.train.run` in mode ``kd``, the searched
  ``search/shape.json`` trained from scratch and distilled from ``base/`` (step 3);
* ``protocol/`` (with ``config.protocol``): the Rethinking baselines of
  :mod:`tas_jax.programs.protocol` around the searched shape;
* ``pipeline.json``: each stage's status, wall time summed over invocations,
  and the commands that reproduce it; ``report.md`` and ``figures/`` at the end
  (:mod:`tas_jax.report`).

A stage whose results are complete is not run again; one that was interrupted
is rerun on its directory, where its engine resumes from its checkpoint. A
complete stage whose configuration no longer matches (another number of
epochs, say, or for the distilled network and the baselines another searched
shape) is refused rather than silently reused, since every later stage builds
on it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import ml_collections

from tas_jax import report as report_lib

from tas_jax.runtime import runs
from tas_jax.runtime import files
from tas_jax.runtime import parallel, settings
from tas_jax.runtime.settings import SearchSettings, TrainSettings
from tas_jax.runtime import stages as pipeline_dir
from tas_jax.configs import train as train_configs
from tas_jax.programs import protocol, search, train
from tas_jax.steps import search as search_lib
from tas_jax.steps import train as train_lib

# Keys of the pipeline config copied into every stage config that has them.
SHARED_KEYS = ("dataset", "data_dir", "download", "num_train_examples", "model", "seed", "target_flops_ratio")
# Keys every engine reads with a default: copied into every stage config when the pipeline config has them.
ENGINE_KEYS = ("on_bad_image",)
# Where each stage's configuration lives in the pipeline config.
CONFIG_KEYS = {"base": "base", "search": "search", "kd": "kd", "protocol": "baselines"}


def _copy(config) -> ml_collections.ConfigDict:
  # A fresh, unlocked copy: the flags hand over a locked config, and the wiring adds keys.
  return ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def stage_config(config, workdir: str, stage: str) -> ml_collections.ConfigDict:
  """The configuration ``stage`` runs with: its nested config, the shared keys, and its inputs' paths."""
  if stage not in pipeline_dir.STAGES:
    raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(pipeline_dir.STAGES)}")
  if stage == "protocol":
    return protocol_config(config, workdir)
  c = _copy(config.get(CONFIG_KEYS[stage]) or {})
  for key in SHARED_KEYS:
    if key in c and key in config:
      c[key] = config[key]
  for key in ENGINE_KEYS:
    if key in config:
      c[key] = config[key]
  if stage == "base":
    c.mode = "base"
  elif stage == "kd":
    c.mode = "kd"
    c.shape = os.path.join(pipeline_dir.stage_dir(workdir, "search"), "shape.json")
    c.teacher = pipeline_dir.stage_dir(workdir, "base")
  return c


def stage_settings(config, workdir: str, stage: str) -> SearchSettings | TrainSettings:
  """The typed, checked settings of the search or a training stage (:func:`stage_config` resolved)."""
  cls = SearchSettings if stage == "search" else TrainSettings
  return cls.resolve(stage_config(config, workdir, stage))


def _override_text(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ", ".join(str(v) for v in value) + ")"
  return str(value)


def protocol_config(config, workdir: str) -> ml_collections.ConfigDict:
  """The arguments of :func:`tas_jax.programs.protocol.run` for the baselines of the searched shape.

  With ``baselines.recipe`` empty the baselines train like the kd stage:
  its recipe, and every training key in which the kd stage departs from that
  recipe's defaults (epochs, batch size, data, ...) becomes an override; with
  another recipe only the shared data keys do. ``baselines.overrides`` come
  last. Seeds are the protocol's own (0 .. seeds-1).
  """
  b = config.get("baselines") or {}
  kd = stage_config(config, workdir, "kd")
  recipe = b.get("recipe") or kd.recipe
  defaults = train_configs.get_config(f"{kd.model},{recipe}")
  keys = sorted(kd.keys()) if recipe == kd.recipe else [k for k in SHARED_KEYS if k in kd]
  skip = set(protocol.PROTECTED) | {"model", "kd_alpha", "kd_temperature"}
  overrides = [f"{k}={_override_text(kd[k])}" for k in keys
               if k not in skip and k in defaults and kd[k] != defaults[k]]
  variants = tuple(b.get("variants") or ())
  base = pipeline_dir.stage_dir(workdir, "base")
  c = ml_collections.ConfigDict()
  c.shape = kd.shape
  c.teacher = base
  c.inherit = base if "finetune" in variants else ""
  c.seeds = int(b.get("seeds", 1))
  c.recipe = recipe
  c.variants = variants
  c.overrides = tuple(overrides) + tuple(b.get("overrides") or ())
  c.latency_batch_sizes = tuple(int(v) for v in (b.get("latency_batch_sizes") or ()))
  c.latency_runs = int(b.get("latency_runs", 10))
  c.label = "searched"
  return c


def effective_config(config, workdir: str) -> dict:
  """The pipeline config as run: its own keys, and every stage's config after :func:`stage_config`."""
  out = {k: v for k, v in settings.as_dict(config).items() if k not in CONFIG_KEYS.values()}
  for stage in pipeline_dir.enabled_stages(config):
    out[CONFIG_KEYS[stage]] = settings.as_dict(stage_config(config, workdir, stage))
  return out


# ----------------------------------------------------------------------------- completion


def _fingerprint_keys(stage: str) -> tuple[str, ...]:
  if stage == "search":
    return search_lib.FINGERPRINT_KEYS
  return train_lib.FINGERPRINT_KEYS


def config_changes(workdir: str, stage: str, config) -> dict[str, tuple[Any, Any]]:
  """Trajectory-changing keys whose recorded value differs from ``config``'s (a stage's settings; the protocol's
  arguments).

  The engines' stages record their configuration in ``config.json``; the
  protocol its recipe in ``protocol.json`` (its runs' own ``config.json``
  guard the rest, and more variants or seeds simply extend it). Returns
  ``{key: (recorded, now)}``; empty when nothing differs or nothing was recorded.
  """
  d = pipeline_dir.stage_dir(workdir, stage)
  changes = {}
  if stage in ("kd", "protocol"):
    # Both train the searched shape: a search run again since then makes them stale.
    searched = pipeline_dir.read_json(os.path.join(pipeline_dir.stage_dir(workdir, "search"), "shape.json"))
    record = pipeline_dir.read_json(os.path.join(d, "result.json" if stage == "kd" else "protocol.json")) or {}
    trained = record.get("shape")
    if searched and trained and _shape_key(trained) != _shape_key(searched):
      changes["searched shape"] = (_shape_text(trained), _shape_text(searched))
  if stage == "protocol":
    summary = pipeline_dir.read_json(os.path.join(d, "protocol.json")) or {}
    if "recipe" in summary and summary["recipe"] != config.recipe:
      changes["recipe"] = (summary["recipe"], config.recipe)
    return changes
  recorded = pipeline_dir.read_json(os.path.join(d, "config.json"))
  if recorded is None:
    return changes
  now = config.record()
  changes.update({k: (recorded.get(k), now.get(k)) for k in _fingerprint_keys(stage)
                  if k in now and recorded.get(k) != now.get(k)})
  return changes


def _shape_key(d: Mapping[str, Any]) -> tuple:
  return tuple(d.get("widths") or ()), tuple(d.get("blocks") or ())


def _shape_text(d: Mapping[str, Any]) -> str:
  return f"widths {list(d.get('widths') or [])} blocks {list(d.get('blocks') or [])}"


# ----------------------------------------------------------------------------- runners

def run_protocol(config, workdir: str, distributed=None, command: str = "") -> dict:
  """The protocol stage: :func:`tas_jax.programs.protocol.run` with the arguments of :func:`protocol_config`."""
  try:
    return protocol.run(config.shape, config.teacher, int(config.seeds), workdir, recipe=config.recipe,
                        inherit=config.inherit or None, overrides=list(config.overrides),
                        variants=list(config.variants), label=config.label,
                        latency_batch_sizes=list(config.latency_batch_sizes), latency_runs=int(config.latency_runs))
  except protocol.ProtocolError as e:
    raise runs.RunError(str(e)) from None


def _runner(stage: str) -> Callable[..., dict]:
  if stage == "search":
    return search.run
  if stage == "protocol":
    return run_protocol
  return train.run


def _finished(stage: str, result: Mapping[str, Any] | None) -> bool:
  """Whether a runner's return value says the stage ran to its end (rather than stopping to resume later)."""
  if not isinstance(result, Mapping):
    return True
  return bool(result.get("finished", True))


# ----------------------------------------------------------------------------- state file


class _State:
  """``pipeline.json``, kept current as stages start and end (main process only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, pipeline_dir.STATE_FILE)
    self.enabled = enabled
    self.data = pipeline_dir.read_state(workdir)

  def stage(self, name: str) -> dict:
    return self.data["stages"].setdefault(name, {"status": "pending", "wall_s": 0.0, "invocations": 0})

  def save(self) -> None:
    if self.enabled:
      self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
      files.write_json(self.path, self.data)


def run(config, workdir: str, distributed: Mapping[str, Any] | None = None, *, command: str = "",
        stage_commands: Mapping[str, str] | None = None, report: bool | None = None,
        on_stage: Callable[[str, str], None] | None = None) -> dict:
  """Run the pipeline's stages that are not complete yet, then write the report.

  Args:
    config: a pipeline config (tas_jax/configs/pipeline.py).
    workdir: the pipeline directory; rerunning on it resumes.
    distributed: multi-process settings, as for the engines.
    command: the command line that runs this pipeline, for the report.
    stage_commands: per stage, a command that reruns the stage by itself.
    report: write the report at the end (default: ``config.report``).
    on_stage: called with ``(stage, "skipped" | "started" | "done" | "stopped")``.

  Returns:
    ``{"finished", "stages": {name: status}, "report": path or None, "results": {name: result}}``;
    ``finished`` is False when a stage stopped early (``stop_after_steps``) and
    the pipeline must be rerun to go on.

  Raises:
    RunError: a complete stage recorded under another configuration, or
      another live run holds ``workdir`` (its lock is held for the whole
      pipeline; each stage locks its own directory too).
    SettingsError: a stage's configuration value outside its rule (checked
      for every stage before the first starts).
  """
  workdir = os.path.normpath(workdir)
  # Every stage's settings are checked before the first one starts: a bad search key is not found hours later.
  for name in pipeline_dir.enabled_stages(config):
    if name != "protocol":
      stage_settings(config, workdir, name)
  parallel.initialize_distributed(**{k: v for k, v in (distributed or {}).items() if v is not None})
  held = runs.claim(workdir)
  try:
    return _run_stages(config, workdir, distributed, command, stage_commands, report, on_stage)
  finally:
    if held is not None:
      held.release()


def _run_stages(config, workdir: str, distributed, command: str, stage_commands, report, on_stage) -> dict:
  is_main = parallel.is_main_process()
  os.makedirs(workdir, exist_ok=True)
  state = _State(workdir, is_main)
  state.data.update(preset=config.get("preset", ""), model=config.get("model", ""),
                    dataset=config.get("dataset", ""), target_flops_ratio=config.get("target_flops_ratio"),
                    command=command or state.data.get("command", ""), config=effective_config(config, workdir),
                    finished=False)
  if stage_commands:
    state.data["stage_commands"] = dict(stage_commands)
  notify = on_stage or (lambda stage, status: None)
  statuses, results = {}, {}
  for name in pipeline_dir.enabled_stages(config):
    statuses[name] = _run_stage(config, workdir, name, state, results, distributed, notify, command)
    if statuses[name] == "stopped":
      state.data["finished"] = False
      state.save()
      return {"finished": False, "stages": statuses, "report": None, "results": results}
  state.data["finished"] = True
  state.save()
  path = None
  if (config.get("report", True) if report is None else report) and is_main:
    path = report_lib.write_report(workdir)
  return {"finished": True, "stages": statuses, "report": path, "results": results}


def _run_stage(config, workdir: str, name: str, state: _State, results: dict, distributed, notify,
               command: str) -> str:
  """One stage: ``skipped`` when already complete (under the same configuration), else ``done`` or ``stopped``."""
  c = stage_config(config, workdir, name) if name == "protocol" else stage_settings(config, workdir, name)
  d = pipeline_dir.stage_dir(workdir, name)
  rec = state.stage(name)
  if pipeline_dir.is_complete(workdir, name, c):
    changed = config_changes(workdir, name, c)
    if changed:
      what = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
      raise runs.RunError(f"stage {name} in {d} finished under another configuration ({what}); "
                          "rerun with the configuration that wrote it, or use another --workdir")
    rec["status"] = "done"
    notify(name, "skipped")
    return "skipped"
  rec["status"] = "running"
  rec["invocations"] = int(rec.get("invocations", 0)) + 1
  state.save()
  notify(name, "started")
  t0 = time.time()
  finished = False
  try:
    result = _runner(name)(c, d, distributed, command=command)
    results[name] = result
    finished = _finished(name, result) and pipeline_dir.is_complete(workdir, name, c)
  finally:
    rec["wall_s"] = float(rec.get("wall_s", 0.0)) + time.time() - t0
    rec["status"] = "done" if finished else "stopped"
    state.save()
  notify(name, rec["status"])
  return rec["status"]
