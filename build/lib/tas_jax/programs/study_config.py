"""The study's configuration, resolved once at the door into typed values and checked there."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from tas_jax import baselines
from tas_jax.configs import search as search_configs
from tas_jax.configs import train as train_configs
from tas_jax.core import shape_files, shapes
from tas_jax.programs import protocol
from tas_jax.report.study import VARIANTS


class StudyError(ValueError):
  """A study request that cannot be carried out; the message says why."""


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """A study's settings, typed and checked once (:meth:`from_mapping`), so nothing below re-reads a config dict."""

  model: str = "resnet20"
  dataset: str = "cifar10"
  data_dir: str = ""
  num_classes: int = 10
  num_train_examples: int = 0  # 0 = the whole training set
  target_flops_ratio: float = 0.5
  tolerance: float = 0.05  # the MACs band is target ± tolerance (on the ratio to the unpruned network)
  recipe: str = "official"  # training recipe of the teacher and every shape (tas_jax/configs/train.py)
  batch_size: int = 128
  teacher_epochs: int = 10
  search_epochs: int = 10
  search_seeds: int = 1
  search_batch_size: int = 64
  search_preset: str = "official"  # a search variant of tas_jax/configs/search.py: official, paper, exact
  paper_shape: str = ""  # a TAS preset (e.g. tas-c10-resnet20), "" = none
  random_draws: int = 1
  random_sampler: str = "rejection"  # rejection (exact), or walk; rejection falls back to walk when it misses
  l1: bool = True
  epochs: int = 10  # training epochs of every shape
  seeds: int = 2
  variants: tuple[str, ...] = ("scratch", "kd")
  train_overrides: tuple[str, ...] = ()  # KEY=VALUE keys of tas_jax/configs/train.py, teacher and shapes
  search_overrides: tuple[str, ...] = ()  # KEY=VALUE keys of tas_jax/configs/search.py
  latency_batch_sizes: tuple[int, ...] = (1, 64)
  latency_runs: int = 10

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> "StudyConfig":
    """The typed settings of a config mapping (lists as ``a,b`` strings or sequences); raises :class:`StudyError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # The command line adds on_bad_image to every config naming a dataset; the study's runs keep its default.
    if str(d.get("on_bad_image", "error")) != "error":
      raise StudyError("on_bad_image: the study reads only datasets without bad images (keep the default 'error')")
    unknown = sorted(set(d) - set(fields) - {"preset", "on_bad_image"})
    if unknown:
      raise StudyError(f"unknown study key(s): {', '.join(unknown)}")
    values = {}
    for name, f in fields.items():
      if name not in d:
        continue
      v = d[name]
      default = f.default
      try:
        if isinstance(default, bool):
          v = _bool(v)
        elif isinstance(default, int):
          v = int(v)
        elif isinstance(default, float):
          v = float(v)
        elif isinstance(default, tuple):
          sep = ";" if name.endswith("overrides") else ","
          items = [s.strip() for s in v.split(sep)] if isinstance(v, str) else [str(s).strip() for s in v]
          items = [s for s in items if s]
          v = tuple(int(s) for s in items) if name == "latency_batch_sizes" else tuple(items)
        else:
          v = str(v)
      except (TypeError, ValueError):
        raise StudyError(f"cannot read {name}={v!r} as a {type(default).__name__}") from None
      values[name] = v
    cfg = cls(**values)
    cfg.check()
    return cfg

  def check(self) -> None:
    """Refuse settings that cannot run, before anything is trained."""
    try:
      shape_files.preset(self.model, self.num_classes)
    except shapes.ShapeError as e:
      raise StudyError(f"model: {e}") from None
    try:
      baselines.check_target(self.target_flops_ratio, self.tolerance)
    except baselines.PruneError as e:
      raise StudyError(str(e)) from None
    for name in ("teacher_epochs", "search_epochs", "epochs", "seeds", "batch_size", "search_batch_size",
                 "latency_runs", "num_classes"):
      if getattr(self, name) < 1:
        raise StudyError(f"{name} must be at least 1, got {getattr(self, name)}")
    for name in ("search_seeds", "random_draws", "num_train_examples"):
      if getattr(self, name) < 0:
        raise StudyError(f"{name} must not be negative, got {getattr(self, name)}")
    if not self.variants or any(v not in VARIANTS for v in self.variants):
      raise StudyError(f"variants must be some of {', '.join(VARIANTS)}, got {','.join(self.variants) or '(none)'}")
    if len(set(self.variants)) != len(self.variants):
      raise StudyError(f"variants repeat: {','.join(self.variants)}")
    if self.random_sampler not in SAMPLERS:
      raise StudyError(f"random_sampler must be one of {', '.join(SAMPLERS)}, got {self.random_sampler!r}")
    if any(b < 1 for b in self.latency_batch_sizes):
      raise StudyError(f"latency batch sizes must be positive, got {list(self.latency_batch_sizes)}")
    if self.paper_shape:
      if self.paper_shape not in shape_files.preset_names():
        raise StudyError(f"paper_shape {self.paper_shape!r} is not a preset ({', '.join(shape_files.preset_names())})")
      paper = shape_files.preset(self.paper_shape)
      if (paper.arch, paper.depth) != (self.base_shape().arch, self.base_shape().depth):
        raise StudyError(f"paper_shape {self.paper_shape} is not a shape of {self.model}")
    if not (self.search_seeds or self.paper_shape):
      raise StudyError("nothing searched to compare: set search_seeds >= 1 or a paper_shape")
    # Bad recipe or override keys fail here, not after the teacher has trained.
    teacher_config(self)
    for v in self.variants:
      shape_config(self, v, 0, "")
    if self.search_seeds:
      search_config(self, 0)

  def base_shape(self) -> shapes.Shape:
    return shape_files.preset(self.model, self.num_classes)

  def band(self) -> tuple[float, float]:
    return self.target_flops_ratio - self.tolerance, self.target_flops_ratio + self.tolerance

  def to_dict(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _bool(v) -> bool:
  if isinstance(v, bool):
    return v
  if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
    return v.lower() in ("1", "true", "yes")
  if isinstance(v, int) and v in (0, 1):
    return bool(v)
  raise ValueError(v)


SAMPLERS = baselines.SAMPLERS


def _data_overrides(cfg: StudyConfig, epochs: int, batch_size: int) -> list[str]:
  out = [f"dataset={cfg.dataset}", f"num_train_examples={cfg.num_train_examples}", f"epochs={epochs}",
         f"batch_size={batch_size}"]
  return out + ([f"data_dir={cfg.data_dir}"] if cfg.data_dir else [])


def _overridden(config, overrides: Sequence[str], protected: Sequence[str] = ()):
  try:
    protocol.apply_overrides(config, overrides, protected)
  except protocol.ProtocolError as e:
    raise StudyError(str(e)) from None
  return config


def teacher_config(cfg: StudyConfig):
  """The unpruned teacher's training config: the recipe, the study's data and sizes, then ``train_overrides``."""
  try:
    config = train_configs.get_config(f"{cfg.model},{cfg.recipe}")
  except ValueError as e:
    raise StudyError(str(e)) from None
  _overridden(config, _data_overrides(cfg, cfg.teacher_epochs, cfg.batch_size) + list(cfg.train_overrides),
              protocol.PROTECTED)
  config.mode = "base"
  return config


def shape_overrides(cfg: StudyConfig) -> list[str]:
  """The training keys every shape run gets on top of the recipe (the same for every shape and variant)."""
  return _data_overrides(cfg, cfg.epochs, cfg.batch_size) + list(cfg.train_overrides)


def shape_config(cfg: StudyConfig, variant: str, seed: int, shape_path: str, teacher: str = ""):
  """The training config of one shape run, exactly as :func:`tas_jax.programs.protocol.run` builds it."""
  try:
    return protocol.variant_config(VARIANTS[variant], seed, shape_path=shape_path, recipe=cfg.recipe,
                                   family=cfg.model, teacher=teacher, overrides=shape_overrides(cfg))
  except protocol.ProtocolError as e:
    raise StudyError(str(e)) from None


def search_config(cfg: StudyConfig, seed: int):
  """A TAS search's config: the model's search preset, the study's data, target and sizes, then ``search_overrides``."""
  try:
    config = search_configs.get_config(f"{cfg.model},{cfg.search_preset}")
  except ValueError as e:
    raise StudyError(f"search_preset: {e}") from None
  sets = _data_overrides(cfg, cfg.search_epochs, cfg.search_batch_size)
  sets += [f"target_flops_ratio={cfg.target_flops_ratio}", f"seed={seed}"]
  return _overridden(config, sets + list(cfg.search_overrides))
