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
  Outputs of one width group (a stage whose blocks add into one residual
  stream) mix directly; blocks that write groups of their own (TAS's ResNet
  stages) return ``(features, width)``, their outputs are interpolated to the
  widest before the mix, and the layer after the stack reads a
  :class:`StackOutput`.
* :func:`record` -- the cost of an op that multiplies but is not a searchable
  layer (attention's token-by-token products), and the projection a concrete
  network needs where it adds two groups whose widths may differ.

Between searchable layers a searched width may pass only through ops that
keep zero channels zero and act per channel (activations, pooling, adds,
attention on a fixed width): a plain ``nnx.LayerNorm`` or
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


# ----------------------------------------------------------------------------- groups

class Width(nnx.Module):
  """A width group: candidate widths of ``nominal`` and the logits of its distribution.

  ``search=False`` (or a single candidate) makes it a fixed width. ``candidates`` replaces the ones the
  ratios give (as given: the nominal width need not be one of them; none may exceed it). ``learned=False`` leaves the logits to the network that owns the group (a table of its own,
  as the built-in ResNets keep): it then draws and costs the group itself, passing its probabilities to
  the cost graph.
  """

  def __init__(self, nominal: int, *, ratios: Sequence[float] = WIDTH_RATIOS, multiple: int = 1,
               search: bool = True, candidates: Sequence[int] | None = None, learned: bool = True,
               rngs: nnx.Rngs | None = None):
    self.nominal = int(nominal)
    if candidates is not None and search:
      cands = tuple(sorted(set(int(c) for c in candidates)))
      if not cands or cands[0] < 1 or cands[-1] > self.nominal:
        raise ValueError(f"candidate widths {list(cands)} must lie in [1, {self.nominal}]")
    else:
      cands = space_lib.width_choices(self.nominal, ratios, multiple) if search else (self.nominal,)
      if cands[-1] != self.nominal:
        cands = tuple(sorted(set(cands) | {self.nominal}))  # the unpruned width is always a candidate
    self.candidates = tuple(int(c) for c in cands)
    self.logits = ArchParam(arch_init(rngs.params(), len(self.candidates))) if learned else None
    # The candidates the next forward uses, set by sample or use_argmax (a step sets them on the copy it
    # runs); none means the widest candidate.
    self.idx = nnx.data(None)
    self.weight = nnx.data(None)
    self.hard = True

  @property
  def fixed(self) -> bool:
    return len(self.candidates) == 1

  def probs(self) -> jax.Array:
    if self.logits is None:
      raise ValueError("this width group's distribution is kept by the network that owns it (learned=False)")
    return jax.nn.softmax(self.logits[...])

  def distribution(self, probs=None) -> tuple[tuple[int, ...], jax.Array]:
    """(candidate widths, their probabilities) under ``probs`` (default: the group's distribution)."""
    if self.fixed:
      return self.candidates, jnp.ones((1,), jnp.float32)
    return self.candidates, self.probs() if probs is None else probs

  def drawn(self) -> tuple[jax.Array, jax.Array]:
    """(candidate indices, weights) of the next forward; the widest candidate when nothing was drawn."""
    if self.idx is None:
      return jnp.array([len(self.candidates) - 1], jnp.int32), jnp.ones((1,), jnp.float32)
    return self.idx, self.weight

  def drawn_widths(self) -> jax.Array:
    return jnp.asarray(self.candidates, jnp.int32)[self.drawn()[0]]


class Stack(nnx.Module):
  """A depth group: blocks in order, the trailing ones droppable; ``choices`` are the block counts TAS may keep.

  The outputs after each candidate depth are mixed with the stack's soft depth weights. Blocks normally
  keep one width group (a residual stream); a block that returns ``(features, width)``, the traced number
  of leading channels it filled, may write another group than its neighbours: the candidate outputs are
  then interpolated (CWI) to the widest of them before they are mixed, as TAS mixes a ResNet stage's end
  blocks, and the stack returns ``(features, width)`` too. ``scan=True`` runs the blocks after the first,
  which must be alike (the same variables and settings), as one ``lax.scan`` over their stacked variables:
  compile time then hardly grows with depth. ``learned=False`` leaves the logits to the owning network (see
  :class:`Width`).
  """

  def __init__(self, blocks: Sequence[nnx.Module], *, choices: Sequence[int] | None = None, search: bool = True,
               scan: bool = False, learned: bool = True, rngs: nnx.Rngs | None = None):
    n = len(blocks)
    choices = tuple(sorted(set(int(c) for c in (choices or range(1, n + 1))))) if search else (n,)
    if not choices or choices[0] < 1 or choices[-1] != n:
      raise ValueError(f"depth choices {list(choices)} must lie in [1, {n}] and include {n}")
    self.blocks = nnx.List(list(blocks))
    self.choices = choices
    self.scan = scan
    self.logits = ArchParam(arch_init(rngs.params(), len(choices))) if learned else None
    self.q = nnx.data(None)  # the depth weights of the next forward (see Width.idx); none: every block
    self.hard = True

  @property
  def fixed(self) -> bool:
    return len(self.choices) == 1

  def probs(self) -> jax.Array:
    if self.logits is None:
      raise ValueError("this stack's distribution is kept by the network that owns it (learned=False)")
    return jax.nn.softmax(self.logits[...])

  def __call__(self, x):
    blocks = list(self.blocks)
    ends = []
    # Records need every block called directly, so a traced cost graph sees them unrolled.
    scanned = self.scan and len(blocks) > 2 and _RECORDS is None
    for j, block in enumerate(blocks[:1] if scanned else blocks):
      with _in_block(self, j):
        x = block(x)
      if j + 1 in self.choices:
        ends.append(x)
    if scanned:
      x, outs = _scan(blocks[1:], x)
      ends += [jax.tree.map(lambda v: v[j - 1], outs) for j in range(1, len(blocks)) if j + 1 in self.choices]
    if len(ends) == 1:
      return ends[0]
    tracked = isinstance(ends[0], tuple)
    feats = [e[0] for e in ends] if tracked else ends
    if len({f.shape for f in feats}) > 1:
      raise ValueError(f"the outputs after the candidate depths {list(self.choices)} of a Stack differ in shape "
                       f"({sorted({f.shape for f in feats})}): its blocks must keep their input's shape")
    q = jax.nn.one_hot(len(self.choices) - 1, len(self.choices), dtype=jnp.float32) if self.q is None else self.q
    if self.hard:
      k = jnp.argmax(q)
      out = ends[0]
      for i in range(1, len(ends)):
        out = jax.tree.map(lambda a, b, i=i: jnp.where(k == i, a, b), ends[i], out)
      return out
    if not tracked:
      return sum(q[i].astype(e.dtype) * e for i, e in enumerate(ends))
    widths = jnp.stack([jnp.asarray(e[1], jnp.int32) for e in ends])
    c_max, c = widths.max(), feats[0].shape[-1]
    # One matmul with the stacked interpolation matrices: dense and fast on every backend, where per-channel
    # gathers (and their scatter-add gradients) are slow on CPUs.
    mats = jax.vmap(lambda w: cwi_lib.interpolation_matrix(c, w, c_max))(widths) * q[:, None, None]
    out = jnp.dot(jnp.concatenate(feats, axis=-1), mats.reshape(-1, c).astype(feats[0].dtype))
    return out, c_max


def _scan(blocks, x):
  """Alike blocks in order as one ``lax.scan`` over their stacked variables; their statistics are written back.

  Returns the last output and every block's output, stacked.
  """
  graphdef = nnx.graphdef(blocks[0])  # its static settings (strides, kernels) serve every block
  states = [nnx.state(b) for b in blocks]
  like = lambda st: (jax.tree.structure(st), [(v.shape, v.dtype) for v in jax.tree.leaves(st)])
  if any(like(st) != like(states[0]) for st in states[1:]):
    raise ValueError("a scanned Stack needs the blocks after its first to be alike (the same variables)")
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *states)

  def body(carry, state):
    block = nnx.merge(graphdef, state)
    y = block(carry)
    if isinstance(y, tuple):  # a tracked width is carried as an int32 array
      y = (y[0], jnp.asarray(y[1], jnp.int32))
    return y, (y, nnx.state(block, nnx.BatchStat))

  if isinstance(x, tuple):
    x = (x[0], jnp.asarray(x[1], jnp.int32))
  x, (outs, stats) = jax.lax.scan(body, x, stacked)
  for i, block in enumerate(blocks):
    nnx.update(block, jax.tree.map(lambda v: v[i], stats))
  return x, outs


class StackOutput(nnx.Module):
  """The width a layer after a :class:`Stack` reads when the stack's candidate ends write different groups.

  ``groups[j]`` is the group block j writes. Its distribution is the depth mix of the end groups' (TAS's
  stage output); ``last=True`` reads the last block's group whatever the depth, as TAS's official cost
  formulas do.
  """

  def __init__(self, stack: Stack, groups: Sequence[Width]):
    if len(groups) != len(stack.blocks):
      raise ValueError(f"a StackOutput names the group of each of the stack's {len(stack.blocks)} blocks")
    self.stack = stack
    self.ends = nnx.List([groups[c - 1] for c in stack.choices])
    self.nominal = max(g.nominal for g in self.ends)

  @property
  def fixed(self) -> bool:
    return self.stack.fixed and self.ends[-1].fixed

  def distribution(self, group_probs, stack_probs, last: bool = False):
    """(widths, probabilities) of the stack's output; ``group_probs(g)``/``stack_probs(s)`` as in the cost graph.

    Ends that share one candidate list give that list with the mixed probabilities; others the
    concatenation of their lists.
    """
    if last or self.stack.fixed:
      return self.ends[-1].distribution(group_probs(self.ends[-1]))
    q = self.stack.probs() if stack_probs(self.stack) is None else stack_probs(self.stack)
    dists = [g.distribution(group_probs(g)) for g in self.ends]
    if len({d[0] for d in dists}) == 1:
      return dists[0][0], sum(q[i] * p for i, (_, p) in enumerate(dists))
    return sum((d[0] for d in dists), ()), jnp.concatenate([q[i] * p for i, (_, p) in enumerate(dists)])

  def chosen(self, choice: dict, paths: dict, last: bool = False) -> int:
    """The width of a choice (see :meth:`tas_jax.nets.cost_graph.CostGraph.count`)."""
    k = len(self.ends) - 1 if last or self.stack.fixed else choice[paths[id(self.stack)]]
    g = self.ends[k]
    return g.nominal if g.fixed else g.candidates[choice[paths[id(g)]]]


# ----------------------------------------------------------------------------- layers

def _group(width, rngs):
  return width if isinstance(width, (Width, StackOutput)) else Width(int(width), search=False, rngs=rngs)


class Layer(nnx.Module):
  """What Conv and Dense share: per-candidate batch norm, the CWI fold and the cost record.

  ``norm_groups`` G > 0 normalises a training batch with the statistics of each of G equal slices of it
  (what G-device data parallelism without synchronised batch norm computes); 0 with the whole batch's.
  ``unbiased_var`` updates running variances with the unbiased batch variance, as PyTorch does.
  """

  def _init_norm(self, norm: bool, bias: bool, norm_groups: int = 0, unbiased_var: bool = True):
    k, c = len(self.out.candidates), self.out.nominal
    self.norm = norm
    self.norm_groups, self.unbiased_var = int(norm_groups), bool(unbiased_var)
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

  def _affine(self, y, a, b):
    """y * a + b with a, b [G, ..., C] per batch slice."""
    g = a.shape[0]
    if g == 1:
      return y * a[0].astype(y.dtype) + b[0].astype(y.dtype)
    yg = y.reshape((g, -1) + y.shape[1:])
    expand = (slice(None),) + (None,) * (y.ndim - 1)
    return (yg * a[expand].astype(y.dtype) + b[expand].astype(y.dtype)).reshape(y.shape)

  def _finish(self, y):
    """Bias, candidate norms and the CWI fold of the drawn widths: y [..., C] -> [..., C], zero beyond."""
    group = self.out
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    idx, wt = group.drawn()
    c = y.shape[-1]
    if self.norm:
      scale, offset = self.scale[...][idx], self.offset[...][idx]  # [k, C]
      if self.use_running_average:
        mean, var = self.mean[...][idx][None], self.var[...][idx][None]  # [1, k, C]
      else:
        g = max(self.norm_groups, 1)
        yg = y.reshape((g, -1) + y.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, yg.ndim - 1))
        m = yg.mean(axes)  # [G, C]
        v = jnp.square(yg - m.reshape((g,) + (1,) * (yg.ndim - 2) + (c,))).mean(axes)
        n = math.prod(yg.shape[1:-1])
        mo = BN_MOMENTUM
        sg = jax.lax.stop_gradient
        unbias = n / max(n - 1, 1) if self.unbiased_var else 1.0
        self.mean[...] = self.mean[...].at[idx].set(mo * self.mean[...][idx] + (1 - mo) * sg(m.mean(0)))
        self.var[...] = self.var[...].at[idx].set(mo * self.var[...][idx] + (1 - mo) * sg(v.mean(0) * unbias))
        mean, var = m[:, None], v[:, None]  # [G, 1, C]
      a = jax.lax.rsqrt(var + BN_EPSILON) * scale[None]  # [G, k, C]
      b = offset[None] - mean * a
    else:
      a = jnp.ones((1, idx.shape[0], c), jnp.float32)
      b = jnp.zeros((1, idx.shape[0], c), jnp.float32)
    if group.fixed:
      return self._affine(y, a[:, 0], b[:, 0]) if self.norm else y
    width = group.drawn_widths()
    keep = jax.lax.iota(jnp.int32, c)[None, :] < width[:, None]
    a, b = a * keep, b * keep
    if group.hard:  # one candidate: exactly the pruned layer, zero beyond its width
      return self._affine(y, a[:, 0], b[:, 0])
    # M = sum_j w_j diag(a_j) CWI(c_j -> c*) and its offset: norm and interpolation in one matmul.
    interp = jax.vmap(lambda w: cwi_lib.interpolation_matrix(c, w, width.max()))(width)  # [k, C, C]
    wt = wt.astype(jnp.float32)
    mix = jnp.einsum("gjc,jco,j->gco", a, interp, wt)
    off = jnp.einsum("gjc,jco,j->go", b, interp, wt)
    if mix.shape[0] == 1:  # a plain matmul compiles and runs faster than a batched one
      return jnp.dot(y, mix[0].astype(y.dtype)) + off[0].astype(y.dtype)
    g = mix.shape[0]
    yg = y.reshape((g, -1) + y.shape[1:])
    expand = (slice(None),) + (None,) * (y.ndim - 1) + (slice(None),)
    out = jnp.einsum("gb...c,gco->gb...o", yg, mix.astype(y.dtype)) + off[expand].astype(y.dtype)
    return out.reshape(y.shape)

class Conv(Layer):
  """A 2-D convolution (NHWC, symmetric padding) from width ``cin`` to width ``cout``, norm on by default.

  ``depthwise=True`` convolves every channel on its own; then ``cin`` must be ``cout`` (one group).
  ``pad`` is the padding of each side (default ``kernel // 2``; 0 for a patch embedding).
  """

  def __init__(self, cin: Width | int, cout: Width | int, kernel: int, *, stride: int = 1,
               depthwise: bool = False, pad: int | None = None, norm: bool = True, bias: bool = False,
               norm_groups: int = 0, unbiased_var: bool = True, cost_name: str | None = None, rngs: nnx.Rngs):
    self.out = _group(cout, rngs)
    self.cin = self.out if depthwise else _group(cin, rngs)
    if depthwise and not (cin is cout or not isinstance(cin, Width) and not isinstance(cout, Width)
                          and int(cin) == int(cout)):
      raise ValueError("a depthwise conv reads and writes one width group: pass the same Width as cin and cout")
    self.kernel_size, self.stride, self.depthwise, self.cost_name = kernel, stride, depthwise, cost_name
    self.pad = kernel // 2 if pad is None else int(pad)
    shape = (kernel, kernel, 1 if depthwise else self.cin.nominal, self.out.nominal)
    self.kernel = nnx.Param(conv_init(rngs.params(), shape, jnp.float32))
    self._init_norm(norm, bias, norm_groups, unbiased_var)

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
    widths = (self.out,) if self.depthwise else (self.cin, self.out)
    record(spatial, *widths, name=self.cost_name)
    return self._finish(y)

class Dense(Layer):
  """A dense layer on the last axis from width ``cin`` to width ``cout``; no norm by default."""

  def __init__(self, cin: Width | int, cout: Width | int, *, norm: bool = False, bias: bool = True,
               kernel_init=dense_init, cost_name: str | None = None, rngs: nnx.Rngs):
    self.out = _group(cout, rngs)
    self.cin = _group(cin, rngs)
    self.kernel = nnx.Param(kernel_init(rngs.params(), (self.cin.nominal, self.out.nominal), jnp.float32))
    self.cost_name = cost_name
    self._init_norm(norm, bias)

  def __call__(self, x):
    self._check_input(x)
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
    record(math.prod(x.shape[1:-1]), self.cin, self.out, name=self.cost_name)
    return self._finish(y)

# ----------------------------------------------------------------------------- draws

def _logits(node) -> jax.Array:
  if node.logits is None:
    raise ValueError("a group or stack with learned=False is drawn by the network that owns it (for the ResNet "
                     "supernet: Supernet.sample / argmax_shape)")
  return node.logits[...]


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
    idx, weight = sampling.sample_widths(jax.random.fold_in(k_width, i), _logits(g), tau, k)
    g.idx, g.weight = idx, weight
    g.hard = False
  for i, s in enumerate([s for _, s in nodes(model, Stack) if not s.fixed]):
    s.q = sampling.sample_depth(jax.random.fold_in(k_depth, i), _logits(s), tau)
    s.hard = False


def use_argmax(model: nnx.Module) -> None:
  """Make the next forward the argmax network exactly: one width per group, one depth per stack."""
  for _, g in nodes(model, Width):
    i = jnp.zeros((), jnp.int32) if g.fixed else jnp.argmax(_logits(g))
    g.idx, g.weight = i[None].astype(jnp.int32), jnp.ones((1,), jnp.float32)
    g.hard = True
  for _, s in nodes(model, Stack):
    i = jnp.zeros((), jnp.int32) if s.fixed else jnp.argmax(_logits(s))
    s.q = jax.nn.one_hot(i, len(s.choices), dtype=jnp.float32)
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
      drawn = (real.out.drawn()[0][:, None] == jnp.arange(k)).any(axis=0)[:, None]  # [K, 1]
      layer.scale.set_value(drawn)
      layer.offset.set_value(drawn)
  return nnx.state(mask, nnx.Param)


# ----------------------------------------------------------------------------- costs

_RECORDS: list | None = None
_BLOCKS: list = []


KINDS = ("op", "projection", "bias")


def record(unit: int, *widths, kind: str = "op", name: str | None = None) -> None:
  """Declare ``unit * prod(widths)`` multiply-accumulates per example (kept only while :func:`recording`).

  ``widths`` are :class:`Width` groups, :class:`StackOutput` or ints; a group named twice counts its
  square. ``kind="projection"`` declares the 1x1 projection a concrete network needs where two widths added
  together differ: ``unit * c_a * c_b`` when ``c_a != c_b``, nothing when equal. ``kind="bias"`` marks a
  term TAS's official formulas leave out (a classifier's bias). ``name`` lets a cost table (measured
  latencies) replace the term.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown cost kind {kind!r}; expected one of {KINDS}")
  if kind == "projection" and len(widths) != 2:
    raise ValueError("a projection names the two widths that are added")
  if _RECORDS is not None:
    _RECORDS.append((int(unit), tuple(widths), tuple(_BLOCKS), kind, name))


@contextlib.contextmanager
def recording():
  """Collect the :func:`record` calls of the forwards traced inside: ``(unit, widths, enclosing blocks, kind,
  name)``."""
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
  return {p: int(np.argmax(np.asarray(_logits(n)))) for p, n in searched(model)}


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
