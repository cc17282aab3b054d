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
                    "block_relu", "shortcut_bn", "width_multiple", "bn_groups", "seed", "dtype")


def cross_entropy(logits, labels):
  return -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], axis=1).mean()


def accuracy(logits, labels):
  return (jnp.argmax(logits, -1) == labels).mean()


def supernet_config(config) -> supernet.SupernetConfig:
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(config.get("dtype", "float32"), "bad")
  if dtype == "bad":
    raise engine.RunError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
  return supernet.SupernetConfig(mode=config.mode, num_sampled=config.num_sampled,
                                 width_multiple=config.width_multiple, block_relu=config.block_relu,
                                 shortcut_bn=config.shortcut_bn, exact_cost=config.exact_cost,
                                 bn_groups=config.bn_groups, dtype=dtype)


def base_shape(config, num_classes: int) -> shapes.Shape:
  try:
    base = shapes.resolve(config.model, num_classes)
  except shapes.ShapeError as e:
    raise engine.RunError(str(e)) from None
  return shapes.full_shape(base)


def check_target(space: shapes.SearchSpace, ratio: float, exact: bool) -> tuple[float, float]:
  """Refuse a target ratio outside (0, 1) or below what the space can reach; returns (min, max) ratios."""
  full = cost_lib.count(space.base).macs
  wi = np.zeros(space.width_table.shape[0], np.int32)
  di = np.zeros(space.depth_table.shape[0], np.int32)
  smallest = cost_lib.as_int(cost_lib.discrete_cost(space, wi, di, exact)) / full
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
  max_macs: float
  target_macs: float
  band: str
  tolerance: float
  cost_weight: float
  mean: tuple
  std: tuple
  streaming: bool
  seed: int
  arch_bn: bool


def build(config, num_classes: int, steps_per_epoch: int, mean=(0.5,) * 3, std=(0.25,) * 3, streaming=False):
  """The search problem and its initial state ``{weights, arch, stats, w_opt, a_opt, step}``."""
  base = base_shape(config, num_classes)
  model = supernet.build(base, supernet_config(config), seed=int(config.seed))
  check_target(model.space, float(config.target_flops_ratio), bool(config.exact_cost))
  graphdef, weights, arch, stats = supernet.split(model)
  lr_fn = schedules.lr_schedule(config.get("lr_schedule", "cosine"), config.lr, config.epochs, steps_per_epoch,
                                warmup_epochs=config.warmup_epochs)
  w_tx = optim.weight_optimizer(lr_fn, momentum=config.momentum, nesterov=config.nesterov,
                                weight_decay=config.weight_decay)
  a_tx = optim.arch_optimizer(config.arch_lr, b1=config.arch_b1, b2=config.arch_b2,
                              weight_decay=config.arch_weight_decay)
  max_macs = float(cost_lib.count(base).macs)
  problem = Problem(graphdef, model.space, w_tx, a_tx, lr_fn, max_macs, float(config.target_flops_ratio) * max_macs,
                    config.cost_band, float(config.cost_tolerance), float(config.cost_weight), tuple(mean), tuple(std),
                    streaming, int(config.seed), bool(config.get("arch_step_updates_bn", True)))
  state = {"weights": weights, "arch": arch, "stats": stats, "w_opt": w_tx.init(weights), "a_opt": a_tx.init(arch),
           "step": jnp.zeros((), jnp.int32)}
  return problem, state


def _augment(problem: Problem, key, images):
  if problem.streaming:
    return data_lib.flip_and_normalize(key, images, problem.mean, problem.std)
  return data_lib.augment_cifar(key, images, problem.mean, problem.std)


def search_step(problem: Problem, state, train_batch, valid_batch, tau):
  """One TAS iteration: a weight step on ``train_batch``, then an architecture step on ``valid_batch``.

  Pure; returns ``(new_state, metrics)``. ``tau`` is a traced scalar.
  """
  g = problem.graphdef
  key = jax.random.fold_in(jax.random.key(problem.seed), state["step"])
  k_aug_t, k_aug_v, k_w, k_a = jax.random.split(key, 4)
  xt = _augment(problem, k_aug_t, train_batch["images"])
  xv = _augment(problem, k_aug_v, valid_batch["images"])
  arch, stats = state["arch"], state["stats"]

  def weight_loss(weights):
    logits, _, new_stats = supernet.apply(g, weights, arch, stats, xt, k_w, tau, train=True)
    return cross_entropy(logits, train_batch["labels"]), (new_stats, logits)

  (w_loss, (stats_w, logits_t)), grads = jax.value_and_grad(weight_loss, has_aux=True)(state["weights"])
  updates, w_opt = problem.w_tx.update(grads, state["w_opt"], state["weights"])
  weights = optax.apply_updates(state["weights"], updates)

  def arch_loss(arch):
    logits, costs, new_stats = supernet.apply(g, weights, arch, stats_w, xv, k_a, tau, train=True)
    ce = cross_entropy(logits, valid_batch["labels"])
    c_loss = cost_lib.cost_loss(costs["expected"], cost_lib.as_float(costs["discrete"]), problem.target_macs,
                                problem.max_macs, band=problem.band, tolerance=problem.tolerance,
                                weight=problem.cost_weight)
    return ce + c_loss, (new_stats, ce, c_loss, costs["expected"], logits)

  (a_loss, (stats_a, a_ce, c_loss, expected, logits_v)), a_grads = jax.value_and_grad(arch_loss, has_aux=True)(arch)
  a_updates, a_opt = problem.a_tx.update(a_grads, state["a_opt"], arch)
  arch = optax.apply_updates(arch, a_updates)
  new_stats = stats_a if problem.arch_bn else stats_w
  model = nnx.merge(g, weights, arch, new_stats, copy=True)
  discrete = cost_lib.as_float(model.costs()["discrete"])
  new_state = {"weights": weights, "arch": arch, "stats": new_stats, "w_opt": w_opt, "a_opt": a_opt,
               "step": state["step"] + 1}
  metrics = {"weight_loss": w_loss, "arch_loss": a_loss, "arch_ce": a_ce, "cost_loss": c_loss,
             "train_acc": accuracy(logits_t, train_batch["labels"]),
             "valid_batch_acc": accuracy(logits_v, valid_batch["labels"]),
             "expected_flops_ratio": expected / problem.max_macs, "flops_ratio": discrete / problem.max_macs,
             "lr": problem.lr_fn(state["step"]), "tau": jnp.asarray(tau, jnp.float32)}
  return new_state, metrics


def fit_to_band(space: shapes.SearchSpace, width_probs, depth_probs, shape: shapes.Shape, band,
                max_moves: int = 10_000) -> tuple[shapes.Shape, int]:
  """Move a shape into the cost band by the single-candidate changes that cost the least probability.

  The argmax of a short search can sit just outside the band while its
  distributions are still nearly flat. Each move changes one conv to its next
  narrower (or wider) candidate, or one stage to its next depth choice, picking
  the move that loses the least log-probability per MAC moved towards the band,
  and never jumps over the band if another move lands in or before it. The
  official code keeps the raw argmax (``fit_to_band=False``); both are written.
  Returns the shape and the number of moves.
  """
  low, high = band
  wi, di = space.indices_of(shape)
  logw = np.log(np.maximum(width_probs, 1e-12))
  logd = np.log(np.maximum(depth_probs, 1e-12))
  macs = cost_lib.count(shape).macs
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
    for kind, i, j, loss in candidates:
      w2, d2 = wi.copy(), di.copy()
      (w2 if kind == "w" else d2)[i] = j
      new = cost_lib.count(space.shape_from_indices(w2, d2)).macs
      gain = (macs - new) if down else (new - macs)
      if gain <= 0:
        continue
      overshoot = new < low if down else new > high
      key = (overshoot, loss / gain)
      if best is None or key < best[0]:
        best = (key, w2, d2, new)
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


def compile_step(problem: Problem, run_mesh):
  repl = parallel.replicated(run_mesh)
  return jax.jit(functools.partial(search_step, problem), donate_argnums=(0,), out_shardings=(repl, repl))


def tau_at(config, epoch: int) -> float:
  fn = schedules.tau_schedule(config.tau_schedule, tau_max=config.tau_max, tau_min=config.tau_min)
  return float(fn(epoch, config.epochs))


def arch_probabilities(problem: Problem, state) -> dict:
  model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
  return {"width": np.asarray(model.width_probs()).round(5).tolist(),
          "depth": np.asarray(model.depth_probs()).round(5).tolist()}


def argmax_shape(problem: Problem, state) -> shapes.Shape:
  model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
  return model.argmax_shape()


def hard_logits_fn(problem: Problem):
  """Logits of the argmax network in eval mode, for evaluation."""

  def fn(state, images):
    x = data_lib.normalize(images, problem.mean, problem.std)
    logits, _, _ = supernet.apply(problem.graphdef, state["weights"], state["arch"], state["stats"], x, None, 1.0,
                                  train=False, hard=True)
    return logits

  return fn


def run(config, workdir: str, distributed=None) -> dict:
  """The search program: resumable, writes shape.json, shapes/, metrics.jsonl, arch_probs.jsonl, result.json."""
  t_start = time.time()
  run_ = engine.start(config, workdir, distributed)
  dataset = engine.load_data(config)
  engine.check_batch_size(int(config.batch_size))
  train_half, valid_half = data_lib.search_split(dataset.labels("train"), int(config.get("split_seed", config.seed)))
  bs = int(config.batch_size)
  if len(train_half) < bs or len(valid_half) < bs:
    raise engine.RunError(f"batch_size {bs} exceeds a half of the training set ({len(train_half)} examples)")
  t_batches = data_lib.Batches(len(train_half), bs, seed=int(config.seed))
  v_batches = data_lib.Batches(len(valid_half), bs, seed=int(config.seed) + 1)
  spe = t_batches.steps_per_epoch
  total = spe * int(config.epochs)
  problem, state = build(config, dataset.num_classes, spe, dataset.mean, dataset.std, bool(dataset.streaming))
  state = engine.replicate(run_, state)
  fp = engine.fingerprint(config, FINGERPRINT_KEYS)
  ckpt = engine.open_checkpoints(run_, fp)
  state, meta, start = engine.restore(run_, ckpt, state)
  if start:
    log.info("resuming at step %d of %d", start, total)
  step_fn = compile_step(problem, run_.mesh)
  os.makedirs(run_.path("shapes"), exist_ok=True)
  eval_idx = valid_half[: int(config.get("eval_examples") or len(valid_half))]
  eval_fn = engine.Evaluator(run_, dataset, "train", eval_idx, bs, hard_logits_fn(problem))

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

  def describe(step):
    return {"epoch": step // spe}

  def on_epoch(state, epoch, averaged):
    shape = argmax_shape(problem, state)
    macs = cost_lib.count(shape).macs
    top1, _ = eval_fn(state)
    if run_.is_main:
      shapes.save(shape, run_.path("shapes", f"epoch_{epoch:03d}.json"))
      with open(run_.path("arch_probs.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": epoch, **arch_probabilities(problem, state)}) + "\n")
    return {"val_acc": top1, "flops_ratio_exact": macs / problem.max_macs, "macs": macs,
            "tau": tau_at(config, epoch)}

  def save(state, step):
    ckpt.save(step, state, meta={"epoch": step // spe, "step": step}, force=True)

  loop = engine.Loop(run_, total_steps=total, steps_per_epoch=spe, log_every=int(config.log_every_steps),
                     checkpoint_every=int(config.checkpoint_every_steps), save=save, on_epoch=on_epoch,
                     describe=describe, resume_hint="Rerun the same command to resume.",
                     stop_after=int(config.get("stop_after_steps", 0) or 0))
  try:
    state = loop(state, start, one_step)
  finally:
    prefetch.close()
    ckpt.wait()
  if not loop.finished:
    run_.writer.close()
    ckpt.close()
    return {"finished": False, "step": start + loop.stop_after}
  argmax = argmax_shape(problem, state)
  band = cost_lib.cost_band(problem.target_macs, problem.max_macs, problem.band, problem.tolerance)
  shape, moves = argmax, 0
  if config.get("fit_to_band", True):
    model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
    shape, moves = fit_to_band(problem.space, np.asarray(model.width_probs()), np.asarray(model.depth_probs()),
                               argmax, band)
  c = cost_lib.count(shape)
  result = {"finished": True, "macs": c.macs, "params": c.params, "flops_ratio": c.macs / problem.max_macs,
            "argmax_flops_ratio": cost_lib.count(argmax).macs / problem.max_macs, "fit_moves": moves,
            "target_flops_ratio": float(config.target_flops_ratio), "epochs": int(config.epochs),
            "steps": total, "model": config.model, "dataset": dataset.name,
            "band": list(band),
            "wall_s": time.time() - t_start}
  result["band_ratio"] = [b / problem.max_macs for b in result["band"]]
  result["in_band"] = result["band"][0] <= c.macs <= result["band"][1]
  if run_.is_main:
    shapes.save(shape, run_.path("shape.json"))
    shapes.save(argmax, run_.path("shape_argmax.json"))
    engine.write_json(run_.path("result.json"), result)
  run_.writer.close()
  ckpt.close()
  return result
