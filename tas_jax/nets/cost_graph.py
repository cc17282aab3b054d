"""What a searchable network costs, as functions of its width and depth distributions.

:func:`trace` runs the network once abstractly (nothing is computed) and keeps
the multiply-accumulates every layer declares (:func:`tas_jax.nets.searchable.record`)
as terms ``unit * prod(widths) * [enclosing blocks kept]``. From them a
:class:`CostGraph` gives TAS's expected cost E (differentiable in the logits,
for the cost loss), the discrete cost F of the argmax network (which decides
the loss's sign), the exact count of any choice on the host, the bounds of
the search space, and the argmax moved into a cost band.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tas_jax.core import cost as cost_lib
from tas_jax.nets import searchable
from tas_jax.nets.searchable import StackOutput, Width


@dataclasses.dataclass(frozen=True)
class Term:
  unit: int
  widths: tuple  # (group path, power) of every searched group; fixed widths are folded into unit
  blocks: tuple  # (stack path, block index) of every enclosing stack
  kind: str = "op"  # op | projection | bias (see searchable.record)
  name: str | None = None
  specs: tuple = ()  # the recorded widths in order: a node's path, or an int for a plain int


@dataclasses.dataclass(frozen=True)
class CostGraph:
  """A network's multiply-accumulates per example as a sum of terms over its width and depth groups.

  The expected cost sums ``unit * prod E[c_g^power] * prod P(block kept)``:
  exact for independent groups, a group named twice in a term (a layer
  reading and writing one group) contributing its second moment, not the
  square of its mean. A projection term is ``unit * E[c_a c_b [c_a != c_b]]``.
  The discrete cost is the same at the argmax.

  ``official=True`` follows TAS's official formulas where they differ from the
  network they describe: a layer after a stack reads the width of the stack's
  last block whatever the depth, E leaves out projections, and neither E nor
  F counts biases.

  Every method takes an optional ``probs(node)``: the probabilities of a
  width group or stack (None: its own distribution), for networks that keep
  their logits elsewhere (``learned=False``).
  """

  terms: tuple[Term, ...]
  official: bool = False
  int32_safe: bool = True  # every term of the unpruned network stays below 2**31 (see discrete_pair)

  def _dist(self, node, probs, last=None):
    if isinstance(node, StackOutput):
      return node.distribution(probs, probs, last=self.official if last is None else last)
    return node.distribution(probs(node))

  def _values(self, model, probs, dtype, discrete: bool):
    """Every term's value under ``probs`` (one-hot integers make them exact integers).

    Each distribution, moment and survival probability is built once and shared by the terms that use it,
    which keeps the traced graph (and its gradient) small.
    """
    nodes = dict(nnx.iter_graph(model))
    memo = {}

    def once(key, make):
      if key not in memo:
        memo[key] = make()
      return memo[key]

    def dist(spec):
      if isinstance(spec, int):
        return (spec,), jnp.ones(1, dtype)
      return once(("dist", spec), lambda: (lambda w, p: (w, p.astype(dtype)))(*self._dist(nodes[spec], probs)))

    def moment(path, power):
      def make():
        widths, p = dist(path)
        return (p * jnp.asarray(np.asarray(widths) ** power, dtype)).sum()
      return once(("moment", path, power), make)

    def survival(path, j):
      return once(("survival", path, j), lambda: _survival(nodes[path], j, probs, dtype))

    values = []
    for t in self.terms:
      if (t.kind == "bias" and self.official) or (t.kind == "projection" and self.official and not discrete):
        continue
      v = jnp.asarray(t.unit, dtype)
      if t.kind == "projection":
        (va, pa), (vb, pb) = (dist(s) for s in t.specs)
        differ = np.asarray([[a * b * (a != b) for b in vb] for a in va])
        v = v * (pa[:, None] * jnp.asarray(differ, dtype) * pb[None, :]).sum()  # no reduced-precision matmul
      else:
        for path, power in t.widths:
          v = v * moment(path, power)
      for path, j in t.blocks:
        if not nodes[path].fixed:
          v = v * survival(path, j)
      values.append(v)
    return values

  def expected(self, model, probs=None) -> jax.Array:
    """E: the cost under the current distributions, differentiable in the logits."""
    probs = probs or (lambda node: None)
    return sum(self._values(model, probs, jnp.float32, False), jnp.zeros((), jnp.float32))

  def _one_hot(self, probs):
    def f(node):
      if node.fixed:
        return None
      p = probs(node) if probs is not None else None
      p = node.probs() if p is None else p
      return jax.nn.one_hot(jnp.argmax(p), p.shape[0], dtype=jnp.int32)
    return f

  def discrete_pair(self, model, probs=None) -> jax.Array:
    """F in exact integers on device: int32 ``[high, low]`` with F = high * 2**16 + low, no rounding beyond
    2**24 where float32 starts to round. A network with a term of 2**31 or more (``int32_safe`` False) is
    summed in float32 instead, to about 1e-7."""
    if not self.int32_safe:
      f = self.discrete(model, probs)
      high = jnp.floor(f / 65536.0)
      return jnp.stack([high, f - high * 65536.0]).astype(jnp.int32)
    terms = jnp.stack(self._values(model, self._one_hot(probs), jnp.int32, True))
    return jax.lax.stop_gradient(jnp.stack([(terms >> 16).sum(), (terms & 0xFFFF).sum()]).astype(jnp.int32))

  def discrete(self, model, probs=None) -> jax.Array:
    """F: the cost of the argmax network, as a float on device."""
    if not self.int32_safe:
      hot = self._one_hot(probs)
      onehot = lambda node: None if node.fixed else hot(node).astype(jnp.float32)
      return jax.lax.stop_gradient(sum(self._values(model, onehot, jnp.float32, True), jnp.zeros((), jnp.float32)))
    return cost_lib.as_float(self.discrete_pair(model, probs))

  def tabled(self, model, tables: dict, probs=None, argmax: bool = False) -> jax.Array:
    """The sum over named terms of their tables contracted with their widths' distributions.

    ``tables[name]`` has one axis per width the term records, over its candidates (one entry for a fixed
    width; entries beyond the candidates are ignored); terms without a table contribute nothing. With
    softmax probabilities this is the expected value of a per-layer measure (a latency) for independent
    widths; with ``argmax=True`` the argmax network's. It measures the network as built, whatever the
    convention: a layer after a stack reads the depth-mixed width.
    """
    probs = probs or (lambda node: None)
    if argmax:
      hot = self._one_hot(probs)
      probs = lambda node: None if node.fixed else hot(node).astype(jnp.float32)
    nodes = dict(nnx.iter_graph(model))
    total = jnp.zeros((), jnp.float32)
    for t in self.terms:
      if t.name not in tables:
        continue
      v = jnp.asarray(tables[t.name], jnp.float32)
      for s in reversed(t.specs):
        widths, p = self._dist(nodes[s], probs, last=False)
        v = v[..., : len(widths)] @ p.astype(jnp.float32)
      for path, j in t.blocks:
        if not nodes[path].fixed:
          v = v * _survival(nodes[path], j, probs, jnp.float32)
      total = total + v
    return total

  def count(self, model, choice: dict | None = None) -> int:
    """The discrete cost of the argmax network, or of ``choice`` (see ``searchable.argmax_choice``), exactly, on
    the host."""
    nodes = dict(nnx.iter_graph(model))
    paths = {id(n): p for p, n in nodes.items()}
    choice = searchable.argmax_choice(model) if choice is None else choice

    def width(spec):
      if isinstance(spec, int):
        return spec
      n = nodes[spec]
      if isinstance(n, StackOutput):
        return n.chosen(choice, paths, last=self.official)
      return n.nominal if n.fixed else n.candidates[choice[spec]]

    total = 0
    for t in self.terms:
      if t.kind == "bias" and self.official:
        continue
      if not all(nodes[p].fixed or nodes[p].choices[choice[p]] > j for p, j in t.blocks):
        continue
      if t.kind == "projection":
        a, b = (width(s) for s in t.specs)
        total += t.unit * a * b * (a != b)
      else:
        total += t.unit * math.prod(width(p) ** e for p, e in t.widths)
    return int(total)

  def full(self, model) -> int:
    """The unpruned network's: every group at its nominal width, every stack whole."""
    return self.count(model, searchable.full_choice(model))

  def smallest(self, model) -> int:
    """The cheapest network of the search space: every group at its narrowest, every stack at its shallowest."""
    return self.count(model, {p: 0 for p, _ in searchable.searched(model)})

  def fit(self, model, low: float, high: float) -> dict:
    """The argmax choice moved into the cost band [low, high] one candidate at a time.

    Above the band, each move is the one-candidate step down (narrower or
    shallower) that gives up the least log-probability per unit of cost it
    saves. Below it, the step up that gives up the least per unit of cost it
    adds, among those that stay at most ``high``; when every step up
    overshoots (a coarse choice, such as one more block), the best of them is
    taken, that candidate becomes the floor of its group, and the steps down
    resume. A choice already inside is returned as is; when no step is left
    outside the band, the last choice at most ``high`` it reached (if any).
    """
    choice = searchable.argmax_choice(model)
    logp = {p: np.asarray(jax.nn.log_softmax(n.logits[...])) for p, n in searchable.searched(model)}
    floor = {p: 0 for p in logp}
    cost = self.count(model, choice)
    reached = None  # the last choice at most `high`, for a band nothing reaches
    while not low <= cost <= high:
      if cost <= high:
        reached = dict(choice)
      down = cost > high
      moves = []
      for p, lp in logp.items():
        i = choice[p] + (-1 if down else 1)
        if not floor[p] <= i < len(lp):
          continue
        moved = self.count(model, {**choice, p: i})
        gain = (cost - moved) if down else (moved - cost)
        if gain > 0:
          moves.append(((lp[choice[p]] - lp[i]) / gain, not down and moved > high, p, i, moved))
      if not moves:
        return reached if reached is not None and cost > high else choice
      _, over, p, i, cost = min(moves, key=lambda m: (m[1], m[0]))  # a move that stays in reach first
      choice[p] = i
      if over:
        floor[p] = i
    return choice


def _survival(stack, j: int, probs, dtype) -> jax.Array:
  """P(block j of ``stack`` is kept) = P(depth > j), under ``probs(stack)`` or the stack's own distribution."""
  p = probs(stack)
  p = stack.probs() if p is None else p
  return (p.astype(dtype) * jnp.asarray([c > j for c in stack.choices], dtype)).sum()


def trace(model: nnx.Module, example, *, forward=None, official: bool = False) -> CostGraph:
  """The cost graph of ``model`` on inputs like ``example`` (an array or ``jax.ShapeDtypeStruct``, batch 1).

  ``forward(model, x)`` runs the network (default ``model(x)``); ``official`` see :class:`CostGraph`.
  """
  graphdef, state = nnx.split(model)
  seen = []

  def run(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    seen.append(m)
    return m(x) if forward is None else forward(m, x)

  with searchable.recording() as records:
    jax.eval_shape(run, state, example)
  paths = {id(node): path for path, node in nnx.iter_graph(seen[0])}
  written = {id(layer.out) for _, layer in searchable.nodes(seen[0], searchable.Layer)}
  for path, node in searchable.searched(seen[0]):
    if isinstance(node, Width) and id(node) not in written:
      raise ValueError(f"width group {'/'.join(map(str, path))} is searched but no searchable layer writes it: its "
                       "channels would never be cut; declare it with search=False")
  nodes = (Width, StackOutput)
  if any(id(w) not in paths for _, widths, *_ in records for w in widths if isinstance(w, nodes)):
    raise ValueError("a layer ran on a copy of the network (an NNX transform such as nnx.jit, nnx.remat or "
                     "nnx.scan inside the forward): trace needs the forward to call its searchable layers directly")
  terms, peak = [], 0
  for unit, widths, blocks, kind, name in records:
    peak = max(peak, unit * math.prod(w.nominal if isinstance(w, nodes) else int(w) for w in widths))
    powers: dict = {}
    fixed = []
    for w in widths:
      if isinstance(w, nodes) and not w.fixed:
        powers[paths[id(w)]] = powers.get(paths[id(w)], 0) + 1
      else:
        fixed.append(w.nominal if isinstance(w, nodes) else int(w))
    if kind == "projection" and len(powers) == 1 and not fixed:
      continue  # one group added to itself: the widths always match
    specs = tuple(paths[id(w)] if isinstance(w, nodes) else int(w) for w in widths)
    if kind == "projection":
      terms.append(Term(unit, (), tuple((paths[id(s)], j) for s, j in blocks), kind, name, specs))
      continue
    terms.append(Term(unit * math.prod(fixed), tuple(sorted(powers.items())),
                      tuple((paths[id(s)], j) for s, j in blocks), kind, name, specs))
  return CostGraph(tuple(terms), official, peak < 2**31)
