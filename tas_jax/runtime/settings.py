"""A program's configuration resolved at the door: typed, complete and checked before anything is read or written.

The config files (``tas_jax/configs``) are ConfigDicts that a user edits and
overrides with ``--config.KEY=VALUE``. A program turns its ConfigDict into one
of the frozen dataclasses below exactly once, at its start
(:meth:`Settings.resolve`): every value gets its type, keys a config file may
leave out get their default here (their one home), and every value is checked
against its rule, so a negative learning rate or ``tau_min = 0`` is refused in
one line naming the key, before the dataset loads or ``config.json`` is
written. Below the door the code reads attributes of these values and never a
default of its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Callable, Mapping

from tas_jax.core import schedules
from tas_jax.data import image_tree

DTYPES = ("float32", "bfloat16")
BAD_IMAGE_POLICIES = image_tree.BAD_IMAGE_POLICIES
COSTS = ("macs", "latency")
VALID_SAMPLING = ("replacement", "shuffle")
SEARCH_MODES = ("shape", "width", "depth")
COST_BANDS = ("official", "paper")
TRAIN_MODES = ("base", "scratch", "kd", "finetune")
BUDGETS = ("epochs", "flops")
SCRATCH_B_RULES = ("cifar", "imagenet")
COLOR_AUGMENT = ("auto", "on", "off")


class SettingsError(ValueError):
  """A configuration value that cannot be meant; the message names the key."""


# ----------------------------------------------------------------------------- rules


def at_least(low) -> Callable[[Any], str | None]:
  return lambda v: None if v >= low else f"must be >= {low}"


def positive(v) -> str | None:
  return None if v > 0 else "must be > 0"


def in_open_unit(v) -> str | None:
  return None if 0 < v < 1 else "must lie in (0, 1)"


def in_unit(v) -> str | None:
  return None if 0 <= v <= 1 else "must lie in [0, 1]"


def below_one(v) -> str | None:
  return None if 0 <= v < 1 else "must lie in [0, 1)"


def one_of(*choices: str) -> Callable[[Any], str | None]:
  return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _field(default=dataclasses.MISSING, rule=None):
  return dataclasses.field(default=default, metadata={"rule": rule})


def required(rule=None):
  """A key every config file of the program sets (no default: a config without it is refused)."""
  return _field(rule=rule)


def optional(default, rule=None):
  """A key a config may leave out; ``default`` is its one default."""
  return _field(default, rule)


def _coerce(name: str, kind, value):
  """``value`` as the declared type ``kind``; a SettingsError naming ``config.name`` if it is not one."""
  if kind is bool:
    if isinstance(value, bool):
      return value
  elif kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
  elif kind is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      value = float(value)
      if math.isfinite(value):
        return value
      raise SettingsError(f"config.{name} must be a finite number, got {value!r}")
  elif kind is str:
    if isinstance(value, str):
      return value
  elif typing.get_origin(kind) is tuple:
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
      return tuple(value)
    if isinstance(value, str) and all(p.strip().lstrip("-").isdigit() for p in value.split(",") if p.strip()):
      return tuple(int(p) for p in value.split(",") if p.strip())
    raise SettingsError(f"config.{name} must be a list of integers, got {value!r}")
  names = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}
  raise SettingsError(f"config.{name} must be {names.get(kind, kind)}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  """Base of the typed configurations: resolution from a mapping, checks, the record of what ran."""

  @classmethod
  def resolve(cls, config: Mapping[str, Any] | "Settings", ignore: tuple[str, ...] = ()):
    """The settings a ConfigDict (or mapping) names; refuses unknown keys and values outside their rules.

    ``ignore`` names keys of the mapping that belong to someone else (a
    pipeline's own keys in a shared file) and are passed over.
    """
    if isinstance(config, cls):
      return config
    given = as_dict(config)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - names - set(ignore))
    if unknown:
      raise SettingsError(f"config.{unknown[0]} is not a setting of this program (a misspelt key?)")
    values = {}
    for f in dataclasses.fields(cls):
      if f.name in given and given[f.name] is not None:
        value = _coerce(f.name, hints[f.name], given[f.name])
      elif f.default is not dataclasses.MISSING:
        value = f.default
      else:
        raise SettingsError(f"config.{f.name} is missing (every config of this program sets it)")
      rule = f.metadata.get("rule")
      problem = rule(value) if rule is not None else None
      if problem:
        raise SettingsError(f"config.{f.name} {problem}, got {value!r}")
      values[f.name] = value
    settings = cls(**values)
    settings.check()
    return settings

  def check(self) -> None:
    """Checks that involve several keys (subclasses add theirs)."""

  def record(self) -> dict:
    """Every value, JSON-ready: what ``config.json`` records and checkpoints fingerprint."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  def fingerprint(self, keys) -> dict:
    record = self.record()
    return {k: record.get(k) for k in keys}

  def replace(self, **changes):
    return type(self).resolve({**dataclasses.asdict(self), **changes})


def as_dict(config) -> dict:
  """A ConfigDict (or mapping) as a plain JSON-ready dict."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSettings:
  """Where the images come from (see :func:`tas_jax.runtime.runs.load_data`)."""

  dataset: str
  data_dir: str
  download: bool
  num_train_examples: int
  data_seed: int
  on_bad_image: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunSettings(Settings):
  """What every program that runs steps takes: data, seed, batch, epochs, devices, the loop's cadence."""

  model: str = required()
  dataset: str = required()
  data_dir: str = optional("")
  download: bool = optional(False)
  num_train_examples: int = optional(0, at_least(0))  # 0 = the whole training set
  data_seed: int = optional(0, at_least(0))
  on_bad_image: str = optional("error", one_of(*BAD_IMAGE_POLICIES))
  seed: int = required(at_least(0))
  epochs: int = required(at_least(1))
  warmup_epochs: int = optional(0, at_least(0))
  batch_size: int = required(at_least(1))
  lr: float = required(at_least(0))  # 0 holds the weights (an architecture-only search)
  lr_schedule: str = optional("cosine", one_of(*schedules.LR_SCHEDULES))
  momentum: float = required(below_one)
  nesterov: bool = required()
  weight_decay: float = required(at_least(0))
  dtype: str = optional("float32", one_of(*DTYPES))
  log_every_steps: int = required(at_least(1))
  checkpoint_every_steps: int = required(at_least(0))  # 0 = at epoch ends only
  keep_checkpoints: int = optional(2, at_least(1))
  num_devices: int = optional(0, at_least(0))  # 0 = every device of every process
  stop_after_steps: int = optional(0, at_least(0))

  @property
  def data(self) -> DataSettings:
    return DataSettings(dataset=self.dataset, data_dir=self.data_dir, download=self.download,
                        num_train_examples=self.num_train_examples, data_seed=self.data_seed,
                        on_bad_image=self.on_bad_image)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSettings(RunSettings):
  """The search program's configuration (``tas_jax/configs/search.py`` documents every key)."""

  mode: str = optional("shape", one_of(*SEARCH_MODES))
  target_flops_ratio: float = required(in_open_unit)
  targets: str = optional("")
  split_seed: int = optional(0, at_least(0))
  arch_lr: float = required(positive)
  arch_b1: float = required(below_one)
  arch_b2: float = required(below_one)
  arch_weight_decay: float = required(at_least(0))
  arch_step_updates_bn: bool = optional(True)
  freeze_undrawn_bn: bool = optional(True)
  unbiased_var: bool = optional(True)
  valid_sampling: str = optional("replacement", one_of(*VALID_SAMPLING))
  tau_schedule: str = required(one_of(*schedules.TAU_SCHEDULES))
  tau_max: float = required(positive)
  tau_min: float = required(positive)
  cost_band: str = required(one_of(*COST_BANDS))
  cost_tolerance: float = required(below_one)
  cost_weight: float = required(at_least(0))
  exact_cost: bool = required()
  num_sampled: int = required(at_least(1))
  block_relu: bool = required()
  shortcut_bn: bool = required()
  width_multiple: int = optional(1, at_least(1))
  bn_groups: int = required(at_least(0))
  scan_blocks: bool = optional(True)
  eval_examples: int = optional(0, at_least(0))  # 0 = the whole validation half
  cost: str = optional("macs", one_of(*COSTS))
  latency_batch: int = optional(1, at_least(1))
  target_latency_ms: float = optional(0.0, at_least(0))
  fit_to_band: bool = optional(True)

  def check(self) -> None:
    if self.tau_min > self.tau_max:
      raise SettingsError(f"config.tau_min ({self.tau_min}) must not exceed config.tau_max ({self.tau_max})")
    if self.target_latency_ms > 0 and self.cost != "latency":
      raise SettingsError("config.target_latency_ms applies to cost=latency only")
    self.target_ratios()

  def target_ratios(self) -> list[float]:
    """The cost targets, as ratios of the unpruned network's cost: ``targets`` or ``target_flops_ratio``."""
    text = self.targets.strip()
    if not text:
      return [self.target_flops_ratio]
    try:
      values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
      raise SettingsError(f"config.targets must be comma-separated ratios such as 0.3,0.5,0.7, got {text!r}") from None
    if not values:
      raise SettingsError(f"config.targets must name at least one ratio, got {text!r}")
    for v in values:
      if not 0 < v < 1:
        raise SettingsError(f"config.targets must be ratios in (0, 1), got {v}")
    tags = [target_tag(v) for v in values]
    if len(set(tags)) != len(tags):
      raise SettingsError(f"config.targets must be distinct ratios (files are named by {TAG_DIGITS} significant "
                          f"digits: {', '.join(tags)}), got {text!r}")
    return values


# Output files of a multi-target search are named after the target with this many significant digits.
TAG_DIGITS = 6  # as "%g" writes them


def target_tag(ratio: float) -> str:
  """The name of a target ratio in file names (``shape_<tag>.json``)."""
  return f"{ratio:.{TAG_DIGITS}g}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings(RunSettings):
  """The training program's configuration (``tas_jax/configs/train.py`` documents every key)."""

  recipe: str = optional("")
  mode: str = required(one_of(*TRAIN_MODES))
  shape: str = optional("")
  teacher: str = optional("")
  init_from: str = optional("")
  budget: str = optional("epochs", one_of(*BUDGETS))
  scratch_b_rule: str = optional("cifar", one_of(*SCRATCH_B_RULES))
  kd_alpha: float = optional(0.9, in_unit)
  kd_temperature: float = optional(4.0, positive)
  val_examples: int = optional(0, at_least(0))
  official_tail: bool = optional(False)
  lr_per_epoch: bool = optional(False)
  eval_batch_size: int = optional(0, at_least(0))  # 0 = batch_size
  milestones: tuple[int, ...] = optional(())
  gamma: float = optional(0.1, positive)
  label_smoothing: float = optional(0.0, below_one)
  color_augment: str = optional("auto", one_of(*COLOR_AUGMENT))
  finetune_epochs: int = required(at_least(1))
  finetune_lr: float = required(positive)
  finetune_lr_schedule: str = required(one_of(*schedules.LR_SCHEDULES))
  finetune_milestones: tuple[int, ...] = optional(())
  eval_every_epochs: int = optional(0, at_least(0))
  bn_l1: float = optional(0.0, at_least(0))  # Network Slimming's L1 on batch-norm scales; 0 = none
  allow_foreign_teacher: bool = optional(False)  # accept a teacher or init_from run trained on other data
  reevaluate: bool = optional(False)  # a finished run: evaluate its final model again into reevaluation.json

  def check(self) -> None:
    if self.bn_l1 and self.mode not in ("base", "finetune"):
      raise SettingsError(f"sparsity training (config.bn_l1 > 0) starts from scratch (mode base) or from a run "
                          f"(finetune), got mode {self.mode!r}")
    for key in ("milestones", "finetune_milestones"):
      if any(m < 1 for m in getattr(self, key)):
        raise SettingsError(f"config.{key} must be positive epochs, got {getattr(self, key)}")
