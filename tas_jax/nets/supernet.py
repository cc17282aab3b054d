"""The TAS search space of the built-in ResNets, built from the searchable layers of :mod:`tas_jax.nets.searchable`.

Every conv writes a width group of its own (a block's projection shortcut
writes its last conv's), with that conv's candidate widths (METHOD.md §1.2);
every stage is a depth group, a :class:`~tas_jax.nets.searchable.Stack`
whose blocks return their features with the number of channels they filled,
so that its candidate end blocks, which write different groups, are
interpolated to the widest before the soft depth mix (METHOD.md §2.5), and the
next stage reads the mixed width
(:class:`~tas_jax.nets.searchable.StackOutput`). Identity shortcuts are
left-aligned adds of zero-padded maps, which cost the pruned network a 1x1
projection where the two widths differ (a ``projection`` record). The
identical blocks of a stage run as one ``lax.scan``.

The logits are two tables, one row per conv (``width_logits`` [L, K]) and
per stage (``depth_logits`` [S, Kd]), padded and masked like
:class:`tas_jax.core.space.SearchSpace`: the groups are ``learned=False`` and
this network draws them (:meth:`Supernet.sample`, a :class:`Selection`) and
gives their probabilities to the cost graph (:attr:`Supernet.graph`, traced
once per space). Architecture parameters are :class:`ArchParam` variables,
apart from weights (``nnx.Param``) and batch-norm statistics (``nnx.BatchStat``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tas_jax.core import sampling
from tas_jax.core import shapes as shapes_lib
from tas_jax.core import space as space_lib
from tas_jax.core.shapes import Shape
from tas_jax.nets import cost_graph as cost_graph_lib
from tas_jax.nets import resnet as resnet_lib
from tas_jax.nets import searchable as S
from tas_jax.nets.searchable import ArchParam

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


class Block(nnx.Module):
  """A residual block of the search space: ``(features, width) -> (features, width)``."""

  def __init__(self, cin, groups: list, spec: shapes_lib.BlockSpec, space: space_lib.SearchSpace,
               config: SupernetConfig, *, rngs: nnx.Rngs):
    lay = space.layout
    norm = dict(norm_groups=config.bn_groups, unbiased_var=config.unbiased_var)
    prev, convs = cin, []
    for ci, group in zip(spec.convs, groups):
      cs = lay.convs[ci]
      convs.append(S.Conv(prev, group, cs.kernel, stride=cs.stride, cost_name=f"conv{ci}", rngs=rngs, **norm))
      prev = group
    self.convs = nnx.List(convs)
    self.cin, self.out = cin, groups[-1]
    self.conv_ids = spec.convs  # rows of the width table
    self.relu = config.block_relu
    self.pool = spec.stride > 1 and space.base.shortcut == "avgpool"
    self.unit = spec.out_hw ** 2
    self.key = f"{spec.stage},{spec.index}"
    if spec.stride > 1 or spec.nominal_in != spec.nominal_out:
      stride = 1 if self.pool or spec.stride == 1 else spec.stride
      self.shortcut = S.Conv(cin, self.out, 1, stride=stride, norm=config.shortcut_bn,
                             cost_name=f"shortcut{self.key}", rngs=rngs, **norm)
    else:
      self.shortcut = None

  def __call__(self, xw):
    x, x_width = xw
    y = x
    for i, conv in enumerate(self.convs):
      y = conv(y)
      if i < len(self.convs) - 1:
        y = jax.nn.relu(y)
    width = self.out.drawn_widths().max()
    if self.shortcut is not None:
      s, s_width = self.shortcut(resnet_lib.avg_pool2(x) if self.pool else x), width
    else:
      S.record(self.unit, self.cin, self.out, kind="projection", name=f"projection{self.key}")
      if self.out.hard:  # the pruned net's identity or identity-initialised projection: first channels of x
        s, s_width = jnp.where(jax.lax.iota(jnp.int32, x.shape[-1]) < width, x, 0), width
      else:
        s, s_width = x, x_width
    out = y + s.astype(y.dtype)  # left-aligned add of zero-padded maps
    return (jax.nn.relu(out) if self.relu else out), jnp.maximum(width, s_width)


_GRAPHS: dict = {}  # (base, config) -> cost graph: every supernet of one space shares one trace


class Supernet(nnx.Module):
  """A searchable ResNet over :func:`make_space` of an unpruned base shape.

  ``model(images, key, tau, train=True)`` runs the stochastic search forward;
  ``model.hard(images, train=False)`` runs the argmax network exactly. Both
  return ``(logits, costs)`` with ``costs = {"expected": E, "discrete": F}``
  (F as an exact int32 pair, see :func:`tas_jax.core.cost.as_int`). :func:`apply`
  is the same as one pure function.
  """

  def __init__(self, base: Shape, config: SupernetConfig = SupernetConfig(), *, rngs: nnx.Rngs):
    if base.allow_wider:
      raise shapes_lib.ShapeError("a shape with widths above the unpruned ones cannot be searched")
    self.config = config
    self.space = make_space(shapes_lib.full_shape(base), config)
    space, lay = self.space, self.space.layout
    rows = [tuple(int(c) for c, ok in zip(t, m) if ok) for t, m in zip(space.width_table, space.width_mask)]
    groups = [S.Width(spec.nominal, candidates=row, search=len(row) > 1, learned=False)
              for spec, row in zip(lay.convs, rows)]
    self.groups = nnx.List(groups)
    norm = dict(norm_groups=config.bn_groups, unbiased_var=config.unbiased_var)
    stem = lay.convs[0]
    self.stem = S.Conv(S.Width(base.in_channels, search=False, learned=False), groups[0], stem.kernel,
                       stride=stem.stride, cost_name="stem", rngs=rngs, **norm)
    prev, stages = groups[0], []
    for s in range(len(space.base.layers)):
      blocks = []
      for spec in lay.stage_blocks(s):
        blocks.append(Block(prev, [groups[ci] for ci in spec.convs], spec, space, config, rngs=rngs))
        prev = blocks[-1].out
      choices = [int(d) for d, ok in zip(space.depth_table[s], space.depth_mask[s]) if ok]
      stages.append(S.Stack(blocks, choices=choices, search=len(choices) > 1, scan=config.scan_blocks,
                            learned=False))
      prev = S.StackOutput(stages[-1], [b.out for b in blocks])
    # One Stack per stage. Named to sort before `groups` and `head`: NNX names a variable by the first path it
    # reaches it by, in attribute order, and the head reaches every stage through its StackOutput.
    self.body = nnx.List(stages)
    self.head = S.Dense(prev, S.Width(base.num_classes, search=False, learned=False),
                        kernel_init=resnet_lib.linear_init, cost_name="head", rngs=rngs)
    init = nnx.initializers.normal(0.01)
    self.width_logits = ArchParam(init(rngs.params(), space.width_table.shape, jnp.float32))
    self.depth_logits = ArchParam(init(rngs.params(), space.depth_table.shape, jnp.float32))
    self.graph  # traced here, once per space

  @property
  def blocks(self) -> list[Block]:
    """Every block, stage by stage."""
    return [b for stage in self.body for b in stage.blocks]

  # ------------------------------------------------------------------ distributions and costs
  @property
  def graph(self) -> cost_graph_lib.CostGraph:
    """The cost graph of this search space (exact, or the official formulas: ``config.exact_cost``)."""
    space = self.space
    key = (space.base, space.width_table.tobytes(), space.width_mask.tobytes(), space.width_table.shape,
           space.depth_table.tobytes(), space.depth_mask.tobytes(), space.depth_table.shape, self.config.exact_cost)
    if key not in _GRAPHS:
      base = space.base
      example = jax.ShapeDtypeStruct((1, base.image_size, base.image_size, base.in_channels), jnp.float32)
      _GRAPHS[key] = cost_graph_lib.trace(self, example, official=not self.config.exact_cost,
                                          forward=lambda m, x: m.hard(x, with_costs=False)[0])
    return _GRAPHS[key]

  def width_probs(self):
    return _masked_softmax(self.width_logits[...], self.space.width_mask)

  def depth_probs(self):
    return _masked_softmax(self.depth_logits[...], self.space.depth_mask)

  def argmax(self):
    """Candidate index of the argmax shape (METHOD.md §5) per conv and stage, masked candidates excluded."""
    neg = jnp.finfo(jnp.float32).min
    wi = jnp.argmax(jnp.where(self.space.width_mask, self.width_logits[...], neg), axis=-1)
    di = jnp.argmax(jnp.where(self.space.depth_mask, self.depth_logits[...], neg), axis=-1)
    return wi.astype(jnp.int32), di.astype(jnp.int32)

  def rows(self, width, depth):
    """The cost graph's ``probs``: row r of ``width`` [L, K] for group r, of ``depth`` [S, Kd] for stage r."""
    groups = {id(g): i for i, g in enumerate(self.groups)}
    stages = {id(s): i for i, s in enumerate(self.body)}

    def probs(node):
      if id(node) in groups:
        return width[groups[id(node)], : len(node.candidates)]
      if id(node) in stages:
        return depth[stages[id(node)], : len(node.choices)]
      return None

    return probs

  def expected_cost(self, width_probs, depth_probs):
    """E (METHOD.md §3.2) in MACs for width [L, K] and depth [S, Kd] probabilities, differentiable in both."""
    return self.graph.expected(self, self.rows(width_probs, depth_probs))

  def discrete_cost(self, width_idx, depth_idx):
    """F (METHOD.md §3.3) of the shape given by one candidate index per conv [L] and stage [S], as an exact
    int32 pair (:func:`tas_jax.core.cost.as_int`); jittable and vmappable."""
    hot = lambda i, n: jax.nn.one_hot(i, n, dtype=jnp.float32)
    return self.graph.discrete_pair(self, self.rows(hot(width_idx, self.space.width_table.shape[1]),
                                                    hot(depth_idx, self.space.depth_table.shape[1])))

  def table_cost(self, tables: dict, width_dist, depth_dist):
    """The sum of per-layer tables (``{name: array}``, see :meth:`CostGraph.tabled`) under width [L, K] and
    depth [S, Kd] distributions: softmax probabilities for an expectation, one-hot for one shape.

    Raises ValueError when the tables and the named layers differ (a layer left out would cost nothing).
    """
    names = {t.name for t in self.graph.terms if t.name is not None}
    if names != set(tables):
      odd = sorted(names ^ set(tables))
      raise ValueError(f"the cost tables and this network's layers differ: {', '.join(odd[:4])}")
    return self.graph.tabled(self, tables, self.rows(width_dist, depth_dist))

  def costs(self):
    """E under the current distributions and F of the argmax shape (an exact int32 pair)."""
    return {"expected": self.expected_cost(self.width_probs(), self.depth_probs()),
            "discrete": self.discrete_cost(*self.argmax())}

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

  def draw(self, sel: Selection | None) -> None:
    """Point every group and stage at a selection's rows for the next forward; None clears the draws."""
    for i, g in enumerate(self.groups):
      g.idx, g.weight, g.hard = (None, None, True) if sel is None else (sel.idx[i], sel.weight[i], sel.hard)
    for s, stage in enumerate(self.body):
      q = None if sel is None or sel.depth is None else sel.depth[s, : len(stage.choices)]
      stage.q, stage.hard = q, True if sel is None else sel.hard

  def __call__(self, images, key, tau, *, train: bool = True, with_costs: bool = True):
    return self.forward(images, self.sample(key, tau), train=train, with_costs=with_costs)

  def hard(self, images, *, train: bool = False, with_costs: bool = True):
    return self.forward(images, self.argmax_selection(), train=train, with_costs=with_costs)

  def forward(self, images, sel: Selection, *, train: bool, with_costs: bool = True):
    self.draw(sel)
    self.train() if train else self.eval()
    try:
      x = images if self.config.dtype is None else images.astype(self.config.dtype)
      x = jax.nn.relu(self.stem(x))
      if self.space.base.arch == "imagenet":
        x = resnet_lib.max_pool3s2(x)
      xw = (x, self.stem.out.drawn_widths().max())
      for stage in self.body:
        xw = stage(xw)
      feats = xw[0].astype(jnp.float32).mean(axis=(1, 2))
      S.record(self.space.base.num_classes, kind="bias")
      logits = self.head(feats)
    finally:  # the network keeps no draw and its training mode: its structure and state stay as built
      self.draw(None)
      self.train()
    # The cost graph is small but not free to compile; the weight step does not need it.
    return logits, (self.costs() if with_costs else None)


def _widths(space, idx):
  table = jnp.asarray(space.width_table)
  return jnp.take_along_axis(table, idx, axis=1)


def _masked_softmax(logits, mask):
  return jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1) * mask


def candidate_rows(model: Supernet):
  """(conv, width-table row) of every searchable conv; a shortcut shares its block's last conv's row."""
  pairs = [(model.stem, 0)]
  for block in model.blocks:
    pairs += list(zip(block.convs, block.conv_ids))
    if block.shortcut is not None:
      pairs.append((block.shortcut, block.conv_ids[-1]))
  return pairs


def drawn_mask(model: Supernet, idx) -> nnx.State:
  """Which weights a forward with the drawn candidates ``idx`` [L, k] used, as a tree like the weights.

  False only for the batch-norm scales and offsets of the candidates not drawn
  (see :func:`tas_jax.nets.searchable.drawn_mask`).
  """
  model = nnx.merge(*nnx.split(model), copy=True)
  model.draw(Selection(idx, _widths(model.space, idx), jnp.ones(idx.shape, jnp.float32), None, hard=False))
  return S.drawn_mask(model)


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


def build(base: Shape, config: SupernetConfig = SupernetConfig(), seed: int = 0, abstract: bool = False) -> Supernet:
  """A supernet; ``abstract`` builds shapes only (nothing is computed): enough for its costs, which read no weight."""
  if abstract:
    return nnx.eval_shape(lambda: Supernet(base, config, rngs=nnx.Rngs(seed)))
  return Supernet(base, config, rngs=nnx.Rngs(seed))
