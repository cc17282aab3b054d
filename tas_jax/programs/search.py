"""The search program (METHOD.md §4): the bilevel loop around the jitted search step, and its outputs.

The step itself (:mod:`tas_jax.steps.search`) is traced once; this program
feeds it the two halves of the training set, evaluates the supernet every
epoch, and writes the shapes, probabilities and results a search leaves
behind (see :func:`run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tas_jax import data as data_lib
from tas_jax import programs
from tas_jax.core import cost as cost_lib
from tas_jax.core import shape_files
from tas_jax.latency import measure as latency_lib
from tas_jax.latency import table as latency_table
from tas_jax.nets import supernet
from tas_jax.runtime import evaluate as evaluate_lib
from tas_jax.runtime import files, models, runs
from tas_jax.runtime import loop as loop_lib
from tas_jax.runtime import settings
from tas_jax.runtime.settings import SearchSettings
from tas_jax.steps import search as search_lib
from tas_jax.core import derive

log = logging.getLogger("tas_jax")


def _latency_tables(cfg: SearchSettings, run_, model):
  """Measured latency tables for ``cost=latency`` (process 0 measures; every process uses its numbers)."""
  path = run_.path("latency_tables.json")
  if os.path.exists(path):  # a resumed search keeps the costs it started with
    return latency_table.load_tables(path)
  tables = latency_table.build_tables(model, cfg.latency_batch)
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


@dataclasses.dataclass
class _Search:
  """What one search sets up before its first step."""

  cfg: SearchSettings
  run: runs.Run
  dataset: Any
  problem: search_lib.Problem
  targets: list
  train_half: np.ndarray
  valid_half: np.ndarray
  t_batches: Any
  v_batches: Any
  ckpt: Any
  start: int
  meta: dict
  step_fn: Any = None

  @property
  def multi(self) -> bool:
    return len(self.targets) > 1

  @property
  def spe(self) -> int:
    return self.t_batches.steps_per_epoch

  @property
  def total(self) -> int:
    return self.spe * self.cfg.epochs

  def of_target(self, state, i: int):
    """The state of the i-th target (the whole state with a single target)."""
    return jax.tree.map(lambda x: x[i], state) if self.multi else state

  def suffix(self, i: int) -> str:
    return f"_{settings.target_tag(self.targets[i])}" if self.multi else ""


def _set_up(cfg: SearchSettings, run_: runs.Run):
  """Data halves, the problem and the state to start from (restored when resuming)."""
  dataset = runs.load_data(cfg.data)
  bs = cfg.batch_size
  runs.check_batch_size(bs)
  train_half, valid_half = data_lib.search_split(dataset.labels("train"), cfg.split_seed)
  if len(train_half) < bs or len(valid_half) < bs:
    raise runs.RunError(f"batch_size {bs} exceeds a half of the training set ({len(train_half)} examples)")
  t_batches = data_lib.Batches(len(train_half), bs, seed=cfg.seed)
  v_batches = data_lib.Batches(len(valid_half), bs, seed=cfg.seed + 1, replacement=cfg.valid_sampling == "replacement")
  targets, tables = cfg.target_ratios(), None
  if cfg.cost == "latency":
    model = supernet.build(search_lib.base_shape(cfg.model, dataset.num_classes, dataset.image_size),
                           search_lib.supernet_config(cfg), abstract=True)
    tables = _latency_tables(cfg, run_, model)
    if cfg.target_latency_ms > 0:
      targets = [cfg.target_latency_ms / 1e3 / search_lib.CostModel(model, tables).unpruned()]
  problem, state = search_lib.build(cfg, dataset.num_classes, t_batches.steps_per_epoch, dataset.mean, dataset.std,
                                    bool(dataset.streaming), tables, targets, dataset.image_size)
  if len(targets) > 1:
    state = jax.tree.map(lambda x: jnp.stack([x] * len(targets)), state)
  state = runs.replicate(run_, state)
  ckpt = runs.open_checkpoints(run_, cfg.fingerprint(search_lib.FINGERPRINT_KEYS))
  state, meta, start = runs.restore(run_, ckpt, state)
  s = _Search(cfg, run_, dataset, problem, targets, train_half, valid_half, t_batches, v_batches, ckpt, start, meta)
  # Epochs the run is about to repeat would otherwise be logged twice.
  for name in ("arch_probs.jsonl", "genotypes.jsonl"):
    runs.keep_records(run_, name, lambda r: (int(r.get("epoch", -1)) + 1) * s.spe <= start)
  if start:
    log.info("resuming at step %d of %d", start, s.total)
  target_costs = jnp.asarray([t * problem.max_cost for t in targets], jnp.float32)
  s.step_fn = search_lib.compile_step(problem, run_.mesh, targets=target_costs if s.multi else None)
  os.makedirs(run_.path("shapes"), exist_ok=True)
  return s, state


def _search(s: _Search, state):
  """The step loop; the final state, or None when ``stop_after_steps`` stopped it (with the step reached)."""
  cfg, run_, problem, bs = s.cfg, s.run, s.problem, s.cfg.batch_size
  eval_idx = s.valid_half[: cfg.eval_examples or len(s.valid_half)]
  eval_fn = evaluate_lib.Evaluator(run_, s.dataset, "train", eval_idx, bs, search_lib.hard_logits_fn(problem))
  search_eval_fn = evaluate_lib.Evaluator(run_, s.dataset, "train", eval_idx, bs,
                                          search_lib.stochastic_logits_fn(problem), with_index=True)

  def batches(step):
    return (runs.device_batch(run_, s.dataset, "train", s.train_half[s.t_batches.indices(step)], step),
            runs.device_batch(run_, s.dataset, "train", s.valid_half[s.v_batches.indices(step)], step))

  prefetch = data_lib.Prefetcher(batches, s.start, end_step=s.total)
  taus = {}

  def one_step(state, step):
    epoch = step // s.spe
    if epoch not in taus:
      taus.clear()
      taus[epoch] = jnp.float32(search_lib.tau_at(cfg, epoch))
    tb, vb = next(prefetch)
    return s.step_fn(state, tb, vb, taus[epoch])

  def on_epoch(state, epoch, averaged):
    tau = search_lib.tau_at(cfg, epoch)
    out = {"tau": tau}
    for i in range(len(s.targets)):
      out.update(_epoch_record(s, s.of_target(state, i), i, epoch, tau, eval_fn, search_eval_fn))
    return out

  def save(state, step, carry):
    s.ckpt.save(step, state, meta=runs.checkpoint_meta({"epoch": step // s.spe, "step": step}, carry), force=True)

  loop = loop_lib.make_loop(run_, programs.cadence(cfg), total_steps=s.total, steps_per_epoch=s.spe, save=save,
                            on_epoch=on_epoch, resumed=runs.resumed_carry(s.meta), headline=HEADLINE,
                            epoch_line=lambda epoch, record: epoch_line(s, epoch, record))
  state = loop_lib.drive(run_, loop, state, s.start, one_step, prefetch, s.ckpt)
  return state, min(s.total, s.start + loop.stop_after)


# What the progress line shows of a search step's metrics.
HEADLINE = ("flops_ratio", "expected_flops_ratio", "weight_loss", "train_acc", "tau")


def epoch_line(s: _Search, epoch: int, r: dict) -> str:
  """One epoch of a search in a line: tau, learning rate, per target the argmax and expected cost ratios against
  the band and the search-validation accuracies, and the training loss."""
  problem, kind = s.problem, "MACs" if s.problem.costs.kind == "macs" else "latency"
  parts = [f"epoch {epoch + 1}/{s.cfg.epochs}", f"tau {r.get('tau', float('nan')):.3f}",
           f"lr {r.get('epoch_lr', float('nan')):.4g}"]
  for i, target in enumerate(s.targets):
    sfx = s.suffix(i)
    lo, hi = (b / problem.max_cost for b in cost_lib.cost_band(target * problem.max_cost, problem.max_cost,
                                                                problem.band, problem.tolerance))
    expected = r.get("epoch_expected_flops_ratio")
    parts.append(f"{f'target {settings.target_tag(target)}: ' if s.multi else ''}argmax {kind} ratio "
                 f"{r[f'flops_ratio_exact{sfx}']:.3f} ({int(r[f'macs{sfx}']):,} MACs)"
                 f"{f', expected {expected:.3f}' if expected is not None and not s.multi else ''}, band "
                 f"[{lo:.3f}, {hi:.3f}], val acc {r[f'val_acc{sfx}']:.4f} (argmax net {r[f'val_acc_argmax{sfx}']:.4f})")
  if "epoch_weight_loss" in r:
    parts.append(f"train loss {r['epoch_weight_loss']:.4f}, acc {r.get('epoch_train_acc', float('nan')):.4f}")
  return "; ".join(parts)


def _epoch_record(s: _Search, st, i: int, epoch: int, tau: float, eval_fn, search_eval_fn) -> dict:
  """One target's epoch: validation accuracies and cost logged; its argmax shape and probabilities written."""
  problem, run_, suffix = s.problem, s.run, s.suffix(i)
  shape = search_lib.argmax_shape(problem, st)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(problem.seed), search_lib.VALIDATION_STREAM), epoch)
  val_acc, _ = search_eval_fn((st, key, jnp.float32(tau)))
  argmax_acc, _ = eval_fn(st)
  ratio = float(problem.costs.of_model(search_lib.model_of(problem, st))[1]) / problem.max_cost
  if run_.is_main:
    shape_files.save(shape, run_.path("shapes", f"epoch_{epoch:03d}{suffix}.json"))
    target = {"target": s.targets[i]} if s.multi else {}
    with open(run_.path("arch_probs.jsonl"), "a") as f:
      f.write(json.dumps({"epoch": epoch, **target, **search_lib.arch_probabilities(problem, st)}) + "\n")
    with open(run_.path("genotypes.jsonl"), "a") as f:
      f.write(json.dumps({"epoch": epoch, **target, "val_acc": val_acc, "flops_ratio": ratio,
                          "shape": f"shapes/epoch_{epoch:03d}{suffix}.json"}) + "\n")
  return {f"val_acc{suffix}": val_acc, f"val_acc_argmax{suffix}": argmax_acc,
          f"flops_ratio_exact{suffix}": problem.costs.of(shape) / problem.max_cost,
          f"macs{suffix}": cost_lib.count(shape).macs}


def _target_result(s: _Search, st, i: int) -> dict:
  """One target's outcome: the argmax shape fitted into its band, its costs, and the files written for it."""
  cfg, problem, run_, ratio = s.cfg, s.problem, s.run, s.targets[i]
  argmax = search_lib.argmax_shape(problem, st)
  band = cost_lib.cost_band(ratio * problem.max_cost, problem.max_cost, problem.band, problem.tolerance)
  shape, moves = argmax, 0
  if cfg.fit_to_band:
    model = nnx.merge(problem.graphdef, st["weights"], st["arch"], st["stats"], copy=True)
    shape, moves = derive.fit_to_band(problem.space, np.asarray(model.width_probs()),
                                          np.asarray(model.depth_probs()), argmax, band,
                                          cost_fn=problem.costs.of)
  c, full = cost_lib.count(shape), cost_lib.count(problem.space.base).macs
  value = problem.costs.of(shape)
  r = {"target": ratio, "cost": problem.costs.kind, "macs": c.macs, "params": c.params, "flops_ratio": c.macs / full,
       "cost_ratio": value / problem.max_cost,
       "argmax_cost_ratio": problem.costs.of(argmax) / problem.max_cost, "fit_moves": moves,
       "band_ratio": [b / problem.max_cost for b in band], "in_band": band[0] <= value <= band[1]}
  if problem.costs.kind == "latency":
    measured = latency_lib.measure_latency(shape, problem.costs.tables.batch_size, runs=50)["median_ms"]
    r.update({"predicted_latency_ms": value * 1e3, "measured_latency_ms": measured,
              "latency_error": (value * 1e3 - measured) / measured,
              "unpruned_predicted_latency_ms": problem.max_cost * 1e3})
  name = f"shape{s.suffix(i)}.json"
  best = search_lib.best_genotype(run_.path("genotypes.jsonl"), ratio, ratio if s.multi else None)
  _, net = search_lib.export_at(problem, st, shape)
  # Replicated over the run's devices: Orbax writes global arrays, also when several processes share the run.
  variables = runs.replicate(run_, {"params": nnx.state(net, nnx.Param), "stats": nnx.state(net, nnx.BatchStat)})
  models.save_model(run_.path(f"{models.MODEL_DIR}{s.suffix(i)}"), shape, variables["params"], variables["stats"],
                    run_.is_main, runs.inference_record(s.dataset))
  if run_.is_main:
    shape_files.save(shape, run_.path(name))
    shape_files.save(argmax, run_.path(name.replace("shape", "shape_argmax")))
    if best is not None:
      shape_files.save(shape_files.load(run_.path(best["shape"])), run_.path(name.replace("shape", "shape_best")))
  r["shape_file"] = name
  if best is not None:
    r.update({"best_file": name.replace("shape", "shape_best"), "best_epoch": best["epoch"],
              "best_val_acc": best["val_acc"], "best_flops_ratio": best["flops_ratio"]})
  return r


def run(config, workdir: str, distributed=None, *, command: str = "") -> dict:
  """The search program: resumable; writes shape.json, shapes/, metrics.jsonl, arch_probs.jsonl, result.json.

  ``config`` is a search ConfigDict (``tas_jax/configs/search.py``) or
  :class:`SearchSettings`; it is resolved and checked before anything is
  read or written. With several ``targets`` one vectorised step searches K
  supernets at once (each with its own weights, architecture and optimiser
  states, sharing the input batches) and writes ``shape_<target>.json`` for
  each. ``command`` is what a stopped run tells the user to rerun.
  """
  t_start = time.time()
  cfg = SearchSettings.resolve(config)
  search_lib.base_shape(cfg.model, None)  # an unknown model, named before anything is read or written
  with runs.opened(workdir, cfg, distributed, command) as run_:
    return _run(cfg, run_, t_start)


def _run(cfg: SearchSettings, run_: runs.Run, t_start: float) -> dict:
  done = runs.finished_result(run_, search_lib.FINGERPRINT_KEYS)
  if done is not None:
    return done
  s, state = _set_up(cfg, run_)
  state, step = _search(s, state)
  if state is None:
    return {"finished": False, "step": step}
  results = [_target_result(s, s.of_target(state, i), i) for i in range(len(s.targets))]
  result = {"finished": True, "epochs": cfg.epochs, "steps": s.total, "model": cfg.model, "dataset": s.dataset.name,
            "data": runs.data_fingerprint(s.dataset), "wall_s": time.time() - t_start, "cost": cfg.cost}
  if s.multi:
    result["targets"] = results
  else:
    result.update(results[0])
    result["target_flops_ratio"] = s.targets[0]
  if s.run.is_main:
    files.write_json(s.run.path("result.json"), result)
  s.ckpt.close()
  return result
