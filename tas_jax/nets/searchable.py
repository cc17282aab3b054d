"""Searchable layers: any Flax NNX network whose widths and depths TAS can search, cost and export.

A network is made searchable by building it from four declarations:

* :class:`Width` -- a width group: the output channels of every layer that
  writes into it share one distribution over candidate widths
  (``floor(ratio * nominal)``), one Gumbel top-k draw per forward and one
  chosen width. Channels that must match share a group: a residual stream, a
  depthwise conv's input and output. A plain int is a fixed width.
* :class:`Conv` and :class:`Dense` -- layers reading one group and writing
  another (a depthwise :class:`Conv` reads and writes the same group). Each
  runs at its nominal width on zero-padded inputs, so the first ``c`` filters
  are the ``c``-wide layer; its optional batch norm has one set of statistics
  and affine parameters per candidate width; the k drawn widths are combined
  by channel-wise interpolation (CWI) to the widest drawn one, weighted by the
  re-normalised Gumbel weights. Norm and CWI fold into one channel-mixing
  matrix, so a layer costs its op plus one C x C matmul whatever k is.
* :class:`Stack` -- a depth group: blocks run in order, and the outputs after
  each candidate depth are mixed with soft Gumbel weights (TAS's depth mix).
  The candidate outputs must share one width group (a stage whose blocks
  add into one residual stream), so they mix without interpolation.
* :func:`record` -- the cost of an op that multiplies but is not a searchable
  layer (attention's token-by-token products).

Between searchable layers a searched width may pass only through ops that
keep zero channels zero and act per channel (activations, pooling, adds of
the same group, attention on a fixed width): a plain ``nnx.LayerNorm`` or
``nnx.Linear`` on a searched width would mix the padding in. Records of a
searched network name every group and stack by the first path NNX reaches it
by (attributes in alphabetical order, e.g. ``down/cin`` for a group a
``down`` layer reads), so renaming an attribute renames its record entries.

Width and depth logits are :class:`ArchParam` variables, apart from the
weights (``nnx.Param``) and statistics (``nnx.BatchStat``). Before a forward,
:func:`sample` draws every group (search) or :func:`use_argmax` picks the most
likely candidates (the network TAS derives). :func:`tas_jax.nets.cost_graph.trace`
turns the declared costs into functions of the distributions (the expected
cost E for the cost loss, the discrete cost F of the argmax network, the
exact count on the host); :func:`tas_jax.nets.surgery.export_searchable`
returns the concrete network at the chosen widths and depths, carrying the
supernet's weights.

Counting convention (:mod:`tas_jax.core.macs`, which checks it on traced
programs): multiply-accumulates of convolutions and matrix products; biases,
normalisation and activations are free.

An example network, searched and exported: README.md, "Searching your own network".
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tas_jax.core import cwi as cwi_lib
from tas_jax.core import sampling
from tas_jax.core import space as space_lib
from tas_jax.core.shapes import WIDTH_RATIOS
from tas_jax.nets import conv as conv_lib
from tas_jax.nets.resnet import BN_EPSILON, BN_MOMENTUM, conv_init

dense_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def arch_init(key, size: int) -> jax.Array:
  """N(0, 0.01^2) logits; drawn at one fixed length and cut, so every group reuses one compiled initialiser."""
  return (0.01 * jax.random.normal(key, (max(size, 16),), jnp.float32))[:size]



class ArchParam(nnx.Variable):
  """Architecture parameters: TAS's width and depth logits."""


class Draw(nnx.Variable):
  """The candidates the next forward uses; set by :func:`sample` or :func:`use_argmax`, never trained."""


# ----------------------------------------------------------------------------- groups

class Width(nnx.Module):
  """A width group: candidate widths of ``nominal`` and the logits of its distribution.

  ``search=False`` (or a single candidate) makes it a fixed width.
  """

  def __init__(self, nominal: int, *, ratios: Sequence[float] = WIDTH_RATIOS, multiple: int = 1,
               search: bool = True, rngs: nnx.Rngs):
    self.nominal = int(nominal)
    cands = space_lib.width_choices(self.nominal, ratios, multiple) if search else (self.nominal,)
    if cands[-1] != self.nominal:
      cands = tuple(sorted(set(cands) | {self.nominal}))  # the unpruned width is always a candidate
    self.candidates = tuple(int(c) for c in cands)
    self.logits = ArchParam(arch_init(rngs.params(), len(self.candidates)))
    self.idx = Draw(jnp.array([len(self.candidates) - 1], jnp.int32))
    self.weight = Draw(jnp.ones((1,), jnp.float32))
    self.hard = True

  @property
  def fixed(self) -> bool:
    return len(self.candidates) == 1

  def probs(self) -> jax.Array:
    return jax.nn.softmax(self.logits[...])

  def moment(self, power: int, probs=None) -> jax.Array:
    """E[c^power] under ``probs`` (default: the group's distribution)."""
    if self.fixed:
      return jnp.asarray(float(self.nominal) ** power, jnp.float32)
    probs = self.probs() if probs is None else probs
    return (probs * jnp.asarray(self.candidates, jnp.float32) ** power).sum()

  def drawn_widths(self) -> jax.Array:
    return jnp.asarray(self.candidates, jnp.int32)[self.idx[...]]


class Stack(nnx.Module):
  """A depth group: blocks in order, the trailing ones droppable; ``choices`` are the block counts TAS may keep."""

  def __init__(self, blocks: Sequence[nnx.Module], *, choices: Sequence[int] | None = None, search: bool = True,
               rngs: nnx.Rngs):
    n = len(blocks)
    choices = tuple(sorted(set(int(c) for c in (choices or range(1, n + 1))))) if search else (n,)
    if not choices or choices[0] < 1 or choices[-1] != n:
      raise ValueError(f"depth choices {list(choices)} must lie in [1, {n}] and include {n}")
    self.blocks = nnx.List(list(blocks))
    self.choices = choices
    self.logits = ArchParam(arch_init(rngs.params(), len(choices)))
    self.q = Draw(jax.nn.one_hot(len(choices) - 1, len(choices), dtype=jnp.float32))
    self.hard = True

  @property
  def fixed(self) -> bool:
    return len(self.choices) == 1

  def probs(self) -> jax.Array:
    return jax.nn.softmax(self.logits[...])

  def survival(self, j: int, probs=None) -> jax.Array:
    """P(block j is kept) = P(depth > j)."""
    if self.fixed:
      return jnp.ones((), jnp.float32)
    probs = self.probs() if probs is None else probs
    return (probs * jnp.asarray([c > j for c in self.choices], jnp.float32)).sum()

  def __call__(self, x):
    ends = []
    for j, block in enumerate(self.blocks):
      with _in_block(self, j):
        x = block(x)
      if j + 1 in self.choices:
        ends.append(x)
    if len(ends) == 1:
      return ends[0]
    if len({e.shape for e in ends}) > 1:
      raise ValueError(f"the outputs after the candidate depths {list(self.choices)} of a Stack differ in shape "
                       f"({sorted({e.shape for e in ends})}): its blocks must keep their input's shape")
    q = self.q[...]
    if self.hard:
      k = jnp.argmax(q)
      out = ends[0]
      for i in range(1, len(ends)):
        out = jnp.where(k == i, ends[i], out)
      return out
    return sum(q[i].astype(e.dtype) * e for i, e in enumerate(ends))


# ----------------------------------------------------------------------------- layers

def _group(width, rngs) -> Width:
  return width if isinstance(width, Width) else Width(int(width), search=False, rngs=rngs)


class Layer(nnx.Module):
  """What Conv and Dense share: per-candidate batch norm, the CWI fold and the cost record."""

  def _init_norm(self, norm: bool, bias: bool, rngs):
    k, c = len(self.out.candidates), self.out.nominal
    self.norm = norm
    self.use_running_average = False
    if norm:
      self.scale = nnx.Param(jnp.ones((k, c), jnp.float32))
      self.offset = nnx.Param(jnp.zeros((k, c), jnp.float32))
      self.mean = nnx.BatchStat(jnp.zeros((k, c), jnp.float32))
      self.var = nnx.BatchStat(jnp.ones((k, c), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((c,), jnp.float32)) if bias else None

  def _check_input(self, x):
    if x.shape[-1] != self.cin.nominal:
      raise ValueError(f"{type(self).__name__} reads {self.cin.nominal} channels (its input width group), got an "
                       f"input of {x.shape[-1]}: declare the group that produces its input as its cin")

  def _finish(self, y):
    """Bias, candidate norms and the CWI fold of the drawn widths: y [..., C] -> [..., C], zero beyond."""
    group = self.out
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    idx = group.idx[...]
    c = y.shape[-1]
    if self.norm:
      scale, offset = self.scale[...][idx], self.offset[...][idx]  # [k, C]
      if self.use_running_average:
        mean, var = self.mean[...][idx], self.var[...][idx]
      else:
        axes = tuple(range(y.ndim - 1))
        yf = y.astype(jnp.float32)
        m = yf.mean(axes)
        v = jnp.square(yf - m).mean(axes)
        n = math.prod(y.shape[:-1])
        mo = BN_MOMENTUM
        sg = jax.lax.stop_gradient
        self.mean[...] = self.mean[...].at[idx].set(mo * self.mean[...][idx] + (1 - mo) * sg(m))
        self.var[...] = self.var[...].at[idx].set(mo * self.var[...][idx] + (1 - mo) * sg(v) * n / max(n - 1, 1))
        mean, var = jnp.broadcast_to(m, scale.shape), jnp.broadcast_to(v, scale.shape)
      a = scale * jax.lax.rsqrt(var + BN_EPSILON)
      b = offset - mean * a
    else:
      a = jnp.ones((idx.shape[0], c), jnp.float32)
      b = jnp.zeros((idx.shape[0], c), jnp.float32)
    if group.fixed:
      return y * a[0].astype(y.dtype) + b[0].astype(y.dtype) if self.norm else y
    width = group.drawn_widths()
    keep = jax.lax.iota(jnp.int32, c)[None, :] < width[:, None]
    a, b = a * keep, b * keep
    if group.hard:  # one candidate: exactly the pruned layer, zero beyond its width
      return y * a[0].astype(y.dtype) + b[0].astype(y.dtype)
    # M = sum_j w_j diag(a_j) CWI(c_j -> c*) and its offset: norm and interpolation in one matmul.
    interp = jax.vmap(lambda w: cwi_lib.interpolation_matrix(c, w, width.max()))(width)  # [k, C, C]
    wt = group.weight[...].astype(jnp.float32)
    mix = jnp.einsum("jc,jco,j->co", a, interp, wt)
    off = jnp.einsum("jc,jco,j->o", b, interp, wt)
    return jnp.dot(y, mix.astype(y.dtype)) + off.astype(y.dtype)

class Conv(Layer):
  """A 2-D convolution (NHWC, symmetric padding) from width ``cin`` to width ``cout``, norm on by default.

  ``depthwise=True`` convolves every channel on its own; then ``cin`` must be ``cout`` (one group).
  ``pad`` is the padding of each side (default ``kernel // 2``; 0 for a patch embedding).
  """

  def __init__(self, cin: Width | int, cout: Width | int, kernel: int, *, stride: int = 1,
               depthwise: bool = False, pad: int | None = None, norm: bool = True, bias: bool = False,
               rngs: nnx.Rngs):
    self.out = _group(cout, rngs)
    self.cin = self.out if depthwise else _group(cin, rngs)
    if depthwise and not (cin is cout or not isinstance(cin, Width) and not isinstance(cout, Width)
                          and int(cin) == int(cout)):
      raise ValueError("a depthwise conv reads and writes one width group: pass the same Width as cin and cout")
    self.kernel_size, self.stride, self.depthwise = kernel, stride, depthwise
    self.pad = kernel // 2 if pad is None else int(pad)
    shape = (kernel, kernel, 1 if depthwise else self.cin.nominal, self.out.nominal)
    self.kernel = nnx.Param(conv_init(rngs.params(), shape, jnp.float32))
    self._init_norm(norm, bias, rngs)

  def __call__(self, x):
    self._check_input(x)
    kernel = self.kernel[...].astype(x.dtype)
    if self.depthwise:
      y = conv_lib.depthwise(x, kernel, self.stride, self.pad)
    elif self.pad != self.kernel_size // 2:
      y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, ((self.pad,) * 2,) * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      y = conv_lib.conv(x, kernel, self.stride)
    spatial = self.kernel_size ** 2 * y.shape[1] * y.shape[2]
    record(spatial, self.out) if self.depthwise else record(spatial, self.cin, self.out)
    return self._finish(y)

class Dense(Layer):
  """A dense layer on the last axis from width ``cin`` to width ``cout``; no norm by default."""

  def __init__(self, cin: Width | int, cout: Width | int, *, norm: bool = False, bias: bool = True,
               kernel_init=dense_init, rngs: nnx.Rngs):
    self.out = _group(cout, rngs)
    self.cin = _group(cin, rngs)
    self.kernel = nnx.Param(kernel_init(rngs.params(), (self.cin.nominal, self.out.nominal), jnp.float32))
    self._init_norm(norm, bias, rngs)

  def __call__(self, x):
    self._check_input(x)
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
    record(math.prod(x.shape[1:-1]), self.cin, self.out)
    return self._finish(y)

# ----------------------------------------------------------------------------- draws

def nodes(model, kind) -> list:
  """(path, node) of every node of type ``kind`` in ``model``, in graph order."""
  return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, kind)]


def sample(model: nnx.Module, key, tau, num_sampled: int = 2) -> None:
  """Draw every group for the next forward: k widths by Gumbel top-k with re-normalised weights, soft depths.

  Searched width group i draws with ``fold_in(k_width, i)`` and searched stack i with ``fold_in(k_depth, i)``, where
  ``k_width, k_depth = split(key)``, in the order of ``nnx.iter_graph``.
  """
  k_width, k_depth = jax.random.split(key)
  widths = [g for _, g in nodes(model, Width) if not g.fixed]
  for i, g in enumerate(widths):
    k = min(num_sampled, len(g.candidates))
    idx, weight = sampling.sample_widths(jax.random.fold_in(k_width, i), g.logits[...], tau, k)
    g.idx.set_value(idx)
    g.weight.set_value(weight)
    g.hard = False
  for i, s in enumerate([s for _, s in nodes(model, Stack) if not s.fixed]):
    s.q.set_value(sampling.sample_depth(jax.random.fold_in(k_depth, i), s.logits[...], tau))
    s.hard = False


def use_argmax(model: nnx.Module) -> None:
  """Make the next forward the argmax network exactly: one width per group, one depth per stack."""
  for _, g in nodes(model, Width):
    g.idx.set_value(jnp.argmax(g.logits[...])[None].astype(jnp.int32))
    g.weight.set_value(jnp.ones((1,), jnp.float32))
    g.hard = True
  for _, s in nodes(model, Stack):
    s.q.set_value(jax.nn.one_hot(jnp.argmax(s.logits[...]), len(s.choices), dtype=jnp.float32))
    s.hard = True


def drawn_mask(model: nnx.Module) -> nnx.State:
  """Which weights the drawn forward used, as a tree like ``nnx.state(model, nnx.Param)`` of booleans.

  False only for the norm scales and offsets of the width candidates not drawn: each candidate's norm is
  its own module in the official code, so those get no gradient and PyTorch's optimiser leaves them (and
  their momentum) untouched (see :func:`tas_jax.core.optim.masked_update`).
  """
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  mask = nnx.merge(graphdef, jax.tree.map(lambda _: jnp.ones((), bool), weights), rest, copy=True)
  for (_, layer), (_, real) in zip(nodes(mask, Layer), nodes(model, Layer)):
    if layer.norm:
      k = len(real.out.candidates)
      drawn = (real.out.idx[...][:, None] == jnp.arange(k)).any(axis=0)[:, None]  # [K, 1]
      layer.scale.set_value(drawn)
      layer.offset.set_value(drawn)
  return nnx.state(mask, nnx.Param)


# ----------------------------------------------------------------------------- costs

_RECORDS: list | None = None
_BLOCKS: list = []


def record(unit: int, *widths) -> None:
  """Declare ``unit * prod(widths)`` multiply-accumulates per example (kept only while :func:`recording`).

  ``widths`` are :class:`Width` groups or ints; a group named twice counts its square.
  """
  if _RECORDS is not None:
    _RECORDS.append((int(unit), tuple(widths), tuple(_BLOCKS)))


@contextlib.contextmanager
def recording():
  """Collect the :func:`record` calls of the forwards traced inside: ``(unit, widths, enclosing blocks)``."""
  global _RECORDS
  _RECORDS = []
  try:
    yield _RECORDS
  finally:
    _RECORDS = None


@contextlib.contextmanager
def _in_block(stack, j):
  _BLOCKS.append((stack, j))
  try:
    yield
  finally:
    _BLOCKS.pop()


def searched(model) -> list:
  """(path, node) of every searched width group and stack, in graph order."""
  return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, (Width, Stack)) and not n.fixed]


def full_choice(model) -> dict:
  """The unpruned network's choice: every searched group at its nominal width, every stack whole."""
  return {p: len(_options(n)) - 1 for p, n in searched(model)}


def argmax_choice(model) -> dict:
  """The argmax candidate index of every searched width group and stack, by path."""
  return {p: int(np.argmax(np.asarray(n.logits[...]))) for p, n in searched(model)}


# ----------------------------------------------------------------------------- records of a searched network

def describe(model: nnx.Module, choice: dict | None = None) -> dict:
  """The chosen width of every searched group and depth of every searched stack, by path name: a JSON record
  of a searched network, which :func:`choice_of` reads back."""
  choice = argmax_choice(model) if choice is None else choice
  return {"/".join(map(str, p)): _options(n)[choice[p]] for p, n in searched(model)}


def choice_of(model: nnx.Module, description: dict) -> dict:
  """The choice a :func:`describe` record names, for ``model`` (the same supernet, built anew).

  Raises ValueError naming the first group the record misses, or a width or depth that is not a candidate.
  """
  choice = {}
  names = {"/".join(map(str, p)) for p, _ in searched(model)}
  foreign = sorted(set(description) - names)
  if foreign:
    raise ValueError(f"the record names {foreign[0]}, which this network does not search: it describes another network")
  for p, n in searched(model):
    name = "/".join(map(str, p))
    if name not in description:
      raise ValueError(f"the record names no width or depth for {name}: it describes another network")
    value = description[name]
    if value not in _options(n) or int(value) != value:
      raise ValueError(f"{name} = {value} is not one of its candidates {list(_options(n))}")
    choice[p] = _options(n).index(int(value))
  return choice


def _options(node) -> tuple[int, ...]:
  return node.candidates if isinstance(node, Width) else node.choices


def num_params(model: nnx.Module) -> int:
  """Trainable weights (``nnx.Param``) of the network at its nominal widths: architecture logits excluded, and a
  layer's per-candidate norms counted once (the unpruned network has one norm per layer)."""
  total = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  for _, layer in nodes(model, Layer):
    if layer.norm:
      k, c = layer.scale.shape
      total -= 2 * (k - 1) * c
  return int(total)
