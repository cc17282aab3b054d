"""Network shapes: the width of every conv and the blocks kept per stage of a ResNet.

A :class:`Shape` is what TAS searches and what a pruned network is built from
(METHOD.md §§1, 5 and 6.1). It covers CIFAR ResNets (basic blocks, depth
6n+2; bottleneck blocks, depth 9n+2) and ImageNet ResNets (18/34 basic, 50/101
bottleneck).

``widths`` lists the stem width, then the output width of every conv of every
block in order (conv_a, conv_b for a basic block; conv_1x1, conv_3x3, conv_1x4
for a bottleneck), blocks dropped by depth truncation included. This is the
official ``xchannels`` without its leading input-channel entry. ``blocks`` holds
the blocks kept per stage; a stage keeps a prefix of its blocks.

The static geometry shared by the cost counter, the pruned network and the
supernet (kernel, stride and output resolution of every conv) is the
:class:`Layout` of a shape's family, see :func:`layout`.
"""

from __future__ import annotations

import dataclasses
import functools
import json

from typing import Sequence

FORMAT = "tas_jax.shape/1"
WIDTH_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ARCHS = ("cifar", "imagenet")
BLOCKS = ("basic", "bottleneck")
SHORTCUTS = ("avgpool", "strided")


class ShapeError(ValueError):
  """A shape, preset name or shape file that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Shape:
  """A (possibly pruned) ResNet: its family, conv widths and blocks kept per stage.

  Attributes:
    arch: ``"cifar"`` (3x3 stem, stages of 16/32/64 planes) or ``"imagenet"``
      (7x7 stride-2 stem and max pool, stages of 64/128/256/512 planes).
    block: ``"basic"`` or ``"bottleneck"`` (expansion 4).
    layers: blocks per stage of the unpruned network.
    widths: stem width then every conv's output width, dropped blocks included.
    blocks: blocks kept per stage (a prefix of each stage).
    num_classes: classifier outputs.
    in_channels: input image channels.
    image_size: input resolution the costs are counted at.
    shortcut: stride-2 shortcut: ``"avgpool"`` (2x2 average pool then 1x1 conv,
      as the official code) or ``"strided"`` (1x1 stride-2 conv, torchvision).
      Both have the same MACs and parameters.
    zero_init_residual: start the last batch-norm scale of every block at 0.
    allow_wider: accept widths above the unpruned ones. Off by default; the
      importer sets it for the one official shape that needs it (ImageNet
      ResNet-50, whose widths came from another candidate set). Such a shape
      can be built, counted and trained, not searched.
  """

  arch: str
  block: str
  layers: tuple[int, ...]
  widths: tuple[int, ...]
  blocks: tuple[int, ...]
  num_classes: int = 10
  in_channels: int = 3
  image_size: int = 32
  shortcut: str = "avgpool"
  zero_init_residual: bool = False
  allow_wider: bool = False

  def __post_init__(self):
    for name in ("layers", "widths", "blocks"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    validate(self)

  @property
  def convs_per_block(self) -> int:
    return 2 if self.block == "basic" else 3

  @property
  def depth(self) -> int:
    """The conventional depth of the unpruned network (20 for ResNet-20)."""
    return self.convs_per_block * sum(self.layers) + 2

  @property
  def nominal(self) -> tuple[int, ...]:
    """The unpruned width of every entry of ``widths``."""
    return layout(self.arch, self.block, self.layers, self.image_size).nominal

  @property
  def layout(self) -> "Layout":
    return layout(self.arch, self.block, self.layers, self.image_size)

  def replace(self, **changes) -> "Shape":
    return dataclasses.replace(self, **changes)

  def block_widths(self, stage: int, index: int) -> tuple[int, tuple[int, ...]]:
    """(input width, conv widths) of kept block ``index`` of ``stage`` in the pruned net."""
    return self.kept_blocks()[(stage, index)]

  def kept_blocks(self) -> dict[tuple[int, int], tuple[int, tuple[int, ...]]]:
    """Input width and conv widths of every kept block, following METHOD.md §6.1.

    The input of a stage's first block is the output width of the last block
    kept in the previous stage (not the recorded width of a dropped block).
    """
    lay = self.layout
    out = {}
    prev = self.widths[0]
    for b in lay.blocks:
      if b.index >= self.blocks[b.stage]:
        continue
      ws = tuple(self.widths[i] for i in b.convs)
      out[(b.stage, b.index)] = (prev, ws)
      prev = ws[-1]
    return out

  @property
  def out_width(self) -> int:
    """Width the classifier reads: the last kept block's output width."""
    return list(self.kept_blocks().values())[-1][1][-1]

  def to_dict(self) -> dict:
    d = {"format": FORMAT}
    d.update(dataclasses.asdict(self))
    for k in ("layers", "widths", "blocks"):
      d[k] = list(d[k])
    return d

  def to_json(self) -> str:
    # One key per line keeps the file diffable; lists stay on their line.
    items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items()]
    return "{\n" + ",\n".join(items) + "\n}"


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Static geometry of one searchable conv (an entry of ``Shape.widths``)."""

  index: int
  kernel: int
  stride: int
  out_hw: int  # output height (= width) in pixels
  nominal: int  # unpruned output width
  stage: int  # -1 for the stem
  block: int  # position in its stage, -1 for the stem


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static geometry of one residual block of the unpruned network."""

  stage: int
  index: int  # 0-based position in the stage
  stride: int
  in_hw: int
  out_hw: int
  convs: tuple[int, ...]  # indices into Shape.widths
  nominal_in: int
  nominal_out: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """Kernels, strides and resolutions of a ResNet family; independent of widths."""

  arch: str
  block: str
  layers: tuple[int, ...]
  image_size: int
  convs: tuple[ConvSpec, ...]
  blocks: tuple[BlockSpec, ...]

  @property
  def nominal(self) -> tuple[int, ...]:
    return tuple(c.nominal for c in self.convs)

  @property
  def stem_hw(self) -> int:
    return self.convs[0].out_hw

  def stage_blocks(self, stage: int) -> tuple[BlockSpec, ...]:
    return tuple(b for b in self.blocks if b.stage == stage)


def stage_planes(arch: str, num_stages: int) -> tuple[int, ...]:
  base = 16 if arch == "cifar" else 64
  return tuple(base * 2**i for i in range(num_stages))


@functools.lru_cache(maxsize=None)
def layout(arch: str, block: str, layers: tuple[int, ...], image_size: int) -> Layout:
  """The static geometry of a ResNet family (METHOD.md §1.1; ImageNet as torchvision v1.5).

  CIFAR: 3x3 stem at full resolution; stage i halves the resolution for i > 0.
  ImageNet: 7x7 stride-2 stem, 3x3 stride-2 max pool, then four stages; the
  bottleneck puts its stride on the 3x3 conv.
  """
  if arch == "cifar":
    stem_k, stem_s, stem_hw, stem_w = 3, 1, image_size, 16
    hw = stem_hw
  else:
    stem_k, stem_s, stem_w = 7, 2, 64
    stem_hw = _conv_out(image_size, 7, 2)
    hw = _conv_out(stem_hw, 3, 2)  # max pool
  convs = [ConvSpec(0, stem_k, stem_s, stem_hw, stem_w, -1, -1)]
  blocks = []
  expansion = 1 if block == "basic" else 4
  prev_nominal = stem_w
  for s, (n, planes) in enumerate(zip(layers, stage_planes(arch, len(layers)))):
    for j in range(n):
      stride = 2 if (s > 0 and j == 0) else 1
      out_hw = _conv_out(hw, 3, stride) if stride > 1 else hw
      first = len(convs)
      if block == "basic":
        convs.append(ConvSpec(first, 3, stride, out_hw, planes, s, j))
        convs.append(ConvSpec(first + 1, 3, 1, out_hw, planes, s, j))
      else:
        convs.append(ConvSpec(first, 1, 1, hw, planes, s, j))
        convs.append(ConvSpec(first + 1, 3, stride, out_hw, planes, s, j))
        convs.append(ConvSpec(first + 2, 1, 1, out_hw, planes * expansion, s, j))
      blocks.append(BlockSpec(s, j, stride, hw, out_hw, tuple(range(first, len(convs))),
                              prev_nominal, planes * expansion))
      prev_nominal = planes * expansion
      hw = out_hw
  return Layout(arch, block, tuple(layers), image_size, tuple(convs), tuple(blocks))


def _conv_out(hw: int, kernel: int, stride: int) -> int:
  pad = kernel // 2
  return (hw + 2 * pad - kernel) // stride + 1


def validate(shape: Shape) -> None:
  """Raise :class:`ShapeError` naming the first inconsistency of ``shape``."""
  if shape.arch not in ARCHS:
    raise ShapeError(f"unknown arch {shape.arch!r}; expected one of {ARCHS}")
  if shape.block not in BLOCKS:
    raise ShapeError(f"unknown block {shape.block!r}; expected one of {BLOCKS}")
  if shape.shortcut not in SHORTCUTS:
    raise ShapeError(f"unknown shortcut {shape.shortcut!r}; expected one of {SHORTCUTS}")
  if not shape.layers or any(n < 1 for n in shape.layers):
    raise ShapeError(f"layers must be positive block counts, got {list(shape.layers)}")
  if shape.arch == "cifar" and len(shape.layers) != 3:
    raise ShapeError(f"a CIFAR ResNet has 3 stages, got layers {list(shape.layers)}")
  if shape.arch == "imagenet" and len(shape.layers) != 4:
    raise ShapeError(f"an ImageNet ResNet has 4 stages, got layers {list(shape.layers)}")
  if shape.num_classes < 1 or shape.in_channels < 1:
    raise ShapeError("num_classes and in_channels must be at least 1")
  min_size = 8 if shape.arch == "cifar" else 32
  if shape.image_size < min_size:
    raise ShapeError(f"image_size {shape.image_size} is below {min_size} for a {shape.arch} ResNet")
  nominal = layout(shape.arch, shape.block, shape.layers, shape.image_size).nominal
  if len(shape.widths) != len(nominal):
    raise ShapeError(f"a {shape.arch} {shape.block} ResNet with layers {list(shape.layers)} has "
                     f"{len(nominal)} widths (stem + every conv), got {len(shape.widths)}")
  for i, (w, n) in enumerate(zip(shape.widths, nominal)):
    if w < 1 or (w > n and not shape.allow_wider):
      raise ShapeError(f"width #{i} is {w}; it must lie in [1, {n}] (the unpruned width)")
  if len(shape.blocks) != len(shape.layers):
    raise ShapeError(f"blocks has {len(shape.blocks)} stages, layers has {len(shape.layers)}")
  for s, (b, n) in enumerate(zip(shape.blocks, shape.layers)):
    if not 1 <= b <= n:
      raise ShapeError(f"stage {s} keeps {b} blocks; it must keep between 1 and {n}")


# ----------------------------------------------------------------------------- unpruned networks

_IMAGENET_LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def cifar_resnet(depth: int, num_classes: int = 10, block: str | None = None, image_size: int = 32) -> Shape:
  """The unpruned CIFAR ResNet of ``depth``: basic if (depth-2) % 6 == 0 (unless
  ``block`` says otherwise), else bottleneck with (depth-2) % 9 == 0."""
  if block is None:  # ResNet-164 and -1001 are the customary bottleneck depths
    block = "bottleneck" if depth in (164, 1001) or (depth - 2) % 6 else "basic"
  per = 6 if block == "basic" else 9
  if depth < per + 2 or (depth - 2) % per:
    raise ShapeError(f"a CIFAR {block} ResNet has depth {per}n+2, got {depth}")
  n = (depth - 2) // per
  return unpruned("cifar", block, (n, n, n), num_classes=num_classes, image_size=image_size)


def imagenet_resnet(depth: int, num_classes: int = 1000, shortcut: str = "avgpool", image_size: int = 224) -> Shape:
  if depth not in _IMAGENET_LAYERS:
    raise ShapeError(f"ImageNet ResNet depth must be one of {sorted(_IMAGENET_LAYERS)}, got {depth}")
  block, layers = _IMAGENET_LAYERS[depth]
  return unpruned("imagenet", block, layers, num_classes=num_classes, shortcut=shortcut, image_size=image_size)


def unpruned(arch: str, block: str, layers: Sequence[int], **kw) -> Shape:
  image_size = kw.setdefault("image_size", 32 if arch == "cifar" else 224)
  nominal = layout(arch, block, tuple(layers), image_size).nominal
  return Shape(arch, block, tuple(layers), nominal, tuple(layers), **kw)


def is_unpruned(shape: Shape) -> bool:
  return shape.widths == shape.nominal and shape.blocks == shape.layers


def full_shape(shape: Shape) -> Shape:
  """The unpruned network of the same family as ``shape``."""
  return shape.replace(widths=shape.nominal, blocks=shape.layers)


# ----------------------------------------------------------------------------- presets


# ----------------------------------------------------------------------------- files


# ----------------------------------------------------------------------------- search space


