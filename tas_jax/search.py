"""TAS's bilevel search (TAS-SPEC section 4): one jitted step, the search loop and its outputs.

Each iteration takes a weight step (SGD with Nesterov, cross-entropy on a batch
of the training half) and then an architecture step (Adam, cross-entropy on a
batch of the validation half plus lambda times the cost loss, whose sign the
discrete cost decides on device). Both draw fresh Gumbel samples; all keys
come from ``fold_in(seed, step)``. The step is traced once: tau arrives as a
traced value and the learning rate is computed from the step counter inside.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tas_jax import cost as cost_lib
from tas_jax import data as data_lib
from tas_jax import distill
from tas_jax import engine
from tas_jax import optim
from tas_jax import parallel
from tas_jax import schedules
from tas_jax import shapes
from tas_jax import supernet

log = logging.getLogger("tas_jax")

# Configuration keys that change a search's trajectory: a checkpoint written
# under other values of these is refused on resume.
FINGERPRINT_KEYS = ("model", "dataset", "num_train_examples", "mode", "target_flops_ratio", "epochs", "warmup_epochs",
                    "batch_size", "lr", "weight_decay", "arch_lr", "arch_weight_decay", "tau_schedule", "tau_max",
                    "tau_min", "cost_band", "cost_tolerance", "cost_weight", "exact_cost", "num_sampled",
                    "block_relu", "shortcut_bn", "width_multiple", "bn_groups", "seed", "dtype", "split_seed",
                    "lr_schedule", "momentum", "nesterov", "arch_b1", "arch_b2", "arch_step_updates_bn",
                    "freeze_undrawn_bn", "unbiased_var", "valid_sampling")


def accuracy(logits, labels):
  return (jnp.argmax(logits, -1) == labels).mean()


def supernet_config(config) -> supernet.SupernetConfig:
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(config.get("dtype", "float32"), "bad")
  if dtype == "bad":
    raise engine.RunError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
  return supernet.SupernetConfig(mode=config.mode, num_sampled=config.num_sampled,
                                 width_multiple=config.width_multiple, block_relu=config.block_relu,
                                 shortcut_bn=config.shortcut_bn, exact_cost=config.exact_cost,
                                 bn_groups=config.bn_groups, unbiased_var=bool(config.get("unbiased_var", True)),
                                 dtype=dtype)


def base_shape(config, num_classes: int) -> shapes.Shape:
  try:
    base = shapes.resolve(config.model, num_classes)
  except shapes.ShapeError as e:
    raise engine.RunError(str(e)) from None
  return shapes.full_shape(base)


def target_ratios(config) -> list[float]:
  """The cost targets of a run, as ratios of the unpruned network's cost: ``targets`` or ``target_flops_ratio``."""
  text = str(config.get("targets", "") or "").strip()
  if not text:
    return [float(config.target_flops_ratio)]
  try:
    values = [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise engine.RunError(f"targets must be comma-separated ratios such as 0.3,0.5,0.7, got {text!r}") from None
  if len(set(values)) != len(values) or not values:
    raise engine.RunError(f"targets must be distinct ratios, got {text!r}")
  return values


def _latency_of(space, tables, shape) -> float:
  from tas_jax import latency_table
  return latency_table.predict(space, tables, shape)


def check_target(space: shapes.SearchSpace, ratio: float, exact: bool, tables=None) -> tuple[float, float]:
  """Refuse a target ratio outside (0, 1) or below what the space can reach; returns (min, max) ratios."""
  wi = np.zeros(space.width_table.shape[0], np.int32)
  di = np.zeros(space.depth_table.shape[0], np.int32)
  if tables is None:
    full = cost_lib.count(space.base).macs
    smallest = cost_lib.as_int(cost_lib.discrete_cost(space, wi, di, exact)) / full
  else:
    smallest = _latency_of(space, tables, space.shape_from_indices(wi, di)) / _latency_of(space, tables, space.base)
  if not 0.0 < ratio < 1.0:
    raise engine.RunError(f"target_flops_ratio must lie in (0, 1), got {ratio}")
  if ratio < smallest:
    raise engine.RunError(f"target_flops_ratio {ratio} is below what this search space reaches: "
                          f"its MACs ratios span [{smallest:.3f}, 1.0]")
  return smallest, 1.0


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """Everything static about one search: the network, optimisers, target, data normalisation."""

  graphdef: Any
  space: shapes.SearchSpace
  w_tx: optax.GradientTransformation
  a_tx: optax.GradientTransformation
  lr_fn: Any
  max_macs: float  # the unpruned network's cost (MACs, or predicted seconds with latency tables)
  target_macs: float
  band: str
  tolerance: float
  cost_weight: float
  mean: tuple
  std: tuple
  streaming: bool
  seed: int
  arch_bn: bool
  freeze_undrawn: bool = True
  tables: Any = None  # latency_table.LatencyTables for a latency-aware search, else None (MACs)


COSTS = ("macs", "latency")
VALID_SAMPLING = ("replacement", "shuffle")
# Official best genotype: the best search-validation accuracy among epochs whose cost ratio lies within this
# distance of the target (a symmetric band, unlike the cost loss's).
BEST_BAND = 0.05


def build(config, num_classes: int, steps_per_epoch: int, mean=(0.5,) * 3, std=(0.25,) * 3, streaming=False,
          tables=None):
  """The search problem and its initial state ``{weights, arch, stats, w_opt, a_opt, step}``.

  With latency ``tables`` the cost is predicted latency and the target is
  ``target_flops_ratio`` times the unpruned network's (or ``target_latency_ms``).
  """
  base = base_shape(config, num_classes)
  model = supernet.build(base, supernet_config(config), seed=int(config.seed))
  for ratio in target_ratios(config):
    check_target(model.space, ratio, bool(config.exact_cost), tables)
  graphdef, weights, arch, stats = supernet.split(model)
  lr_fn = schedules.lr_schedule(config.get("lr_schedule", "cosine"), config.lr, config.epochs, steps_per_epoch,
                                warmup_epochs=config.warmup_epochs)
  w_tx = optim.weight_optimizer(lr_fn, momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay)
  a_tx = optim.arch_optimizer(config.arch_lr, b1=config.arch_b1, b2=config.arch_b2,
                              weight_decay=config.arch_weight_decay)
  if tables is None:
    max_cost = float(cost_lib.count(base).macs)
  else:
    max_cost = _latency_of(model.space, tables, base)
  problem = Problem(graphdef, model.space, w_tx, a_tx, lr_fn, max_cost, target_ratios(config)[0] * max_cost,
                    config.cost_band, float(config.cost_tolerance), float(config.cost_weight), tuple(mean), tuple(std),
                    streaming, int(config.seed), bool(config.get("arch_step_updates_bn", True)),
                    bool(config.get("freeze_undrawn_bn", True)), tables)
  state = {"weights": weights, "arch": arch, "stats": stats, "w_opt": w_tx.init(weights), "a_opt": a_tx.init(arch),
           "step": jnp.zeros((), jnp.int32)}
  return problem, state


def _augment(problem: Problem, key, images):
  if problem.streaming:
    return data_lib.flip_and_normalize(key, images, problem.mean, problem.std)
  return data_lib.augment_cifar(key, images, problem.mean, problem.std)


def _costs(problem: Problem, model: supernet.Supernet, forward_costs=None):
  """(expected, discrete) cost as floats: MACs (from the forward when given), or latency from the tables."""
  wi, di = model.argmax()
  space = problem.space
  if problem.tables is None:
    if forward_costs is None:
      return None, cost_lib.as_float(cost_lib.discrete_cost(space, wi, di, model.config.exact_cost))
    return forward_costs["expected"], cost_lib.as_float(forward_costs["discrete"])
  expected = cost_lib.table_cost(space, problem.tables, model.width_probs(), model.depth_probs())
  discrete = cost_lib.table_cost(space, problem.tables, jax.nn.one_hot(wi, space.width_table.shape[1]),
                                 jax.nn.one_hot(di, space.depth_table.shape[1]))
  return expected, jax.lax.stop_gradient(discrete)


def weight_step(problem: Problem, state, batch, keys, tau):
  """The weight half of an iteration: SGD on the weights, cross-entropy on a training-half batch.

  Draws its own Gumbel sample (``keys = (augmentation key, sample key)``) and
  updates the weights, their optimiser state and the running statistics;
  the architecture and its optimiser state are left as they are. With
  ``problem.freeze_undrawn`` the batch-norm rows of candidates not drawn keep
  their values and momentum (PyTorch skips parameters without a gradient).
  Returns ``(new_state, metrics)``.
  """
  k_aug, k_sample = keys
  x = _augment(problem, k_aug, batch["images"])

  def loss_fn(weights):
    model = nnx.merge(problem.graphdef, weights, state["arch"], state["stats"], copy=True)
    sel = model.sample(k_sample, tau)
    logits, _ = model.forward(x, sel, train=True, with_costs=False)
    return distill.cross_entropy(logits, batch["labels"]), (nnx.state(model, nnx.BatchStat), logits, sel.idx)

  (loss, (stats, logits, idx)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["weights"])
  if problem.freeze_undrawn:
    model = _model(problem, state)
    weights, w_opt = optim.masked_update(problem.w_tx, grads, state["w_opt"], state["weights"],
                                         supernet.drawn_mask(model, idx))
  else:
    updates, w_opt = problem.w_tx.update(grads, state["w_opt"], state["weights"])
    weights = optax.apply_updates(state["weights"], updates)
  new_state = {**state, "weights": weights, "w_opt": w_opt, "stats": stats}
  return new_state, {"weight_loss": loss, "train_acc": accuracy(logits, batch["labels"])}


def arch_step(problem: Problem, state, batch, keys, tau, target):
  """The architecture half: Adam on the width and depth logits, on a validation-half batch.

  The loss is cross-entropy plus ``cost_weight`` times the cost loss, whose
  sign the discrete cost of the architecture entering the step decides
  (:func:`tas_jax.cost.cost_loss`). Weights and their optimiser state are left
  as they are; the running statistics take this forward's update only with
  ``problem.arch_bn`` (the official code runs both forwards in train mode).
  Returns ``(new_state, metrics)``.
  """
  k_aug, k_sample = keys
  x = _augment(problem, k_aug, batch["images"])
  g, weights, stats = problem.graphdef, state["weights"], state["stats"]

  def loss_fn(arch):
    logits, costs, new_stats = supernet.apply(g, weights, arch, stats, x, k_sample, tau, train=True)
    ce = distill.cross_entropy(logits, batch["labels"])
    expected, discrete = _costs(problem, nnx.merge(g, weights, arch, stats, copy=True), costs)
    c_loss = cost_lib.cost_loss(expected, discrete, target, problem.max_macs, band=problem.band,
                                tolerance=problem.tolerance, weight=problem.cost_weight)
    return ce + c_loss, (new_stats, ce, c_loss, expected, logits)

  (loss, (new_stats, ce, c_loss, expected, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["arch"])
  updates, a_opt = problem.a_tx.update(grads, state["a_opt"], state["arch"])
  arch = optax.apply_updates(state["arch"], updates)
  new_state = {**state, "arch": arch, "a_opt": a_opt, "stats": new_stats if problem.arch_bn else stats}
  return new_state, {"arch_loss": loss, "arch_ce": ce, "cost_loss": c_loss, "expected_flops_ratio":
                     expected / problem.max_macs, "valid_batch_acc": accuracy(logits, batch["labels"])}


def step_keys(problem: Problem, step):
  """The four keys of an iteration: augmentation and sample of the weight step, then of the architecture step."""
  key = jax.random.fold_in(jax.random.key(problem.seed), step)
  k_aug_t, k_aug_v, k_w, k_a = jax.random.split(key, 4)
  return (k_aug_t, k_w), (k_aug_v, k_a)


def search_step(problem: Problem, state, train_batch, valid_batch, tau, target=None):
  """One TAS iteration: :func:`weight_step` on ``train_batch``, then :func:`arch_step` on ``valid_batch``.

  Pure; returns ``(new_state, metrics)``. ``tau`` and ``target`` (the cost
  target; default the problem's) are traced scalars, so one compiled step
  serves every epoch, and ``jax.vmap`` over states and targets searches for
  several targets at once. Keys come from ``fold_in(seed, step)``.
  """
  target = problem.target_macs if target is None else target
  w_keys, a_keys = step_keys(problem, state["step"])
  state, w_metrics = weight_step(problem, state, train_batch, w_keys, tau)
  state, a_metrics = arch_step(problem, state, valid_batch, a_keys, tau, target)
  model = _model(problem, state)
  _, discrete = _costs(problem, model)
  new_state = {**state, "step": state["step"] + 1}
  metrics = {**w_metrics, **a_metrics, "flops_ratio": discrete / problem.max_macs,
             "lr": problem.lr_fn(state["step"]), "tau": jnp.asarray(tau, jnp.float32)}
  return new_state, metrics


def fit_to_band(space: shapes.SearchSpace, width_probs, depth_probs, shape: shapes.Shape, band,
                max_moves: int = 10_000, cost_fn=None) -> tuple[shapes.Shape, int]:
  """Move a shape into the cost band by the single-candidate changes that cost the least probability.

  The argmax of a short search can sit just outside the band while its
  distributions are still nearly flat. Each move changes one conv to its next
  narrower (or wider) candidate, or one stage to its next depth choice, picking
  the move that loses the least log-probability per MAC moved towards the band,
  and never jumps over the band if another move lands in or before it. The
  official code keeps the raw argmax (``fit_to_band=False``); both are written.
  ``cost_fn(shape)`` is the cost the band is in (default: exact MACs).
  Returns the shape and the number of moves.
  """
  cost_fn = cost_fn or (lambda sh: cost_lib.count(sh).macs)
  low, high = band
  wi, di = space.indices_of(shape)
  logw = np.log(np.maximum(width_probs, 1e-12))
  logd = np.log(np.maximum(depth_probs, 1e-12))
  macs = cost_fn(shape)
  moves = 0
  while not low <= macs <= high and moves < max_moves:
    down = macs > high
    best = None
    candidates = []
    for l in range(len(wi)):
      for j in _neighbours(space.width_table[l], space.width_mask[l], wi[l], down):
        candidates.append(("w", l, j, logw[l, wi[l]] - logw[l, j]))
    for s_ in range(len(di)):
      for j in _neighbours(space.depth_table[s_], space.depth_mask[s_], di[s_], down):
        candidates.append(("d", s_, j, logd[s_, di[s_]] - logd[s_, j]))
    neutral = None  # a move that changes nothing now but may unblock a later one (a dropped block's width)
    for kind, i, j, loss in candidates:
      w2, d2 = wi.copy(), di.copy()
      (w2 if kind == "w" else d2)[i] = j
      new = cost_fn(space.shape_from_indices(w2, d2))
      gain = (macs - new) if down else (new - macs)
      if gain == 0 and (neutral is None or loss < neutral[0][1]):
        neutral = ((False, loss), w2, d2, new)
      if gain <= 0:
        continue
      overshoot = new < low if down else new > high
      key = (overshoot, loss / gain)
      if best is None or key < best[0]:
        best = (key, w2, d2, new)
    best = best or neutral
    if best is None:
      break
    _, wi, di, macs = best
    moves += 1
  return space.shape_from_indices(wi, di), moves


def _neighbours(row, mask, current, down):
  """The next smaller (down) or larger candidate of a table row, by value."""
  values = [(int(v), j) for j, (v, ok) in enumerate(zip(row, mask)) if ok]
  cur = int(row[current])
  if down:
    smaller = [(v, j) for v, j in values if v < cur]
    return [max(smaller)[1]] if smaller else []
  larger = [(v, j) for v, j in values if v > cur]
  return [min(larger)[1]] if larger else []


def compile_step(problem: Problem, run_mesh, targets=None):
  """The jitted search step; with ``targets`` [K] it is vectorised over K stacked states."""
  repl = parallel.replicated(run_mesh)
  if targets is None:
    return jax.jit(functools.partial(search_step, problem), donate_argnums=(0,), out_shardings=(repl, repl))
  tags = [_tag(float(t) / problem.max_macs) for t in np.asarray(targets)]

  def multi(state, tb, vb, tau):
    new, m = jax.vmap(functools.partial(search_step, problem), in_axes=(0, None, None, None, 0))(
        state, tb, vb, tau, targets)
    # Scalars per target, so the loop logs them like a single search's.
    return new, {f"{k}_{tag}": v[i] for k, v in m.items() for i, tag in enumerate(tags)}

  return jax.jit(multi, donate_argnums=(0,), out_shardings=(repl, repl))


def tau_at(config, epoch: int) -> float:
  fn = schedules.tau_schedule(config.tau_schedule, tau_max=config.tau_max, tau_min=config.tau_min)
  return float(fn(epoch, config.epochs))


def arch_probabilities(problem: Problem, state) -> dict:
  model = _model(problem, state)
  return {"width": np.asarray(model.width_probs()).round(5).tolist(),
          "depth": np.asarray(model.depth_probs()).round(5).tolist()}


def argmax_shape(problem: Problem, state) -> shapes.Shape:
  model = _model(problem, state)
  return model.argmax_shape()


# Validation draws its Gumbel samples and augmentation from a key stream of its own.
VALIDATION_STREAM = 1 << 30


def _model(problem: Problem, state) -> supernet.Supernet:
  """The supernet holding a search state's variables (a copy: the state is never mutated)."""
  return nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)


def stochastic_logits_fn(problem: Problem):
  """Search validation as the official code computes it: the stochastic forward at the epoch's tau, eval mode.

  Takes ``((state, key, tau), images, batch_index)``: the images get the
  training augmentation (the official validation half is augmented) and a
  fresh Gumbel sample per batch, from ``fold_in(key, batch_index)``.
  """

  def fn(packed, images, index):
    state, key, tau = packed
    k_aug, k_sample = jax.random.split(jax.random.fold_in(key, index))
    x = _augment(problem, k_aug, images)
    logits, _, _ = supernet.apply(problem.graphdef, state["weights"], state["arch"], state["stats"], x, k_sample,
                                  tau, train=False, with_costs=False)
    return logits

  return fn


def best_genotype(path: str, target: float, multi_target: float | None = None) -> dict | None:
  """The official best genotype: highest search-validation accuracy among epochs within BEST_BAND of the target.

  Reads the per-epoch records of ``genotypes.jsonl`` (those of
  ``multi_target`` in a several-target run); None when no epoch qualifies.
  Ties go to the later epoch.
  """
  if not os.path.exists(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if multi_target is not None and rec.get("target") != multi_target:
        continue
      if abs(rec["flops_ratio"] - target) <= BEST_BAND + 1e-12 and (best is None or rec["val_acc"] >= best["val_acc"]):
        best = rec
  return best


def hard_logits_fn(problem: Problem):
  """Logits of the argmax network in eval mode, for evaluation."""

  def fn(state, images):
    x = data_lib.normalize(images, problem.mean, problem.std)
    logits, _, _ = supernet.apply(problem.graphdef, state["weights"], state["arch"], state["stats"], x, None, 1.0,
                                  train=False, hard=True, with_costs=False)
    return logits

  return fn


def _latency_tables(config, run_, num_classes):
  """Measured latency tables for ``cost=latency`` (process 0 measures; every process uses its numbers)."""
  from jax.experimental import multihost_utils
  from tas_jax import latency_table
  space = supernet.make_space(base_shape(config, num_classes), supernet_config(config))
  path = run_.path("latency_tables.json")
  if os.path.exists(path):  # a resumed search keeps the costs it started with
    return latency_table.load_tables(path)
  tables = latency_table.build_tables(space, int(config.get("latency_batch", 1)))
  if jax.process_count() > 1:  # timings differ per host; all must optimise the same costs
    flat, tree = jax.tree.flatten((tables.stem, tables.convs, tables.shortcut, tables.projection, tables.head,
                                   tables.offset, tables.scale))
    flat = [np.asarray(x) for x in multihost_utils.broadcast_one_to_all([np.asarray(f) for f in flat])]
    stem, convs, sc, proj, head, offset, scale = jax.tree.unflatten(tree, flat)
    tables = dataclasses.replace(tables, stem=stem, convs=convs, shortcut=sc, projection=proj, head=head,
                                 offset=float(offset), scale=float(scale))
  if run_.is_main:
    latency_table.save_tables(path, tables)
  return tables


def run(config, workdir: str, distributed=None) -> dict:
  """The search program: resumable; writes shape.json, shapes/, metrics.jsonl, arch_probs.jsonl, result.json.

  With several ``targets`` one vectorised step searches K supernets at once
  (each with its own weights, architecture and optimiser states, sharing the
  input batches) and writes ``shape_<target>.json`` for each.
  """
  t_start = time.time()
  base_shape(config, None)  # an unknown model is refused before any data is read
  run_ = engine.start(config, workdir, distributed)
  cost_kind = config.get("cost", "macs")
  if cost_kind not in COSTS:
    raise engine.RunError(f"cost must be one of {COSTS}, got {cost_kind!r}")
  targets = target_ratios(config)
  multi = len(targets) > 1
  dataset = engine.load_data(config)
  engine.check_batch_size(int(config.batch_size))
  train_half, valid_half = data_lib.search_split(dataset.labels("train"), int(config.get("split_seed", config.seed)))
  bs = int(config.batch_size)
  if len(train_half) < bs or len(valid_half) < bs:
    raise engine.RunError(f"batch_size {bs} exceeds a half of the training set ({len(train_half)} examples)")
  t_batches = data_lib.Batches(len(train_half), bs, seed=int(config.seed))
  sampling_kind = config.get("valid_sampling", "replacement")
  if sampling_kind not in VALID_SAMPLING:
    raise engine.RunError(f"valid_sampling must be one of {VALID_SAMPLING}, got {sampling_kind!r}")
  v_batches = data_lib.Batches(len(valid_half), bs, seed=int(config.seed) + 1,
                               replacement=sampling_kind == "replacement")
  spe = t_batches.steps_per_epoch
  total = spe * int(config.epochs)
  tables = _latency_tables(config, run_, dataset.num_classes) if cost_kind == "latency" else None
  problem, state = build(config, dataset.num_classes, spe, dataset.mean, dataset.std, bool(dataset.streaming),
                         tables)
  if cost_kind == "latency" and float(config.get("target_latency_ms", 0) or 0) > 0:
    targets = [float(config.target_latency_ms) / 1e3 / problem.max_macs]
    check_target(problem.space, targets[0], True, tables)
  target_costs = jnp.asarray([t * problem.max_macs for t in targets], jnp.float32)
  if multi:
    state = jax.tree.map(lambda x: jnp.stack([x] * len(targets)), state)
  state = engine.replicate(run_, state)
  fp = engine.fingerprint(config, FINGERPRINT_KEYS + ("cost", "targets", "latency_batch", "target_latency_ms"))
  ckpt = engine.open_checkpoints(run_, fp)
  state, meta, start = engine.restore(run_, ckpt, state)
  # Epochs the run is about to repeat would otherwise be logged twice.
  for name in ("arch_probs.jsonl", "genotypes.jsonl"):
    engine.keep_records(run_, name, lambda r: (int(r.get("epoch", -1)) + 1) * spe <= start)
  if start:
    log.info("resuming at step %d of %d", start, total)
  step_fn = compile_step(problem, run_.mesh, targets=target_costs if multi else None)
  os.makedirs(run_.path("shapes"), exist_ok=True)
  eval_idx = valid_half[: int(config.get("eval_examples") or len(valid_half))]
  eval_fn = engine.Evaluator(run_, dataset, "train", eval_idx, bs, hard_logits_fn(problem))
  search_eval_fn = engine.Evaluator(run_, dataset, "train", eval_idx, bs, stochastic_logits_fn(problem),
                                    with_index=True)
  tags = [_tag(t) for t in targets]
  per_target = (lambda st, i: jax.tree.map(lambda x: x[i], st)) if multi else (lambda st, i: st)

  def batches(step):
    return (engine.device_batch(run_, dataset, "train", train_half[t_batches.indices(step)], step),
            engine.device_batch(run_, dataset, "train", valid_half[v_batches.indices(step)], step))

  prefetch = data_lib.Prefetcher(batches, start, end_step=total)
  taus = {}

  def one_step(state, step):
    epoch = step // spe
    if epoch not in taus:
      taus.clear()
      taus[epoch] = jnp.float32(tau_at(config, epoch))
    tb, vb = next(prefetch)
    return step_fn(state, tb, vb, taus[epoch])

  def on_epoch(state, epoch, averaged):
    tau = tau_at(config, epoch)
    out = {"tau": tau}
    for i, tag in enumerate(tags):
      st = per_target(state, i)
      shape = argmax_shape(problem, st)
      suffix = f"_{tag}" if multi else ""
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(problem.seed), VALIDATION_STREAM), epoch)
      val_acc, _ = search_eval_fn((st, key, jnp.float32(tau)))
      argmax_acc, _ = eval_fn(st)
      ratio = float(_costs(problem, _model(problem, st))[1]) / problem.max_macs
      out.update({f"val_acc{suffix}": val_acc, f"val_acc_argmax{suffix}": argmax_acc,
                  f"flops_ratio_exact{suffix}": _cost_of(problem, shape) / problem.max_macs,
                  f"macs{suffix}": cost_lib.count(shape).macs})
      if run_.is_main:
        shapes.save(shape, run_.path("shapes", f"epoch_{epoch:03d}{suffix}.json"))
        target = {"target": targets[i]} if multi else {}
        with open(run_.path("arch_probs.jsonl"), "a") as f:
          f.write(json.dumps({"epoch": epoch, **target, **arch_probabilities(problem, st)}) + "\n")
        with open(run_.path("genotypes.jsonl"), "a") as f:
          f.write(json.dumps({"epoch": epoch, **target, "val_acc": val_acc, "flops_ratio": ratio,
                              "shape": f"shapes/epoch_{epoch:03d}{suffix}.json"}) + "\n")
    return out

  def save(state, step):
    ckpt.save(step, state, meta={"epoch": step // spe, "step": step}, force=True)

  loop = engine.make_loop(run_, config, total_steps=total, steps_per_epoch=spe, save=save, on_epoch=on_epoch)
  state = engine.drive(run_, loop, state, start, one_step, prefetch, ckpt)
  if state is None:
    return {"finished": False, "step": min(total, start + loop.stop_after)}
  results = []
  for i, (ratio, tag) in enumerate(zip(targets, tags)):
    st = per_target(state, i)
    target_cost = ratio * problem.max_macs
    argmax = argmax_shape(problem, st)
    band = cost_lib.cost_band(target_cost, problem.max_macs, problem.band, problem.tolerance)
    shape, moves = argmax, 0
    if config.get("fit_to_band", True):
      model = nnx.merge(problem.graphdef, st["weights"], st["arch"], st["stats"], copy=True)
      shape, moves = fit_to_band(problem.space, np.asarray(model.width_probs()), np.asarray(model.depth_probs()),
                                 argmax, band, cost_fn=lambda sh: _cost_of(problem, sh))
    c = cost_lib.count(shape)
    full = cost_lib.count(problem.space.base).macs
    value = _cost_of(problem, shape)
    r = {"target": ratio, "cost": cost_kind, "macs": c.macs, "params": c.params, "flops_ratio": c.macs / full,
         "cost_ratio": value / problem.max_macs, "argmax_cost_ratio": _cost_of(problem, argmax) / problem.max_macs,
         "fit_moves": moves, "band_ratio": [b / problem.max_macs for b in band], "in_band": band[0] <= value <= band[1]}
    if tables is not None:
      from tas_jax import latency as latency_lib
      measured = latency_lib.measure_latency(shape, tables.batch_size, runs=50)["median_ms"]
      r.update({"predicted_latency_ms": value * 1e3, "measured_latency_ms": measured,
                "latency_error": (value * 1e3 - measured) / measured,
                "unpruned_predicted_latency_ms": problem.max_macs * 1e3})
    name = f"shape_{tag}.json" if multi else "shape.json"
    best = best_genotype(run_.path("genotypes.jsonl"), ratio, targets[i] if multi else None)
    if run_.is_main:
      shapes.save(shape, run_.path(name))
      shapes.save(argmax, run_.path(name.replace("shape", "shape_argmax")))
      if best is not None:
        shapes.save(shapes.load(run_.path(best["shape"])), run_.path(name.replace("shape", "shape_best")))
    r["shape_file"] = name
    if best is not None:
      r.update({"best_file": name.replace("shape", "shape_best"), "best_epoch": best["epoch"],
                "best_val_acc": best["val_acc"], "best_flops_ratio": best["flops_ratio"]})
    results.append(r)
  result = {"finished": True, "epochs": int(config.epochs), "steps": total, "model": config.model,
            "dataset": dataset.name, "wall_s": time.time() - t_start, "cost": cost_kind}
  if multi:
    result["targets"] = results
  else:
    result.update(results[0])
    result["target_flops_ratio"] = targets[0]
  if run_.is_main:
    engine.write_json(run_.path("result.json"), result)
  run_.writer.close()
  ckpt.close()
  return result


def _tag(ratio: float) -> str:
  return f"{ratio:g}"


def _cost_of(problem: Problem, shape: shapes.Shape) -> float:
  """The search's cost of a shape: exact MACs, or predicted latency in seconds."""
  if problem.tables is None:
    return float(cost_lib.count(shape).macs)
  return _latency_of(problem.space, problem.tables, shape)
