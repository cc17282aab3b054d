"""TAS's bilevel step for any searchable network (:mod:`tas_jax.nets.searchable`).

Each iteration takes a weight step (cross-entropy on a batch of the training
half, through fresh Gumbel draws) and then an architecture step (cross-entropy
on a batch of the validation half plus the cost loss, whose sign the discrete
cost of the argmax network decides on device). Weights and architecture have
their own optax optimisers (SGD with Nesterov momentum and Adam by default, as
TAS). Everything is a pure function of an explicit state and key, traced once.

Example::

  search = searchable_step.Search.create(net, images[:1], target_ratio=0.5)
  state = search.init(net)
  step = jax.jit(search.step)
  for i in range(steps):
    state, metrics = step(state, train_batch, valid_batch, jax.random.key(i), tau)
  small = search.export(state)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import optax
from flax import nnx

from tas_jax.core import cost as cost_lib
from tas_jax.core import distill, optim
from tas_jax.nets import cost_graph, searchable, surgery

log = logging.getLogger("tas_jax")


@dataclasses.dataclass(frozen=True, eq=False)
class Search:
  """Everything static about one search: the network's structure, its cost graph, optimisers and target."""

  graphdef: Any
  graph: cost_graph.CostGraph
  w_tx: optax.GradientTransformation
  a_tx: optax.GradientTransformation
  target: float  # MACs per example
  max_cost: int
  band: str
  tolerance: float
  cost_weight: float
  num_sampled: int
  freeze_undrawn: bool = True  # the norms of candidates not drawn keep their values and optimiser state

  @classmethod
  def create(cls, model: nnx.Module, example, *, target_ratio: float, weight_tx=None, arch_tx=None,
             band: str = "official", tolerance: float = 0.05, cost_weight: float = 2.0,
             num_sampled: int = 2, freeze_undrawn: bool = True) -> "Search":
    """Trace ``model`` on ``example`` (one batch of images, or its ShapeDtypeStruct) and check the target."""
    graph = cost_graph.trace(model, example)
    full = graph.full(model)
    smallest = graph.smallest(model) / full
    if not smallest <= target_ratio < 1.0:
      raise ValueError(f"target ratio {target_ratio} is outside what this network's search space reaches: "
                       f"[{smallest:.3f}, 1.0)")
    return cls(nnx.graphdef(model), graph, weight_tx or optim.weight_optimizer(0.05),
               arch_tx or optim.arch_optimizer(1e-3), target_ratio * full, full, band, tolerance, cost_weight,
               num_sampled, freeze_undrawn)

  def init(self, model: nnx.Module) -> dict:
    _, weights, arch, stats, rest = nnx.split(model, nnx.Param, searchable.ArchParam, nnx.BatchStat, ...)
    return {"weights": weights, "arch": arch, "stats": stats, "rest": rest,
            "w_opt": self.w_tx.init(weights), "a_opt": self.a_tx.init(arch)}

  def model(self, state) -> nnx.Module:
    return nnx.merge(self.graphdef, state["weights"], state["arch"], state["stats"], state["rest"], copy=True)

  def _forward(self, weights, arch, stats, rest, images, key, tau):
    model = nnx.merge(self.graphdef, weights, arch, stats, rest, copy=True)
    model.train()
    searchable.sample(model, key, tau, self.num_sampled)
    return model, model(images)

  def step(self, state, train_batch, valid_batch, key, tau):
    """One weight step and one architecture step; returns the new state and scalar metrics (on device)."""
    k_w, k_a = jax.random.split(key)
    s = state

    def weight_loss(weights):
      model, logits = self._forward(weights, s["arch"], s["stats"], s["rest"], train_batch[0], k_w, tau)
      loss = distill.cross_entropy(logits, train_batch[1])
      return loss, (nnx.state(model, nnx.BatchStat), distill.accuracy(logits, train_batch[1]),
                    searchable.drawn_mask(model))

    (w_loss, (stats, w_acc, drawn)), grads = jax.value_and_grad(weight_loss, has_aux=True)(s["weights"])
    if self.freeze_undrawn:
      weights, w_opt = optim.masked_update(self.w_tx, grads, s["w_opt"], s["weights"], drawn)
    else:
      updates, w_opt = self.w_tx.update(grads, s["w_opt"], s["weights"])
      weights = optax.apply_updates(s["weights"], updates)

    def arch_loss(arch):
      model, logits = self._forward(weights, arch, stats, s["rest"], valid_batch[0], k_a, tau)
      ce = distill.cross_entropy(logits, valid_batch[1])
      expected, discrete = self.graph.expected(model), self.graph.discrete(model)
      cost = cost_lib.cost_loss(expected, discrete, self.target, self.max_cost, self.band, self.tolerance,
                                self.cost_weight)
      return ce + cost, (nnx.state(model, nnx.BatchStat), ce, expected, discrete)

    (_, (stats, a_ce, expected, discrete)), grads = jax.value_and_grad(arch_loss, has_aux=True)(s["arch"])
    updates, a_opt = self.a_tx.update(grads, s["a_opt"], s["arch"])
    arch = optax.apply_updates(s["arch"], updates)
    new = {**s, "weights": weights, "arch": arch, "stats": stats, "w_opt": w_opt, "a_opt": a_opt}
    metrics = {"weight_loss": w_loss, "weight_acc": w_acc, "arch_ce": a_ce,
               "expected_ratio": expected / self.max_cost, "discrete_ratio": discrete / self.max_cost}
    return new, metrics

  def band_limits(self) -> tuple[float, float]:
    return cost_lib.cost_band(self.target, self.max_cost, self.band, self.tolerance)

  def export(self, state, fit: bool = True) -> nnx.Module:
    """The searched network, concrete: the argmax widths and depths, moved into the cost band when ``fit``."""
    model = self.model(state)
    low, high = self.band_limits()
    choice = self.graph.fit(model, low, high) if fit else searchable.argmax_choice(model)
    cost = self.graph.count(model, choice)
    if fit and not low <= cost <= high:
      log.warning("no network the fitting reaches lies in the cost band [%.3f, %.3f] of the unpruned MACs; the export "
                  "costs %.3f (a coarse search space: try another target or finer width ratios)",
                  low / self.max_cost, high / self.max_cost, cost / self.max_cost)
    return surgery.export_searchable(model, choice)
