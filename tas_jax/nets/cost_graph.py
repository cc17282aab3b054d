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

from tas_jax.nets import searchable
from tas_jax.nets.searchable import Width


@dataclasses.dataclass(frozen=True)
class Term:
  unit: int
  widths: tuple  # (group path, power) of every searched group; fixed widths are folded into unit
  blocks: tuple  # (stack path, block index) of every enclosing stack


@dataclasses.dataclass(frozen=True)
class CostGraph:
  """A network's multiply-accumulates per example as a sum of terms over its width and depth groups.

  The expected cost sums ``unit * prod E[c_g^power] * prod P(block kept)``:
  exact for independent groups, a group named twice in a term (a layer
  reading and writing one group) contributing its second moment, not the
  square of its mean. The discrete cost is the same at the argmax.
  """

  terms: tuple[Term, ...]

  def _total(self, model, wprobs, sprobs):
    groups = dict(nnx.iter_graph(model))
    total = jnp.zeros((), jnp.float32)
    for t in self.terms:
      v = jnp.asarray(float(t.unit), jnp.float32)
      for path, power in t.widths:
        g = groups[path]
        v = v * g.moment(power, wprobs(g))
      for path, j in t.blocks:
        s = groups[path]
        v = v * s.survival(j, sprobs(s))
      total = total + v
    return total

  def expected(self, model) -> jax.Array:
    """E: the cost under the current distributions, differentiable in the logits."""
    return self._total(model, lambda g: None, lambda s: None)

  def discrete(self, model) -> jax.Array:
    """F: the cost of the argmax network, as a float on device."""
    one_hot = lambda m: None if m.fixed else jax.nn.one_hot(jnp.argmax(m.logits[...]), m.logits.shape[0])
    return jax.lax.stop_gradient(self._total(model, one_hot, one_hot))

  def count(self, model, choice: dict | None = None) -> int:
    """Exact multiply-accumulates of the argmax network, or of ``choice`` (see ``searchable.argmax_choice``)."""
    groups = dict(nnx.iter_graph(model))
    choice = searchable.argmax_choice(model) if choice is None else choice
    total = 0
    for t in self.terms:
      if all(groups[p].choices[choice.get(p, -1)] > j for p, j in t.blocks):
        total += t.unit * math.prod(groups[p].candidates[choice[p]] ** e for p, e in t.widths)
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


def trace(model: nnx.Module, example) -> CostGraph:
  """The cost graph of ``model`` on inputs like ``example`` (an array or ``jax.ShapeDtypeStruct``, batch 1)."""
  graphdef, state = nnx.split(model)
  seen = []

  def run(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    seen.append(m)
    return m(x)

  with searchable.recording() as records:
    jax.eval_shape(run, state, example)
  paths = {id(node): path for path, node in nnx.iter_graph(seen[0])}
  written = {id(layer.out) for _, layer in searchable.nodes(seen[0], searchable.Layer)}
  for path, node in searchable.searched(seen[0]):
    if isinstance(node, Width) and id(node) not in written:
      raise ValueError(f"width group {'/'.join(map(str, path))} is searched but no searchable layer writes it: its "
                       "channels would never be cut; declare it with search=False")
  if any(id(w) not in paths for _, widths, _ in records for w in widths if isinstance(w, Width)):
    raise ValueError("a layer ran on a copy of the network (an NNX transform such as nnx.jit, nnx.remat or "
                     "nnx.scan inside the forward): trace needs the forward to call its searchable layers directly")
  terms = []
  for unit, widths, blocks in records:
    powers: dict = {}
    fixed = []
    for w in widths:
      if isinstance(w, Width) and not w.fixed:
        powers[paths[id(w)]] = powers.get(paths[id(w)], 0) + 1
      else:
        fixed.append(w.nominal if isinstance(w, Width) else int(w))
    terms.append(Term(unit * math.prod(fixed), tuple(sorted(powers.items())),
                      tuple((paths[id(s)], j) for s, j in blocks)))
  return CostGraph(tuple(terms))
