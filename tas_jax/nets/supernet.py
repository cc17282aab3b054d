"""The TAS search space as a Flax NNX supernet whose widths and depths are distributions.

Forward in search mode (METHOD.md §2.1 to 2.6): every conv runs at its full
(nominal) width on a zero-padded input, so weights are shared by first-c
filters; k widths are drawn per conv (Gumbel top-k, re-normalised weights);
each drawn width gets its own batch norm, applied before channel-wise
interpolation (CWI) to the widest drawn width; a block's shortcut reuses the
draw of its last conv; residual adds are left-aligned; at a stage's end the
outputs of the candidate end blocks are mixed with soft Gumbel weights after
CWI to the widest of them; the classifier reads the first channels.

Feature maps keep a static channel axis (the nominal width) and carry their
current width as a traced integer; channels beyond it are zero. Zero padding
makes the left-aligned add a plain sum and first-c weight sharing a plain full
conv. The per-candidate batch norms and the CWI of one conv are folded into a
single channel-mixing matrix, so a searchable conv costs one conv plus one
C x C matmul whatever k is.

The identical blocks of a stage (all but its first) run as one ``lax.scan``
over their stacked variables, so compile time hardly grows with depth.

Architecture parameters live in :class:`ArchParam` variables, apart from
weights (``nnx.Param``) and batch-norm statistics (``nnx.BatchStat``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tas_jax.core import cost as cost_lib
from tas_jax.core import cwi as cwi_lib
from tas_jax.nets import conv as conv_lib
from tas_jax.nets import resnet as resnet_lib
from tas_jax.nets.searchable import ArchParam
from tas_jax.core import sampling
from tas_jax.core import shapes as shapes_lib
from tas_jax.core import space as space_lib
from tas_jax.core.shapes import Shape

MODES = ("width", "depth", "shape")


@dataclasses.dataclass(frozen=True)
class SupernetConfig:
  """Options of the searchable network.

  Attributes:
    mode: ``"shape"`` searches widths and depths, ``"width"`` widths only,
      ``"depth"`` depths only (METHOD.md §8).
    num_sampled: widths drawn per conv, k (TAS's I = 2).
    ratios: candidate width ratios (METHOD.md §1.2).
    width_multiple: round candidate widths to this multiple (e.g. 8 for
      accelerators); 1 keeps the official floor(ratio * width).
    depth_choices: per-stage depth choices replacing METHOD.md §1.3's.
    block_relu: ReLU after each block's residual add. On, as the fixed official
      code; off reproduces the paper-era search runs (METHOD.md §0, item 9).
    shortcut_bn: batch norm per candidate on every projection shortcut in
      search, as official search mode does even for the stride-2 CIFAR
      shortcut that the pruned net builds without one.
    exact_cost: expected and discrete costs count what the pruned net costs
      (METHOD.md §3.2/3.3 with their two omissions fixed); False is official.
    bn_groups: 0 normalises with statistics of the whole global batch (sync
      batch norm); G > 0 with statistics of G equal slices of it, as G-GPU
      DataParallel does (official runs: 2).
    unbiased_var: running variances are updated with the unbiased batch
      variance (n / (n - 1) times the biased one), as PyTorch's batch norm
      does; False uses the biased one. Only eval-mode forwards (search-time
      validation, the exported network's statistics) see the difference.
    scan_blocks: one scanned body for the identical blocks of a stage (all
      but its first); False unrolls them (same numbers, longer compiles).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
  """

  mode: str = "shape"
  num_sampled: int = 2
  ratios: tuple[float, ...] = shapes_lib.WIDTH_RATIOS
  width_multiple: int = 1
  depth_choices: tuple[tuple[int, ...], ...] | None = None
  block_relu: bool = True
  shortcut_bn: bool = True
  exact_cost: bool = True
  bn_groups: int = 0
  unbiased_var: bool = True
  scan_blocks: bool = True
  dtype: object = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown search mode {self.mode!r}; expected one of {MODES}")
    if self.num_sampled < 1:
      raise ValueError("num_sampled must be at least 1")
    if self.bn_groups < 0:
      raise ValueError("bn_groups must be >= 0")


def make_space(base: Shape, config: SupernetConfig) -> space_lib.SearchSpace:
  return space_lib.search_space(base, ratios=config.ratios, multiple=config.width_multiple,
                                 search_width=config.mode != "depth", search_depth=config.mode != "width",
                                 depth_options=config.depth_choices)


@dataclasses.dataclass(frozen=True)
class Selection:
  """The widths one forward uses: per conv, k candidate indices, their widths and weights."""

  idx: jax.Array  # int32 [L, k]
  width: jax.Array  # int32 [L, k]
  weight: jax.Array  # float [L, k]
  depth: jax.Array | None  # float [S, Kd] mixing weights over end blocks, or None (all blocks)
  hard: bool  # argmax mode: one width per conv, no CWI, the chosen depth selected exactly


def _moments(y, groups: int):
  """Per-channel batch mean and variance of y [B,H,W,C], globally or per batch slice."""
  g = max(groups, 1)
  yg = y.reshape((g, -1) + y.shape[1:]).astype(jnp.float32)
  mean = yg.mean(axis=(1, 2, 3))
  var = jnp.square(yg - mean[:, None, None, None]).mean(axis=(1, 2, 3))
  return mean, var  # [G, C]


class SuperConv(nnx.Module):
  """A conv at its nominal width with one batch norm per candidate width."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, num_candidates: int, *, bn: bool,
               pool: bool = False, rngs: nnx.Rngs):
    self.stride, self.pool = stride, pool
    self.kernel = nnx.Param(resnet_lib.conv_init(rngs.params(), (kernel, kernel, cin, cout), jnp.float32))
    self.has_bn = bn
    if bn:
      k = num_candidates
      self.scale = nnx.Param(jnp.ones((k, cout), jnp.float32))
      self.bias = nnx.Param(jnp.zeros((k, cout), jnp.float32))
      self.mean = nnx.BatchStat(jnp.zeros((k, cout), jnp.float32))
      self.var = nnx.BatchStat(jnp.ones((k, cout), jnp.float32))

  def __call__(self, x, idx, width, weight, *, train: bool, groups: int, relu: bool, hard: bool, dtype,
               unbiased_var: bool = True):
    """Conv, candidate batch norms, CWI to the widest drawn width, weighted sum.

    Returns the output (zero beyond its width) and that width (a traced int).
    """
    if self.pool:
      x = resnet_lib.avg_pool2(x)
    kernel = self.kernel[...]
    if dtype is not None:
      x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = conv_lib.conv(x, kernel, self.stride)
    c = y.shape[-1]
    g = max(groups, 1) if train else 1
    if self.has_bn:
      scale, bias = self.scale[...][idx], self.bias[...][idx]  # [k, C]
      if train:
        mean, var = _moments(y, groups)  # [G, C]
        n = y.shape[0] // max(groups, 1) * y.shape[1] * y.shape[2]
        running_var = var.mean(0) * (n / max(n - 1, 1) if unbiased_var else 1.0)
        self._update_stats(idx, mean.mean(0), running_var)
        inv = jax.lax.rsqrt(var + resnet_lib.BN_EPSILON)[:, None]  # [G, 1, C]
        a = inv * scale[None]
        b = bias[None] - mean[:, None] * a
      else:
        inv = jax.lax.rsqrt(self.var[...][idx] + resnet_lib.BN_EPSILON)
        a = (inv * scale)[None]
        b = (bias - self.mean[...][idx] * inv * scale)[None]
    else:
      a = jnp.ones((1,) + idx.shape + (c,), jnp.float32)
      b = jnp.zeros((1,) + idx.shape + (c,), jnp.float32)
    out_width = width.max()
    keep = jax.lax.iota(jnp.int32, c)[None, :] < width[:, None]  # [k, C]
    a, b = a * keep, b * keep
    if hard:  # one candidate: no interpolation, the exact pruned conv
      out = y.reshape((g, -1) + y.shape[1:]) * a[:, 0, None, None, None].astype(y.dtype)
      out = out + b[:, 0, None, None, None].astype(y.dtype)
    else:
      # M = sum_j w_j diag(a_j) CWI(c_j -> c*), and the matching offset.
      interp = jax.vmap(lambda w: cwi_lib.interpolation_matrix(c, w, out_width))(width)  # [k, C, C]
      mix = jnp.einsum("gjc,jco,j->gco", a, interp, weight.astype(jnp.float32))
      offset = jnp.einsum("gjc,jco,j->go", b, interp, weight.astype(jnp.float32))
      if g == 1:  # a plain matmul compiles and runs faster than a batched one
        out = jnp.dot(y, mix[0].astype(y.dtype)) + offset[0].astype(y.dtype)
      else:
        yg = y.reshape((g, -1) + y.shape[1:])
        out = jnp.einsum("gbhwc,gco->gbhwo", yg, mix.astype(y.dtype)) + offset[:, None, None, None].astype(y.dtype)
    out = out.reshape(y.shape)
    return (jax.nn.relu(out) if relu else out), out_width

  def _update_stats(self, idx, mean, var):
    m = resnet_lib.BN_MOMENTUM
    self.mean[...] = self.mean[...].at[idx].set(m * self.mean[...][idx] + (1 - m) * jax.lax.stop_gradient(mean))
    self.var[...] = self.var[...].at[idx].set(m * self.var[...][idx] + (1 - m) * jax.lax.stop_gradient(var))


class SuperBlock(nnx.Module):

  def __init__(self, space: space_lib.SearchSpace, spec: shapes_lib.BlockSpec, config: SupernetConfig, *,
               rngs: nnx.Rngs):
    lay = space.layout
    k = space.width_table.shape[1]
    self.conv_ids = spec.convs
    prev = spec.nominal_in
    convs = []
    for ci in spec.convs:
      cs = lay.convs[ci]
      convs.append(SuperConv(prev, cs.nominal, cs.kernel, cs.stride, k, bn=True, rngs=rngs))
      prev = cs.nominal
    self.convs = nnx.List(convs)
    has_conv = spec.stride > 1 or spec.nominal_in != spec.nominal_out
    pool = spec.stride > 1 and space.base.shortcut == "avgpool"
    self.shortcut = SuperConv(spec.nominal_in, spec.nominal_out, 1, 1 if pool or spec.stride == 1 else spec.stride,
                              k, bn=config.shortcut_bn, pool=pool, rngs=rngs) if has_conv else None

  def rows(self, sel: Selection):
    """This block's rows of the selection: (idx, width, weight), each [convs, k]."""
    rows = np.asarray(self.conv_ids)
    return sel.idx[rows], sel.width[rows], sel.weight[rows]

  def __call__(self, x, x_width, sel: Selection, *, train, groups, block_relu, dtype, unbiased_var=True):
    return self.apply_rows(x, x_width, *self.rows(sel), hard=sel.hard, train=train, groups=groups,
                           block_relu=block_relu, dtype=dtype, unbiased_var=unbiased_var)

  def apply_rows(self, x, x_width, idx, width, weight, *, hard, train, groups, block_relu, dtype, unbiased_var=True):
    """The block on its own selection rows (:meth:`rows`): what a scan over identical blocks calls."""
    y, w = x, x_width
    n = len(self.convs)
    for i, conv in enumerate(self.convs):
      y, w = conv(y, idx[i], width[i], weight[i], train=train, groups=groups, relu=i < n - 1,
                  hard=hard, dtype=dtype, unbiased_var=unbiased_var)
    if self.shortcut is not None:
      s, sw = self.shortcut(x, idx[-1], width[-1], weight[-1], train=train, groups=groups,
                            relu=False, hard=hard, dtype=dtype, unbiased_var=unbiased_var)
    elif hard:  # the pruned net's identity or identity-initialised projection: first w channels of x
      s = jnp.where(jax.lax.iota(jnp.int32, x.shape[-1]) < w, x, 0).astype(y.dtype)
      sw = w
    else:
      s, sw = x.astype(y.dtype), x_width
    out = y + s  # left-aligned add of zero-padded maps
    return (jax.nn.relu(out) if block_relu else out), jnp.maximum(w, sw)


class Supernet(nnx.Module):
  """A searchable ResNet over :func:`make_space` of an unpruned base shape.

  ``model(images, key, tau, train=True)`` runs the stochastic search forward;
  ``model.hard(images, train=False)`` runs the argmax network exactly. Both
  return ``(logits, costs)`` with ``costs = {"expected": E, "discrete": F}``
  (see :mod:`tas_jax.core.cost`). :func:`apply` is the same as one pure function.
  """

  def __init__(self, base: Shape, config: SupernetConfig = SupernetConfig(), *, rngs: nnx.Rngs):
    if base.allow_wider:
      raise shapes_lib.ShapeError("a shape with widths above the unpruned ones cannot be searched")
    self.config = config
    self.space = make_space(shapes_lib.full_shape(base), config)
    space, lay = self.space, self.space.layout
    k = space.width_table.shape[1]
    stem = lay.convs[0]
    self.stem = SuperConv(base.in_channels, stem.nominal, stem.kernel, stem.stride, k, bn=True, rngs=rngs)
    self.blocks = nnx.List([SuperBlock(space, b, config, rngs=rngs) for b in lay.blocks])
    last = lay.blocks[-1].nominal_out
    self.head_kernel = nnx.Param(resnet_lib.linear_init(rngs.params(), (last, base.num_classes), jnp.float32))
    self.head_bias = nnx.Param(jnp.zeros((base.num_classes,), jnp.float32))
    init = nnx.initializers.normal(0.01)
    self.width_logits = ArchParam(init(rngs.params(), space.width_table.shape, jnp.float32))
    self.depth_logits = ArchParam(init(rngs.params(), space.depth_table.shape, jnp.float32))

  # ------------------------------------------------------------------ distributions and costs
  def width_probs(self):
    return _masked_softmax(self.width_logits[...], self.space.width_mask)

  def depth_probs(self):
    return _masked_softmax(self.depth_logits[...], self.space.depth_mask)

  def argmax(self):
    return cost_lib.argmax_indices(self.space, self.width_logits[...], self.depth_logits[...])

  def costs(self):
    wi, di = self.argmax()
    return {"expected": cost_lib.expected_cost(self.space, self.width_probs(), self.depth_probs(),
                                               self.config.exact_cost),
            "discrete": cost_lib.discrete_cost(self.space, wi, di, self.config.exact_cost)}

  def argmax_shape(self) -> Shape:
    """The argmax shape on the host (METHOD.md §5)."""
    wi, di = self.argmax()
    return self.space.shape_from_indices(np.asarray(wi), np.asarray(di))

  # ------------------------------------------------------------------ forwards
  def sample(self, key, tau) -> Selection:
    kw, kd = jax.random.split(key)
    k = min(self.config.num_sampled, self.space.width_table.shape[1])  # depth mode: one candidate
    idx, weight = sampling.sample_widths(kw, self.width_logits[...], tau, k, self.space.width_mask)
    depth = sampling.sample_depth(kd, self.depth_logits[...], tau, self.space.depth_mask)
    return Selection(idx, _widths(self.space, idx), weight, depth, hard=False)

  def argmax_selection(self) -> Selection:
    wi, di = self.argmax()
    idx = wi[:, None]
    depth = jax.nn.one_hot(di, self.space.depth_table.shape[1], dtype=jnp.float32)
    return Selection(idx, _widths(self.space, idx), jnp.ones(idx.shape, jnp.float32), depth, hard=True)

  def __call__(self, images, key, tau, *, train: bool = True, with_costs: bool = True):
    return self.forward(images, self.sample(key, tau), train=train, with_costs=with_costs)

  def hard(self, images, *, train: bool = False, with_costs: bool = True):
    return self.forward(images, self.argmax_selection(), train=train, with_costs=with_costs)

  def forward(self, images, sel: Selection, *, train: bool, with_costs: bool = True):
    cfg, space, lay = self.config, self.space, self.space.layout
    groups = cfg.bn_groups if train else 0
    kw = dict(train=train, groups=groups, dtype=cfg.dtype, unbiased_var=cfg.unbiased_var)
    x, w = self.stem(images, sel.idx[0], sel.width[0], sel.weight[0], relu=True, hard=sel.hard, **kw)
    if space.base.arch == "imagenet":
      x = resnet_lib.max_pool3s2(x)
    kw["block_relu"] = cfg.block_relu
    for s in range(len(space.base.layers)):
      choices = [int(d) for d, ok in zip(space.depth_table[s], space.depth_mask[s]) if ok]
      stage = [(spec, block) for spec, block in zip(lay.blocks, self.blocks) if spec.stage == s]
      ends = []
      # A stage's first block changes the resolution or width; the blocks after it are identical, and one
      # scanned body for them keeps the compile time from growing with depth.
      head, tail = (stage[:1], stage[1:]) if cfg.scan_blocks and len(stage) > 2 else (stage, [])
      for spec, block in head:
        x, w = block(x, w, sel, **kw)
        if spec.index + 1 in choices:
          ends.append((x, w))
      if tail:
        x, w, ys, yws = _scan_blocks([b for _, b in tail], x, w, sel, kw)
        ends += [(ys[i], yws[i]) for i, (spec, _) in enumerate(tail) if spec.index + 1 in choices]
      if len(ends) > 1:
        x, w = _mix_depths(ends, sel.depth[s, : len(ends)], sel.hard)
    feats = x.astype(jnp.float32).mean(axis=(1, 2))
    logits = feats @ self.head_kernel[...] + self.head_bias[...]
    # The cost graph is small but not free to compile; the weight step does not need it.
    return logits, (self.costs() if with_costs else None)


def _scan_blocks(blocks, x, w, sel: Selection, kw):
  """Identical blocks in order as one ``lax.scan`` over their stacked variables, updating their statistics.

  Returns the last output and width, and every block's output and width stacked (for the depth mix).
  """
  graphdef = nnx.graphdef(blocks[0])  # same structure for all; the conv ids it holds are not read here
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *[nnx.state(b) for b in blocks])
  rows = [b.rows(sel) for b in blocks]
  idx, width, weight = (jnp.stack([r[i] for r in rows]) for i in range(3))

  def body(carry, inputs):
    state, i, wd, wt = inputs
    block = nnx.merge(graphdef, state)
    y, yw = block.apply_rows(*carry, i, wd, wt, hard=sel.hard, **kw)
    return (y, yw), (y, yw, nnx.state(block, nnx.BatchStat))

  (x, w), (ys, yws, stats) = jax.lax.scan(body, (x, jnp.asarray(w, jnp.int32)), (stacked, idx, width, weight))
  for i, block in enumerate(blocks):
    nnx.update(block, jax.tree.map(lambda v: v[i], stats))
  return x, w, ys, yws


def _widths(space, idx):
  table = jnp.asarray(space.width_table)
  return jnp.take_along_axis(table, idx, axis=1)


def _masked_softmax(logits, mask):
  return jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1) * mask


def _mix_depths(ends, q, hard: bool):
  """Stage output O = sum_k q_k CWI(F_k, C_max) over candidate end blocks (METHOD.md §2.5)."""
  widths = jnp.stack([w for _, w in ends])
  if hard:  # the chosen end block, exactly
    k = jnp.argmax(q)
    out = ends[0][0]
    for i in range(1, len(ends)):
      out = jnp.where(k == i, ends[i][0], out)
    return out, widths[k]
  c_max = widths.max()
  c = ends[0][0].shape[-1]
  # One matmul with the stacked interpolation matrices: dense and fast on every backend, where
  # per-channel gathers (and their scatter-add gradients) are slow on CPUs.
  mats = jax.vmap(lambda w: cwi_lib.interpolation_matrix(c, w, c_max))(widths) * q[:, None, None]
  feats = jnp.concatenate([f for f, _ in ends], axis=-1)  # [B, H, W, K*C]
  out = jnp.dot(feats, mats.reshape(-1, c).astype(feats.dtype))
  return out, c_max


def candidate_rows(model: Supernet):
  """(SuperConv, width-table row) of every searchable conv; a shortcut shares its block's last conv's row."""
  pairs = [(model.stem, 0)]
  for spec, block in zip(model.space.layout.blocks, model.blocks):
    pairs += list(zip(block.convs, spec.convs))
    if block.shortcut is not None:
      pairs.append((block.shortcut, spec.convs[-1]))
  return pairs


def drawn_mask(model: Supernet, idx) -> nnx.State:
  """Which weights a forward with the drawn candidates ``idx`` [L, k] used, as a tree like the weights.

  False only for the batch-norm scales and offsets of the candidates not
  drawn: the official code gives every candidate its own batch-norm module,
  so those get no gradient and PyTorch's optimiser leaves them untouched
  (see :func:`tas_jax.core.optim.masked_update`). Everything else is used.
  """
  k = model.space.width_table.shape[1]
  drawn = (jnp.asarray(idx)[..., None] == jnp.arange(k)).any(axis=1)  # [L, K]
  graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
  mask = nnx.merge(graphdef, jax.tree.map(lambda _: jnp.ones((), bool), weights), rest, copy=True)
  for conv, row in candidate_rows(mask):
    if conv.has_bn:
      conv.scale.set_value(drawn[row][:, None])
      conv.bias.set_value(drawn[row][:, None])
  return nnx.state(mask, nnx.Param)


# ----------------------------------------------------------------------------- functional interface

def split(model: Supernet):
  """(graphdef, weights, arch, stats): weights are nnx.Param, arch ArchParam, stats nnx.BatchStat."""
  return nnx.split(model, nnx.Param, ArchParam, nnx.BatchStat)


def apply(graphdef, weights, arch, stats, images, key, tau, *, train: bool = True, hard: bool = False,
          with_costs: bool = True):
  """The supernet forward as one pure function.

  Returns ``(logits, costs, new_stats)`` (``costs`` is None with
  ``with_costs=False``). With ``hard=True`` the argmax network
  runs exactly (``key`` and ``tau`` are ignored); ``train`` selects batch or
  running statistics (training also updates the running statistics of the
  drawn candidates).
  """
  model = nnx.merge(graphdef, weights, arch, stats, copy=True)  # never mutate the caller's variables
  if hard:
    logits, costs = model.hard(images, train=train, with_costs=with_costs)
  else:
    logits, costs = model(images, key, tau, train=train, with_costs=with_costs)
  return logits, costs, nnx.state(model, nnx.BatchStat)


def build(base: Shape, config: SupernetConfig = SupernetConfig(), seed: int = 0) -> Supernet:
  return Supernet(base, config, rngs=nnx.Rngs(seed))
