"""Training of concrete networks: TAS's teacher and student (steps 1 and 3) and the Rethinking baselines.

``config.mode`` chooses what is trained and from where:

* ``base``: the unpruned network of ``config.model`` from random init, the
  KD teacher (METHOD.md §6.2) and the "unpruned" row of every table.
* ``scratch``: ``config.shape`` from random init, with the cross-entropy loss
  (TAS's "NMT"; Rethinking's Scratch-E or, with ``budget="flops"``, Scratch-B).
* ``kd``: ``config.shape`` from random init, distilled from the trained
  network of the base run ``config.teacher`` (TAS's "KDT", METHOD.md §6.3).
* ``finetune``: ``config.shape`` with weights inherited from the run
  directory ``config.init_from``: a training run (first filters of every conv,
  see :func:`surgery.inherit`) or a search run (the supernet's export), trained with
  the fine-tuning schedule (``finetune_*`` keys; Rethinking: 40 epochs at a
  constant lr of 0.001, METHOD.md §7.2).

Budgets (METHOD.md §7.2): ``budget="epochs"`` trains ``epochs`` epochs
whatever the shape (Scratch-E); ``budget="flops"`` trains
``int(epochs * MACs(unpruned) / MACs(shape))`` epochs, as Rethinking's CIFAR
``main_B.py`` does, with the cosine spread over the new length and multistep
milestones scaled by the same factor (Scratch-B); with
``scratch_b_rule="imagenet"`` it follows Rethinking's ImageNet ``main_B.py``
instead (:func:`train_lib.scratch_b_imagenet`: at most twice the epochs, lr steps every
third). Base and finetune runs ignore the budget. MACs are this project's
conv + linear multiply-accumulates (:mod:`tas_jax.core.cost`), not Rethinking's
all-op FLOPs, so the ratio can differ slightly from theirs.

Learning rate: :func:`tas_jax.core.schedules.lr_schedule` evaluated per step
(``lr_per_epoch=False``, the default): the warmup ramps every step as in the
official code, and the cosine anneals every step too, where the official code
holds each epoch's value for the whole epoch. Over 300 epochs the two differ by
less than 1 % of the base lr at any step; over a short run the per-epoch
staircase degenerates (a 1-epoch run would never anneal). Multistep and
constant schedules are the same either way. ``lr_per_epoch=True`` gives the
official staircase, and ``official_tail=True`` adds the official code's
``warmup_epochs`` extra epochs at lr 0 after the cosine (METHOD.md §4.1, 6.3);
both together reproduce the official schedule exactly.

Warmup: a run uses ``min(warmup_epochs, epochs // 10)`` warmup epochs, so
the recipes' 5 warmup epochs of a 300-epoch run stay 5 while a short run (say
1 or 10 epochs) is not spent mostly ramping up.

One training step is one jitted pure function of ``{params, stats, opt,
step}``, compiled once ahead of the loop; augmentation runs on the device
with keys from ``fold_in(seed, step)``, so a resumed run repeats an
uninterrupted one exactly. The test split is evaluated at the end (and every
``eval_every_epochs`` epochs for monitoring); the headline is the final
epoch's accuracy. With ``val_examples > 0`` that many training examples are
held out and evaluated every epoch, and the epoch with the best validation
top-1 is kept in ``model_best/``: never chosen on the test set.

A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoints/``,
``result.json`` and the trained network in ``model/`` (``shape.json`` and
Orbax parameters ``params/``), which :func:`models.load_model` reads back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from tas_jax import data as data_lib
from tas_jax import programs
from tas_jax.core import cost as cost_lib
from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.nets import resnet, surgery
from tas_jax.runtime import evaluate as evaluate_lib
from tas_jax.runtime import files, models, runs
from tas_jax.runtime import loop as loop_lib
from tas_jax.steps import train as train_lib

log = logging.getLogger("tas_jax")

MODES = ("base", "scratch", "kd", "finetune")


def check_config(config) -> None:
  """Refuse a configuration that cannot run, before any data is read."""
  mode = config.get("mode")
  if mode not in MODES:
    raise runs.RunError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
  train_lib.compute_dtype(config)
  if config.get("budget", "epochs") not in train_lib.BUDGETS:
    raise runs.RunError(f"budget must be one of {', '.join(train_lib.BUDGETS)}, got {config.budget!r}")
  train_lib.color_augment(config, False)
  strength = train_lib.bn_l1(config)
  if strength < 0:
    raise runs.RunError(f"bn_l1 must be non-negative, got {strength}")
  if strength and mode not in ("base", "finetune"):
    raise runs.RunError(f"sparsity training (bn_l1 > 0) starts from scratch (mode base) or from a run (finetune), "
                        f"got mode {mode!r}")
  if mode in ("scratch", "kd") and not config.get("shape"):
    raise runs.RunError(f"mode {mode} needs config.shape (a preset, a shape JSON or an official .config)")
  if mode == "kd" and not config.get("teacher"):
    raise runs.RunError("mode kd needs config.teacher: the directory of a finished base run")
  if mode == "finetune" and not config.get("init_from"):
    raise runs.RunError("mode finetune needs config.init_from: a finished training or search run directory")
  try:  # an unknown model or a malformed shape file, named before the data is loaded
    family = shape_files.resolve(config.model)
    if config.get("shape"):
      shape_files.resolve(config.shape)
  except shapes.ShapeError as e:
    raise runs.RunError(str(e)) from None
  check_recipe(config, family)


def check_recipe(config, family: shapes.Shape) -> None:
  """Refuse Rethinking's CIFAR schedule on an ImageNet network and its ImageNet schedule on a CIFAR one.

  The two protocols differ in epochs, lr steps and Scratch-B rule; a model
  override after choosing the recipe would otherwise mix them silently.
  """
  recipe = config.get("recipe", "")
  if recipe == "rethinking" and family.arch == "imagenet":
    raise runs.RunError(f"recipe rethinking is Rethinking's CIFAR protocol; {config.model} is an ImageNet network: "
                          "use the rethinking-imagenet recipe")
  if recipe == "rethinking-imagenet" and family.arch != "imagenet":
    raise runs.RunError(f"recipe rethinking-imagenet is Rethinking's ImageNet protocol; {config.model} is a "
                          f"{family.arch} network: use the rethinking recipe")
  rule = config.get("scratch_b_rule", "cifar")
  if rule not in train_lib.SCRATCH_B_RULES:
    raise runs.RunError(f"scratch_b_rule must be one of {', '.join(train_lib.SCRATCH_B_RULES)}, got {rule!r}")


# ----------------------------------------------------------------------------- budgets and schedules


# ----------------------------------------------------------------------------- saved networks


# ----------------------------------------------------------------------------- inherited weights


def initial_network(config, num_classes: int, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  """The shape a run trains and its network before the first step.

  Random init (Kaiming, METHOD.md §6.1) for base, scratch and kd; inherited
  weights for finetune (:func:`tas_jax.nets.surgery.inherit` from the
  network a training or search run saved in ``model/``).
  """
  mode = config.mode
  try:
    if mode == "base":
      shape = shapes.full_shape(shape_files.resolve(config.model, num_classes))
    elif config.get("shape"):
      shape = shape_files.resolve(config.shape, num_classes)
    elif mode == "finetune":
      shape = None  # the source's own shape
    else:
      raise runs.RunError(f"mode {mode} needs config.shape (a preset, a shape JSON or an official .config)")
    if mode != "finetune":
      return shape, resnet.build(shape, int(config.seed), dtype)
    source = config.get("init_from") or ""
    if not source:
      raise runs.RunError("mode finetune needs config.init_from: a finished training or search run directory")
    src_shape, src = models.load_model(source)
    shape = shape or src_shape
    net = surgery.inherit(src, shape, dtype)
  except shapes.ShapeError as e:
    raise runs.RunError(str(e)) from None
  if shape.num_classes != num_classes:
    raise runs.RunError(f"{config.init_from} has {shape.num_classes} classes, the dataset {num_classes}")
  return shape, net


def load_teacher(config, num_classes: int, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  path = config.get("teacher") or ""
  if not path:
    raise runs.RunError("mode kd needs config.teacher: the directory of a finished base run")
  shape, model = models.load_model(path, dtype)
  if shape.num_classes != num_classes:
    raise runs.RunError(f"the teacher in {path} has {shape.num_classes} classes, the dataset {num_classes}")
  return shape, model


# ----------------------------------------------------------------------------- the step


class _Clock:
  """Training seconds, cumulative over resumes, excluding compilation, evaluation and checkpointing."""

  def __init__(self, seconds: float):
    self.base, self.excluded = float(seconds), 0.0
    self.t0 = time.perf_counter()

  @contextlib.contextmanager
  def exclude(self, state):
    # Steps still queued on the device would otherwise be charged to the excluded work.
    jax.block_until_ready(state)
    t = time.perf_counter()
    try:
      yield
    finally:
      self.excluded += time.perf_counter() - t

  def seconds(self) -> float:
    return self.base + time.perf_counter() - self.t0 - self.excluded


# ----------------------------------------------------------------------------- the program

@dataclasses.dataclass
class _Training:
  """What one training run sets up before its first step, and what its loop keeps (best epoch, clock)."""

  config: Any
  run: runs.Run
  dataset: Any
  dtype: Any
  shape: shapes.Shape
  plan: train_lib.Plan
  teacher: Any
  train_idx: np.ndarray
  val_idx: np.ndarray
  batches: Any
  problem: train_lib.Problem
  teacher_vars: Any
  ckpt: Any
  meta: dict
  start: int
  step_fn: Any = None
  compile_s: float = 0.0
  test_eval: Any = None
  val_eval: Any = None
  best: dict = dataclasses.field(default_factory=dict)
  clock: Any = None

  @property
  def batch_size(self) -> int:
    return int(self.config.batch_size)

  @property
  def total(self) -> int:
    return self.batches.steps_per_epoch * self.plan.epochs


def _variables(state) -> dict:
  return {"params": state["params"], "stats": state["stats"]}


def _set_up(config, workdir: str, distributed):
  """Run directory, data, networks, plan, problem and the state to start from (restored when resuming)."""
  dtype = train_lib.compute_dtype(config)
  run_ = runs.start(config, workdir, distributed)
  dataset = runs.load_data(config)
  bs = int(config.batch_size)
  eval_bs = int(config.get("eval_batch_size") or bs)
  runs.check_batch_size(bs)
  runs.check_batch_size(eval_bs)
  shape, net = initial_network(config, dataset.num_classes, dtype)
  plan = train_lib.make_plan(config, shape)
  teacher = load_teacher(config, dataset.num_classes, dtype) if config.mode == "kd" else None
  train_idx, val_idx = train_lib.holdout(dataset.labels("train"), int(config.get("val_examples", 0) or 0),
                                         int(config.seed))
  if len(train_idx) < bs:
    raise runs.RunError(f"batch_size {bs} exceeds the {len(train_idx)} training examples")
  batches = data_lib.Batches(len(train_idx), bs, seed=int(config.seed))
  problem, state, teacher_vars = train_lib.build(config, net, plan, batches.steps_per_epoch, dataset.mean,
                                                 dataset.std, bool(dataset.streaming), teacher[1] if teacher else None)
  state = runs.replicate(run_, state)
  teacher_vars = runs.replicate(run_, teacher_vars) if teacher_vars is not None else None
  fp = runs.fingerprint(config, train_lib.FINGERPRINT_KEYS)
  fp.update(trained_shape={"widths": list(shape.widths), "blocks": list(shape.blocks)}, trained_epochs=plan.epochs)
  fp.update(train_lib.augment_fingerprint(config, problem))
  ckpt = runs.open_checkpoints(run_, fp)
  state, meta, start = runs.restore(run_, ckpt, state)
  t = _Training(config, run_, dataset, dtype, shape, plan, teacher, train_idx, val_idx, batches, problem,
                teacher_vars, ckpt, meta, start, best=dict(meta.get("best") or {}),
                clock=_Clock(float(meta.get("train_s", 0.0))))
  _describe(t)
  t.step_fn, t.compile_s = train_lib.compile_step(problem, run_.mesh, state, bs, dataset.image_size, teacher_vars)
  evaluate = functools.partial(evaluate_lib.Evaluator, run_, dataset)
  t.test_eval = evaluate("test", np.arange(dataset.num_examples("test")), eval_bs, train_lib.logits_fn(problem))
  t.val_eval = evaluate("train", val_idx, eval_bs, train_lib.logits_fn(problem)) if len(val_idx) else None
  return t, state


def _describe(t: _Training) -> None:
  if t.start:
    log.info("resuming at step %d of %d", t.start, t.total)
  macs = cost_lib.count(t.shape)
  full_macs = cost_lib.count(shapes.full_shape(t.shape)).macs
  log.info("%s: %s, %d MACs (%.3f of unpruned), %d params; %d epochs of %d steps, warmup %d", t.config.mode,
           t.config.get("shape") or t.config.get("model"), macs.macs, macs.macs / full_macs, macs.params,
           t.plan.epochs, t.batches.steps_per_epoch, t.plan.warmup_epochs)


def _train(t: _Training, state):
  """The step loop; the final state, or None when ``stop_after_steps`` stopped it (with the step reached)."""
  config, run_, spe, bs = t.config, t.run, t.batches.steps_per_epoch, t.batch_size
  every = int(config.get("eval_every_epochs", 0) or 0)
  images_before = int(t.meta.get("images", 0))
  prefetch = data_lib.Prefetcher(
      lambda step: runs.device_batch(run_, t.dataset, "train", t.train_idx[t.batches.indices(step)], step),
      t.start, end_step=t.total)

  def on_epoch(state, epoch, averaged):
    out = {"mean_abs_gamma": train_lib.mean_abs_gamma(state["params"])} if train_lib.bn_l1(config) else {}
    with t.clock.exclude(state):
      if t.val_eval is not None:
        out["val_top1"], out["val_top5"] = t.val_eval(_variables(state))
        if out["val_top1"] > t.best.get("val_top1", -1.0):
          t.best.update(epoch=epoch, val_top1=out["val_top1"], val_top5=out["val_top5"])
          models.save_model(run_.path(models.BEST_DIR), t.shape, state["params"], state["stats"], run_.is_main)
      if every and (epoch + 1) % every == 0 and epoch + 1 < t.plan.epochs:
        out["test_top1"], out["test_top5"] = t.test_eval(_variables(state))  # monitoring only, never selection
    return out

  def save(state, step, carry):
    with t.clock.exclude(state):
      meta = {"epoch": step // spe, "step": step, "best": t.best, "train_s": t.clock.seconds(),
              "images": images_before + (step - t.start) * bs}
      t.ckpt.save(step, state, meta=runs.checkpoint_meta(meta, carry), force=True)

  loop = loop_lib.make_loop(run_, programs.cadence(config), total_steps=t.total, steps_per_epoch=spe, save=save,
                            on_epoch=on_epoch, resumed=runs.resumed_carry(t.meta))
  state = loop_lib.drive(run_, loop, state, t.start, lambda state, step: t.step_fn(state, next(prefetch),
                                                                                    t.teacher_vars), prefetch, t.ckpt)
  return state, min(t.total, t.start + loop.stop_after)


def _result(t: _Training, state, t_start: float) -> dict:
  """Test accuracy, the saved model and ``result.json``'s record of what ran."""
  config, run_, plan = t.config, t.run, t.plan
  train_s = t.clock.seconds()
  images = int(t.meta.get("images", 0)) + (t.total - t.start) * t.batch_size
  top1, top5 = t.test_eval(_variables(state))
  if t.start < t.total or not runs.logged(run_, t.total, "test_top1"):  # also after a kill right after the last step
    run_.writer.write(t.total, {"test_top1": top1, "test_top5": top5}, epoch=plan.epochs - 1)
  models.save_model(run_.path(models.MODEL_DIR), t.shape, state["params"], state["stats"], run_.is_main)
  macs, full_macs = cost_lib.count(t.shape), cost_lib.count(shapes.full_shape(t.shape)).macs
  result = {"finished": True, "mode": config.mode, "recipe": config.get("recipe", ""), "test_top1": top1,
            "test_top5": top5, "macs": macs.macs, "params": macs.params, "flops_ratio": macs.macs / full_macs,
            "shape": t.shape.to_dict(), "shape_spec": config.get("shape") or config.get("model"),
            "model": config.get("model"), "dataset": t.dataset.name, "seed": int(config.seed),
            "epochs": plan.epochs, "steps": t.total, "batch_size": t.batch_size, "warmup_epochs": plan.warmup_epochs,
            "lr": plan.lr, "lr_schedule": plan.lr_schedule, "milestones": list(plan.milestones),
            "lr_per_epoch": plan.per_epoch, "official_tail": plan.official_tail,
            "budget": config.get("budget", "epochs"), "budget_ratio": plan.budget_ratio,
            "scratch_b_rule": config.get("scratch_b_rule", "cifar"), "color_augment": t.problem.color,
            "dtype": config.get("dtype", "float32"), "num_devices": int(run_.mesh.size),
            "wall_s": time.time() - t_start, "train_s": train_s, "compile_s": t.compile_s,
            "train_images_per_s": images / train_s if train_s > 0 else None}
  result.update(_mode_record(t, state))
  return result


def _mode_record(t: _Training, state) -> dict:
  """What the mode adds to the record: the teacher, the source, the sparsity, the validation hold-out."""
  config, out = t.config, {}
  if config.mode == "kd":
    out.update(teacher=config.teacher, teacher_shape=t.teacher[0].to_dict(), kd_alpha=t.problem.kd_alpha,
               kd_temperature=t.problem.kd_temperature,
               teacher_test_top1=files.read_json(os.path.join(config.teacher, "result.json")).get("test_top1"))
  if config.mode == "finetune":
    out["init_from"] = config.init_from
  if train_lib.bn_l1(config):
    out.update(mode="sparsity", bn_l1=train_lib.bn_l1(config), mean_abs_gamma=train_lib.mean_abs_gamma(state["params"]))
  if t.val_eval is not None:
    out["val_examples"] = len(t.val_idx)
    out["val_top1"], out["val_top5"] = t.val_eval(_variables(state))
    if t.best:
      _, best_model = models.load_model(t.run.path(models.BEST_DIR), t.dtype)
      best_vars = runs.replicate(t.run, {"params": nnx.state(best_model, nnx.Param),
                                         "stats": nnx.state(best_model, nnx.BatchStat)})
      b1, b5 = t.test_eval(best_vars)
      out.update(best_epoch=t.best["epoch"], best_val_top1=t.best["val_top1"], best_test_top1=b1, best_test_top5=b5)
  return out


def run(config, workdir: str, distributed=None) -> dict:
  """The training program: resumable; writes model/, result.json, metrics.jsonl (see the module docstring).

  Returns the result dict (``finished`` False when ``stop_after_steps`` stopped it early).
  """
  t_start = time.time()
  check_config(config)
  t, state = _set_up(config, workdir, distributed)
  state, step = _train(t, state)
  if state is None:
    return {"finished": False, "step": step}
  result = _result(t, state, t_start)
  if t.run.is_main:
    files.write_json(t.run.path("result.json"), result)
  t.run.writer.close()
  t.ckpt.close()
  return result
