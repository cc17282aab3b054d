"""Shapes by name and on disk: presets, shape JSON, and the official TAS ``.config`` format (METHOD.md §5).

:func:`resolve` is the one door every program uses: a preset name, a shape
JSON file or an official ``.config`` file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from tas_jax.core.shapes import FORMAT, Shape, ShapeError, cifar_resnet, imagenet_resnet, layout


_PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")


_UNPRUNED_PRESETS = {
    "resnet20": lambda nc: cifar_resnet(20, nc),
    "resnet32": lambda nc: cifar_resnet(32, nc),
    "resnet56": lambda nc: cifar_resnet(56, nc),
    "resnet110": lambda nc: cifar_resnet(110, nc),
    "resnet164": lambda nc: cifar_resnet(164, nc),
    "imagenet-resnet18": lambda nc: imagenet_resnet(18, nc),
    "imagenet-resnet34": lambda nc: imagenet_resnet(34, nc),
    "imagenet-resnet50": lambda nc: imagenet_resnet(50, nc),
    "imagenet-resnet101": lambda nc: imagenet_resnet(101, nc),
}


def preset_names() -> list[str]:
  stored = sorted(f[:-5] for f in os.listdir(_PRESET_DIR) if f.endswith(".json")) if os.path.isdir(_PRESET_DIR) else []
  return list(_UNPRUNED_PRESETS) + stored


def preset(name: str, num_classes: int | None = None) -> Shape:
  """A named shape: an unpruned ResNet or one of the paper's searched shapes.

  Besides the listed names, ``resnetN`` is the unpruned CIFAR ResNet of any
  valid depth N (6n+2 basic, 9n+2 bottleneck), e.g. ``resnet8`` or ``resnet44``.
  """
  if name in _UNPRUNED_PRESETS:
    default = 1000 if name.startswith("imagenet") else 10
    return _UNPRUNED_PRESETS[name](num_classes or default)
  m = re.fullmatch(r"resnet(\d+)", name)
  if m:
    return cifar_resnet(int(m.group(1)), num_classes or 10)
  path = os.path.join(_PRESET_DIR, name + ".json")
  if not os.path.isfile(path):
    raise ShapeError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
  shape = load(path)
  return shape.replace(num_classes=num_classes) if num_classes else shape


def resolve(spec: str, num_classes: int | None = None) -> Shape:
  """A preset name, a project shape JSON file, or an official ``.config`` file."""
  if spec.endswith(".config"):
    shape = load_official(spec)
  elif os.path.sep in spec or spec.endswith(".json") or os.path.exists(spec):
    shape = load(spec)
  else:
    return preset(spec, num_classes)
  return shape.replace(num_classes=num_classes) if num_classes else shape


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ShapeError(f"shape file not found: {path}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ShapeError(f"cannot read shape file {path}: {e}") from None
  except json.JSONDecodeError as e:
    raise ShapeError(f"shape file {path} is not valid JSON: {e}") from None


def from_dict(d: dict, source: str = "shape") -> Shape:
  if not isinstance(d, dict):
    raise ShapeError(f"{source}: expected a JSON object")
  if d.get("format") != FORMAT:
    raise ShapeError(f"{source}: not a tas_jax shape (format {d.get('format')!r}, expected {FORMAT!r})")
  fields = {f.name for f in dataclasses.fields(Shape)}
  missing = {"arch", "block", "layers", "widths", "blocks"} - set(d)
  if missing:
    raise ShapeError(f"{source}: missing keys {sorted(missing)}")
  kw = {k: v for k, v in d.items() if k in fields}
  try:
    for k in ("layers", "widths", "blocks"):
      if not isinstance(kw[k], list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in kw[k]):
        raise ShapeError(f"{k} must be a list of integers")
    return Shape(**kw)
  except ShapeError as e:
    raise ShapeError(f"{source}: {e}") from None
  except (TypeError, ValueError) as e:
    raise ShapeError(f"{source}: malformed shape ({e})") from None


def load(path: str) -> Shape:
  """Read a shape saved by :func:`save`."""
  return from_dict(_read_json(path), source=path)


def save(shape: Shape, path: str) -> None:
  """Write ``shape`` as JSON atomically (a crash never leaves half a file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(shape.to_json() + "\n")
  os.replace(tmp, path)


def _official_value(d: dict, key: str, path: str):
  if key not in d:
    raise ShapeError(f"{path}: official config lacks {key!r}")
  entry = d[key]
  if not (isinstance(entry, list) and len(entry) == 2):
    raise ShapeError(f"{path}: {key!r} is not a [type, value] pair")
  typ, val = entry
  conv = {"int": int, "float": float, "str": str, "bool": lambda v: bool(int(v))}.get(typ)
  if conv is None:
    raise ShapeError(f"{path}: {key!r} has unknown type {typ!r}")
  try:
    return [conv(v) for v in val] if isinstance(val, list) else conv(val)
  except (TypeError, ValueError):
    raise ShapeError(f"{path}: {key!r} holds {val!r}, not of type {typ}") from None


def load_official(path: str) -> Shape:
  """Import a shape in the official TAS ``.config`` format (METHOD.md §5).

  ``xchannels`` = [input channels, stem, every conv of every block]; ``xblocks``
  = blocks kept per stage. CIFAR files name ``depth`` and ``module``; ImageNet
  files ``block_name`` and ``layers``.
  """
  d = _read_json(path)
  if not isinstance(d, dict):
    raise ShapeError(f"{path}: expected a JSON object")
  get = lambda k: _official_value(d, k, path)
  xchannels, xblocks = get("xchannels"), get("xblocks")
  num_classes = get("class_num")
  zero_init = get("zero_init_residual") if "zero_init_residual" in d else False
  if not isinstance(xchannels, list) or len(xchannels) < 2:
    raise ShapeError(f"{path}: xchannels must list the input channels and at least the stem")
  if "depth" in d:
    module = get("module")
    blocks = {"ResNetBasicblock": "basic", "ResNetBottleneck": "bottleneck"}
    if module not in blocks:
      raise ShapeError(f"{path}: unknown module {module!r}")
    depth = get("depth")
    try:
      base = cifar_resnet(depth, num_classes, block=blocks[module])
    except ShapeError as e:
      raise ShapeError(f"{path}: {e}") from None
    arch, block, layers = "cifar", base.block, base.layers
  elif "layers" in d:
    names = {"BasicBlock": "basic", "Bottleneck": "bottleneck"}
    name = get("block_name")
    if name not in names:
      raise ShapeError(f"{path}: unknown block_name {name!r}")
    if "deep_stem" in d and get("deep_stem"):
      raise ShapeError(f"{path}: deep_stem ImageNet ResNets are not supported")
    arch, block, layers = "imagenet", names[name], tuple(get("layers"))
  else:
    raise ShapeError(f"{path}: neither a CIFAR (depth/module) nor an ImageNet (layers/block_name) config")
  widths = tuple(xchannels[1:])
  try:
    nominal = layout(arch, block, tuple(layers), 32 if arch == "cifar" else 224).nominal
    wider = len(widths) == len(nominal) and any(w > n for w, n in zip(widths, nominal))
    return Shape(arch, block, tuple(layers), widths, tuple(xblocks), num_classes=num_classes,
                 in_channels=xchannels[0], zero_init_residual=bool(zero_init),
                 image_size=32 if arch == "cifar" else 224, allow_wider=wider)
  except ShapeError as e:
    raise ShapeError(f"{path}: {e}") from None
