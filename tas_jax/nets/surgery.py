"""Weight surgery: a smaller network of the same family carrying a larger one's weights.

One mechanism serves every producer. :func:`gather` keeps chosen output
channels of every conv (and the matching input channels of the next conv,
batch-norm entries and classifier rows) and chosen blocks of every stage:

* first-c inheritance (:func:`inherit`, fine-tuning a smaller shape from a
  trained network) keeps the prefix ``0..c-1`` of every width;
* magnitude pruning (L1-norm, Network Slimming) keeps the filters it scores
  highest;
* the search's export (:func:`export`) reads the supernet: first channels of
  every kernel and the chosen width candidate's own batch norm.

Any searchable network (:mod:`tas_jax.nets.searchable`) is exported the same
way by :func:`export_searchable`, which slices its layers in place of a copy.

A projection shortcut the smaller network has where the source has an
identity starts as the identity on the channels both sides keep (a 0/1
selection kernel, neutral batch norm), so a network of the source's own shape
reproduces the source's eval-mode logits exactly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tas_jax.core import shapes
from tas_jax.nets import resnet
from tas_jax.nets import searchable

_BN_FIELDS = ("scale", "bias", "mean", "var")
_SEARCHABLE_NORM = ("scale", "offset", "mean", "var")  # a searchable layer's per-candidate norm, in _BN_FIELDS order


def _set(variable, value) -> None:
  variable.set_value(jnp.asarray(value, jnp.float32))


def _set_bn(bn: nnx.BatchNorm, scale, bias, mean, var) -> None:
  for name, value in zip(_BN_FIELDS, (scale, bias, mean, var)):
    _set(getattr(bn, name), value)


def _neutral_bn(bn: nnx.BatchNorm, n: int) -> None:
  # var = 1 - eps makes the eval-mode normalisation an exact identity.
  _set_bn(bn, np.ones(n), np.zeros(n), np.zeros(n), np.full((n,), 1.0 - resnet.BN_EPSILON))


def _gather_conv(dst: resnet.ConvBN, src: resnet.ConvBN, cin: np.ndarray, cout: np.ndarray, what: str) -> None:
  kernel = np.asarray(src.conv.kernel[...])
  if kernel.shape[:2] != tuple(dst.conv.kernel.shape[:2]):
    raise shapes.ShapeError(f"cannot carry {what} over: its kernel is {kernel.shape[0]}x{kernel.shape[1]}, "
                            f"the target's {dst.conv.kernel.shape[0]}x{dst.conv.kernel.shape[1]}")
  if len(cin) and cin.max() >= kernel.shape[2] or len(cout) and cout.max() >= kernel.shape[3]:
    raise shapes.ShapeError(f"cannot carry {what} over: it needs input channels up to {int(cin.max()) + 1} and "
                            f"output channels up to {int(cout.max()) + 1}, the source has {kernel.shape[2]} -> "
                            f"{kernel.shape[3]}")
  _set(dst.conv.kernel, kernel[:, :, cin][:, :, :, cout])
  if dst.bn is not None and src.bn is not None:
    _set_bn(dst.bn, *(np.asarray(getattr(src.bn, n)[...])[cout] for n in _BN_FIELDS))
  elif dst.bn is not None:
    _neutral_bn(dst.bn, len(cout))
  elif src.bn is not None:
    raise shapes.ShapeError(f"cannot carry {what} over: the source has a batch norm the target lacks")


def gather(source: resnet.ResNet, kept: Sequence[np.ndarray], blocks: Sequence[int] | None = None) -> resnet.ResNet:
  """The network keeping output channels ``kept[e]`` of every width entry e of ``source``, with its weights.

  ``blocks`` (default: the source's) keeps the first ``blocks[s]`` blocks of
  stage s. Each conv's kernel is ``source_kernel[:, :, kept_in, kept_out]``,
  where ``kept_in`` are the kept channels of the conv that feeds it; batch
  norms and the classifier rows follow. The result is in eval mode.

  Raises:
    ShapeError: kept indices out of range or repeated, a block the source
      lacks, or convs that do not match.
  """
  src_shape = source.shape
  if len(kept) != len(src_shape.widths):
    raise shapes.ShapeError(f"kept lists {len(kept)} convs, the network has {len(src_shape.widths)}")
  kept = [np.asarray(k, np.int64) for k in kept]
  for e, (k, w) in enumerate(zip(kept, src_shape.widths)):
    if not len(k) or k.min() < 0 or k.max() >= w or len(np.unique(k)) != len(k):
      raise shapes.ShapeError(f"kept channels of conv #{e} must be distinct indices below {w}")
  shape = src_shape.replace(widths=tuple(len(k) for k in kept),
                            blocks=tuple(blocks) if blocks is not None else src_shape.blocks)
  # Built abstractly: every value is set below, and random init would compile an initialiser per new shape.
  net = nnx.eval_shape(lambda: resnet.build(shape))
  _gather_conv(net.stem, source.stem, np.arange(src_shape.in_channels), kept[0], "the stem")
  src_blocks = dict(zip(src_shape.kept_blocks(), source.blocks))
  prev = kept[0]
  specs = {(b.stage, b.index): b for b in src_shape.layout.blocks}
  for (stage, index), dst in zip(shape.kept_blocks(), net.blocks):
    name = f"block {index} of stage {stage}"
    if (stage, index) not in src_blocks:
      raise shapes.ShapeError(f"cannot carry {name} over: the source network drops it")
    src, cin = src_blocks[(stage, index)], prev
    for i, (e, s, d) in enumerate(zip(specs[(stage, index)].convs, src.convs, dst.convs)):
      _gather_conv(d, s, prev, kept[e], f"conv {i} of {name}")
      prev = kept[e]
    if dst.shortcut is None:
      continue
    if src.shortcut is not None:
      _gather_conv(dst.shortcut, src.shortcut, cin, prev, f"the shortcut of {name}")
    else:
      _set(dst.shortcut.conv.kernel, (cin[:, None] == prev[None, :]).astype(np.float32)[None, None])
      if dst.shortcut.bn is not None:
        _neutral_bn(dst.shortcut.bn, len(prev))
  _set(net.head.kernel, np.asarray(source.head.kernel[...])[prev])
  _set(net.head.bias, np.asarray(source.head.bias[...]))
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(net))):
    raise AssertionError("a variable of the smaller network was left unset")
  net.eval()
  return net


def inherit(source: resnet.ResNet, shape: shapes.Shape, dtype=None) -> resnet.ResNet:
  """The network of ``shape`` carrying the first channels of a larger trained network of the same family.

  Every conv keeps its first c_in input and c_out output channels and the
  matching batch-norm entries (the weight sharing of TAS's supernet); the
  classifier keeps its first c rows; blocks ``shape`` drops are omitted.

  Raises:
    ShapeError: another family or class count, a block kept by ``shape`` but
      not by the source, or a width above the source's.
  """
  src_shape = source.shape
  for f in ("arch", "block", "layers", "num_classes", "in_channels", "shortcut"):
    if getattr(src_shape, f) != getattr(shape, f):
      raise shapes.ShapeError(f"cannot inherit weights across networks of different {f}: "
                              f"{getattr(src_shape, f)} (source) vs {getattr(shape, f)}")
  for e, (w, sw) in enumerate(zip(shape.widths, src_shape.widths)):
    if w > sw:
      raise shapes.ShapeError(f"cannot inherit conv #{e}: it needs {w} channels, the source has {sw}")
  net = gather(source, [np.arange(w) for w in shape.widths], shape.blocks)
  return with_dtype(net, dtype)


def with_dtype(net: resnet.ResNet, dtype) -> resnet.ResNet:
  """``net`` computing in ``dtype`` (parameters stay float32); ``net`` itself for None."""
  if dtype is None:
    return net
  model = nnx.eval_shape(lambda: resnet.build(net.shape, 0, dtype))
  nnx.update(model, nnx.state(net))
  model.eval()
  return model


def export(model) -> tuple[shapes.Shape, resnet.ResNet]:
  """The argmax shape and the concrete pruned network carrying a ResNet supernet's weights
  (:class:`tas_jax.nets.supernet.Supernet`).

  Convs get the first filters and input channels of their supernet kernels and
  the chosen candidate's batch norm. A projection shortcut the pruned net adds
  where the supernet had an identity is initialised to pass the first channels
  through (identity kernel, neutral batch norm). A supernet shortcut batch norm
  the pruned net lacks (the CIFAR stride-2 shortcut) is folded into the
  shortcut kernel and the block's last batch-norm offset. In eval mode the
  pruned net then computes what ``model.hard`` computes.
  """
  shape = model.argmax_shape()
  wi, _ = (np.asarray(a) for a in model.argmax())
  # Built abstractly: every value is set below, and random init would compile an initialiser per new shape.
  net = nnx.eval_shape(lambda: resnet.build(shape))
  space = model.space
  _load_conv(net.stem, model.stem, int(wi[0]), shape.in_channels, shape.widths[0])
  kept = [(spec, sb) for spec, sb in zip(space.layout.blocks, model.blocks) if spec.index < shape.blocks[spec.stage]]
  for (spec, sb), pb in zip(kept, net.blocks):
    cin, ws = shape.block_widths(spec.stage, spec.index)
    prev = cin
    for conv_p, conv_s, ci, w in zip(pb.convs, sb.convs, spec.convs, ws):
      _load_conv(conv_p, conv_s, int(wi[ci]), prev, w)
      prev = w
    if pb.shortcut is None:
      continue
    j, cout = int(wi[spec.convs[-1]]), ws[-1]
    if sb.shortcut is None:  # identity in the supernet: identity projection in the pruned net
      _set(pb.shortcut.conv.kernel, np.eye(cin, cout)[None, None])
      if pb.shortcut.bn is not None:
        _neutral_bn(pb.shortcut.bn, cout)
      continue
    kernel = sb.shortcut.kernel[...][:, :, :cin, :cout]
    if pb.shortcut.bn is not None and sb.shortcut.norm:
      _set(pb.shortcut.conv.kernel, kernel)
      _set_bn(pb.shortcut.bn, *(getattr(sb.shortcut, n)[...][j, :cout] for n in _SEARCHABLE_NORM))
    elif pb.shortcut.bn is not None:
      _set(pb.shortcut.conv.kernel, kernel)
      _neutral_bn(pb.shortcut.bn, cout)
    elif sb.shortcut.norm:  # fold the eval-mode affine into the kernel and the branch's offset
      scale, bias, mean, var = (getattr(sb.shortcut, n)[...][j, :cout] for n in _SEARCHABLE_NORM)
      a = scale * jax.lax.rsqrt(var + resnet.BN_EPSILON)
      _set(pb.shortcut.conv.kernel, kernel * a)
      last_bn = pb.convs[-1].bn
      _set(last_bn.bias, last_bn.bias[...] + bias - mean * a)
    else:
      _set(pb.shortcut.conv.kernel, kernel)
  c = shape.out_width
  _set(net.head.kernel, model.head.kernel[...][:c])
  _set(net.head.bias, model.head.bias[...])
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(net))):
    raise AssertionError("a variable of the exported network was left unset")
  net.eval()
  return shape, net


def _load_conv(dst: resnet.ConvBN, src: searchable.Conv, j: int, cin: int, cout: int):
  _set(dst.conv.kernel, src.kernel[...][:, :, :cin, :cout])
  _set_bn(dst.bn, *(getattr(src, n)[...][j, :cout] for n in _SEARCHABLE_NORM))


def export_searchable(model: nnx.Module, choice: dict | None = None) -> nnx.Module:
  """The argmax network of a searchable ``model`` (or ``choice``'s) as a concrete network in eval mode.

  Every layer keeps the first channels of its chosen input and output widths and its chosen width
  candidate's own norm; every stack keeps its first blocks up to its chosen depth; every group becomes a
  fixed width. ``model`` is not changed.

  Raises ValueError for a network whose stacks' blocks write different width groups (a
  :class:`~tas_jax.nets.searchable.StackOutput`): its concrete form needs projection shortcuts where
  added widths differ, which only the network's own surgery builds (the ResNets: :func:`export`).
  """
  if searchable.nodes(model, searchable.StackOutput):
    raise ValueError("this network adds width groups that may differ (a StackOutput): its concrete form needs "
                     "projection shortcuts, which export_searchable does not build")
  choice = searchable.argmax_choice(model) if choice is None else choice
  net = nnx.clone(model)
  chosen = {}
  for p, g in searchable.nodes(net, searchable.Width):
    i = choice.get(p, len(g.candidates) - 1)
    chosen[id(g)] = (i, g.candidates[i])
  for _, layer in searchable.nodes(net, searchable.Layer):
    _, cin = chosen[id(layer.cin)]
    i, cout = chosen[id(layer.out)]
    k = layer.kernel[...]
    _set(layer.kernel, k[..., :cout] if getattr(layer, "depthwise", False) else k[..., :cin, :cout])
    if layer.norm:
      for name in ("scale", "offset", "mean", "var"):
        v = getattr(layer, name)
        _set(v, v[...][i:i + 1, :cout])
    if layer.bias is not None:
      _set(layer.bias, layer.bias[...][:cout])
  for p, s in searchable.nodes(net, searchable.Stack):
    d = s.choices[choice.get(p, len(s.choices) - 1)]
    s.blocks = nnx.List(list(s.blocks)[:d])
    s.choices = (d,)
    s.scan = False  # pruned blocks have widths of their own
    s.logits = searchable.ArchParam(jnp.zeros((1,), jnp.float32))
    s.q = None
    s.hard = True
  for _, g in searchable.nodes(net, searchable.Width):
    _, c = chosen[id(g)]
    g.nominal, g.candidates = c, (c,)
    g.logits = searchable.ArchParam(jnp.zeros((1,), jnp.float32))
    g.idx = g.weight = None
    g.hard = True
  net.eval()  # for inference; net.train() to fine-tune it
  return net
