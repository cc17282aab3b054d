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
A finished run is done: rerunning its command reports ``result.json`` and
changes nothing; ``reevaluate=True`` evaluates its final state on the test
split again into ``reevaluation.json``.
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
from tas_jax.runtime.settings import TrainSettings
from tas_jax.steps import train as train_lib

log = logging.getLogger("tas_jax")

REEVALUATION_FILE = "reevaluation.json"  # a finished run evaluated again (reevaluate=True)


def check_inputs(cfg: TrainSettings) -> None:
  """Refuse a mode without its inputs, or a model, shape or recipe that cannot run together, before any data is read."""
  if cfg.mode in ("scratch", "kd") and not cfg.shape:
    raise runs.RunError(f"mode {cfg.mode} needs config.shape (a preset, a shape JSON or an official .config)")
  if cfg.mode == "kd" and not cfg.teacher:
    raise runs.RunError("mode kd needs config.teacher: the directory of a finished base run")
  if cfg.mode == "finetune" and not cfg.init_from:
    raise runs.RunError("mode finetune needs config.init_from: a finished training or search run directory")
  if cfg.mode == "base" and cfg.shape:
    raise runs.RunError(f"mode base trains the unpruned config.model ({cfg.model}); config.shape "
                        f"({cfg.shape}) applies to scratch, kd and finetune")
  try:  # an unknown model or a malformed shape file, named before the data is loaded
    family = shape_files.resolve(cfg.model)
    if cfg.shape:
      check_family(cfg, shape_files.resolve(cfg.shape), f"config.shape ({cfg.shape})")
  except shapes.ShapeError as e:
    raise runs.RunError(str(e)) from None
  check_recipe(cfg, family)


def _network(shape: shapes.Shape) -> str:
  arch = {"cifar": "CIFAR", "imagenet": "ImageNet"}.get(shape.arch, shape.arch)
  return f"{arch} ResNet ({shape.block} blocks, stages of {'/'.join(str(n) for n in shape.layers)})"


def check_family(cfg: TrainSettings, shape: shapes.Shape, what: str) -> None:
  """Refuses a shape that is not a pruned ``config.model``: the run would be labelled with a network it did not train."""
  family = shape_files.resolve(cfg.model)
  if (shape.arch, shape.block, shape.layers) != (family.arch, family.block, family.layers):
    raise runs.RunError(f"{what} is a pruned {_network(shape)}, but config.model {cfg.model} is the {_network(family)}; "
                        f"set config.model to the shape's network")


def check_recipe(cfg: TrainSettings, family: shapes.Shape) -> None:
  """Refuse Rethinking's CIFAR schedule on an ImageNet network and its ImageNet schedule on a CIFAR one.

  The two protocols differ in epochs, lr steps and Scratch-B rule; a model
  override after choosing the recipe would otherwise mix them silently.
  """
  if cfg.recipe == "rethinking" and family.arch == "imagenet":
    raise runs.RunError(f"recipe rethinking is Rethinking's CIFAR protocol; {cfg.model} is an ImageNet network: "
                        "use the rethinking-imagenet recipe")
  if cfg.recipe == "rethinking-imagenet" and family.arch != "imagenet":
    raise runs.RunError(f"recipe rethinking-imagenet is Rethinking's ImageNet protocol; {cfg.model} is a "
                        f"{family.arch} network: use the rethinking recipe")


def initial_network(cfg: TrainSettings, num_classes: int, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  """The shape a run trains and its network before the first step.

  Random init (Kaiming, METHOD.md §6.1) for base, scratch and kd; inherited
  weights for finetune (:func:`tas_jax.nets.surgery.inherit` from the
  network a training or search run saved in ``model/``).
  """
  try:
    if cfg.mode == "base":
      return (shape := shapes.full_shape(shape_files.resolve(cfg.model, num_classes))), resnet.build(shape, cfg.seed,
                                                                                                        dtype)
    shape = shape_files.resolve(cfg.shape, num_classes) if cfg.shape else None  # finetune: the source's own shape
    if cfg.mode != "finetune":
      return shape, resnet.build(shape, cfg.seed, dtype)
    src_shape, src = models.load_model(cfg.init_from)
    check_family(cfg, src_shape, f"the network of config.init_from ({cfg.init_from})")
    shape = shape or src_shape
    net = surgery.inherit(src, shape, dtype)
  except shapes.ShapeError as e:
    raise runs.RunError(str(e)) from None
  if shape.num_classes != num_classes:
    raise runs.RunError(f"{cfg.init_from} has {shape.num_classes} classes, the dataset {num_classes}")
  return shape, net


def load_teacher(cfg: TrainSettings, num_classes: int, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  shape, model = models.load_model(cfg.teacher, dtype)
  if shape.num_classes != num_classes:
    raise runs.RunError(f"the teacher in {cfg.teacher} has {shape.num_classes} classes, the dataset {num_classes}")
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

  cfg: TrainSettings
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
    return self.cfg.batch_size

  @property
  def total(self) -> int:
    return self.batches.steps_per_epoch * self.plan.epochs


def _variables(state) -> dict:
  return {"params": state["params"], "stats": state["stats"]}


def _set_up(cfg: TrainSettings, run_: runs.Run):
  """Data, networks, plan, problem and the state to start from (restored when resuming)."""
  dtype = train_lib.compute_dtype(cfg)
  dataset = runs.load_data(cfg.data)
  bs, eval_bs = cfg.batch_size, cfg.eval_batch_size or cfg.batch_size
  runs.check_batch_size(bs)
  runs.check_batch_size(eval_bs)
  shape, net = initial_network(cfg, dataset.num_classes, dtype)
  try:  # costs are counted, and the model recorded, at the size of the images the network is given
    shape = shape.replace(image_size=dataset.image_size)
  except shapes.ShapeError as e:
    raise runs.RunError(f"{cfg.dataset}: {e}") from None
  if cfg.mode == "kd":
    runs.check_same_data(cfg.teacher, "the teacher", dataset, cfg.allow_foreign_teacher)
  if cfg.mode == "finetune":
    runs.check_same_data(cfg.init_from, "the run to inherit from (config.init_from)", dataset,
                         cfg.allow_foreign_teacher)
  plan = train_lib.make_plan(cfg, shape)
  teacher = load_teacher(cfg, dataset.num_classes, dtype) if cfg.mode == "kd" else None
  train_idx, val_idx = train_lib.holdout(dataset.labels("train"), cfg.val_examples, cfg.seed)
  if len(train_idx) < bs:
    raise runs.RunError(f"batch_size {bs} exceeds the {len(train_idx)} training examples")
  batches = data_lib.Batches(len(train_idx), bs, seed=cfg.seed)
  problem, state, teacher_vars = train_lib.build(cfg, net, plan, batches.steps_per_epoch, dataset.mean,
                                                 dataset.std, bool(dataset.streaming), teacher[1] if teacher else None)
  state = runs.replicate(run_, state)
  teacher_vars = runs.replicate(run_, teacher_vars) if teacher_vars is not None else None
  fp = cfg.fingerprint(train_lib.FINGERPRINT_KEYS)
  fp.update(trained_shape={"widths": list(shape.widths), "blocks": list(shape.blocks)}, trained_epochs=plan.epochs)
  fp.update(train_lib.augment_fingerprint(cfg, problem))
  ckpt = runs.open_checkpoints(run_, fp)
  state, meta, start = runs.restore(run_, ckpt, state)
  t = _Training(cfg, run_, dataset, dtype, shape, plan, teacher, train_idx, val_idx, batches, problem,
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
  log.info("%s: %s, %d MACs (%.3f of unpruned), %d params; %d epochs of %d steps, warmup %d", t.cfg.mode,
           t.cfg.shape or t.cfg.model, macs.macs, macs.macs / full_macs, macs.params,
           t.plan.epochs, t.batches.steps_per_epoch, t.plan.warmup_epochs)


def _train(t: _Training, state):
  """The step loop; the final state, or None when ``stop_after_steps`` stopped it (with the step reached)."""
  cfg, run_, spe, bs = t.cfg, t.run, t.batches.steps_per_epoch, t.batch_size
  every = cfg.eval_every_epochs
  images_before = int(t.meta.get("images", 0))
  prefetch = data_lib.Prefetcher(
      lambda step: runs.device_batch(run_, t.dataset, "train", t.train_idx[t.batches.indices(step)], step),
      t.start, end_step=t.total)

  def on_epoch(state, epoch, averaged):
    out = {"mean_abs_gamma": train_lib.mean_abs_gamma(state["params"])} if cfg.bn_l1 else {}
    with t.clock.exclude(state):
      if t.val_eval is not None:
        out["val_top1"], out["val_top5"] = t.val_eval(_variables(state))
        if out["val_top1"] > t.best.get("val_top1", -1.0):
          t.best.update(epoch=epoch, val_top1=out["val_top1"], val_top5=out["val_top5"])
          models.save_model(run_.path(models.BEST_DIR), t.shape, state["params"], state["stats"], run_.is_main,
                            runs.inference_record(t.dataset))
      if every and (epoch + 1) % every == 0 and epoch + 1 < t.plan.epochs:
        out["test_top1"], out["test_top5"] = t.test_eval(_variables(state))  # monitoring only, never selection
    return out

  def save(state, step, carry):
    with t.clock.exclude(state):
      meta = {"epoch": step // spe, "step": step, "best": t.best, "train_s": t.clock.seconds(),
              "images": images_before + (step - t.start) * bs}
      t.ckpt.save(step, state, meta=runs.checkpoint_meta(meta, carry), force=True)

  loop = loop_lib.make_loop(run_, programs.cadence(cfg), total_steps=t.total, steps_per_epoch=spe, save=save,
                            on_epoch=on_epoch, resumed=runs.resumed_carry(t.meta), headline=HEADLINE,
                            epoch_line=lambda epoch, record: epoch_line(t, epoch, record))
  state = loop_lib.drive(run_, loop, state, t.start, lambda state, step: t.step_fn(state, next(prefetch),
                                                                                    t.teacher_vars), prefetch, t.ckpt)
  return state, min(t.total, t.start + loop.stop_after)


# What the progress line shows of a training step's metrics.
HEADLINE = ("loss", "train_acc", "lr")


def epoch_line(t: _Training, epoch: int, r: dict) -> str:
  """One epoch of training in a line: loss, training accuracy, learning rate, and the evaluations it had."""
  parts = [f"epoch {epoch + 1}/{t.plan.epochs}", f"loss {r.get('epoch_loss', float('nan')):.4f}",
           f"train acc {r.get('epoch_train_acc', float('nan')):.4f}", f"lr {r.get('epoch_lr', float('nan')):.4g}"]
  for key, name in (("val_top1", "val top-1"), ("test_top1", "test top-1"), ("mean_abs_gamma", "mean |gamma|")):
    if key in r:
      parts.append(f"{name} {r[key]:.4f}")
  return "; ".join(parts)


def _result(t: _Training, state, t_start: float) -> dict:
  """Test accuracy, the saved model and ``result.json``'s record of what ran."""
  cfg, run_, plan = t.cfg, t.run, t.plan
  train_s = t.clock.seconds()
  images = int(t.meta.get("images", 0)) + (t.total - t.start) * t.batch_size
  top1, top5 = t.test_eval(_variables(state))
  if t.start < t.total or not runs.logged(run_, t.total, "test_top1"):  # also after a kill right after the last step
    run_.writer.write(t.total, {"test_top1": top1, "test_top5": top5}, epoch=plan.epochs - 1)
  models.save_model(run_.path(models.MODEL_DIR), t.shape, state["params"], state["stats"], run_.is_main,
                    runs.inference_record(t.dataset))
  macs, full_macs = cost_lib.count(t.shape), cost_lib.count(shapes.full_shape(t.shape)).macs
  result = {"finished": True, "mode": cfg.mode, "recipe": cfg.recipe, "test_top1": top1,
            "test_top5": top5, "macs": macs.macs, "params": macs.params, "flops_ratio": macs.macs / full_macs,
            "shape": t.shape.to_dict(), "shape_spec": cfg.shape or cfg.model,
            "model": cfg.model, "dataset": t.dataset.name, "data": runs.data_fingerprint(t.dataset), "seed": cfg.seed,
            "epochs": plan.epochs, "steps": t.total, "batch_size": t.batch_size, "warmup_epochs": plan.warmup_epochs,
            "lr": plan.lr, "lr_schedule": plan.lr_schedule, "milestones": list(plan.milestones),
            "lr_per_epoch": plan.per_epoch, "official_tail": plan.official_tail,
            "budget": cfg.budget, "budget_ratio": plan.budget_ratio,
            "scratch_b_rule": cfg.scratch_b_rule, "color_augment": t.problem.color,
            "dtype": cfg.dtype, "num_devices": int(run_.mesh.size),
            "wall_s": time.time() - t_start, "train_s": train_s, "compile_s": t.compile_s,
            "train_images_per_s": images / train_s if train_s > 0 else None}
  result.update(_mode_record(t, state))
  return result


def _mode_record(t: _Training, state) -> dict:
  """What the mode adds to the record: the teacher, the source, the sparsity, the validation hold-out."""
  cfg, out = t.cfg, {}
  if cfg.mode == "kd":
    out.update(teacher=cfg.teacher, teacher_shape=t.teacher[0].to_dict(), kd_alpha=t.problem.kd_alpha,
               kd_temperature=t.problem.kd_temperature,
               teacher_test_top1=files.read_json(os.path.join(cfg.teacher, "result.json")).get("test_top1"))
  if cfg.mode == "finetune":
    out["init_from"] = cfg.init_from
  if cfg.bn_l1:
    out.update(mode="sparsity", bn_l1=cfg.bn_l1, mean_abs_gamma=train_lib.mean_abs_gamma(state["params"]))
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


def run(config, workdir: str, distributed=None, *, command: str = "") -> dict:
  """The training program: resumable; writes model/, result.json, metrics.jsonl (see the module docstring).

  ``config`` is a training ConfigDict (``tas_jax/configs/train.py``) or
  :class:`TrainSettings`, resolved and checked before anything is read or
  written; ``command`` is what a stopped run tells the user to rerun.
  Returns the result dict (``finished`` False when ``stop_after_steps``
  stopped it early).
  """
  t_start = time.time()
  cfg = TrainSettings.resolve(config)
  check_inputs(cfg)
  with runs.opened(workdir, cfg, distributed, command) as run_:
    return _run(cfg, run_, t_start)


def _run(cfg: TrainSettings, run_: runs.Run, t_start: float) -> dict:
  done = runs.finished_result(run_, train_lib.FINGERPRINT_KEYS)
  if done is not None and not cfg.reevaluate:
    return done
  if done is not None:
    run_.config_text = ""  # config.json stays the record of the run that finished
  t, state = _set_up(cfg, run_)
  if done is not None:  # evaluated again into a file of its own; the run's outputs stay as they are
    top1, top5 = t.test_eval(_variables(state))
    again = {"test_top1": top1, "test_top5": top5, "recorded_test_top1": done.get("test_top1"),
             "num_devices": int(run_.mesh.size), "dtype": cfg.dtype, "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if run_.is_main:
      files.write_json(run_.path(REEVALUATION_FILE), again)
    t.ckpt.close()
    return {**done, "reevaluation": again}
  state, step = _train(t, state)
  if state is None:
    return {"finished": False, "step": step}
  result = _result(t, state, t_start)
  if t.run.is_main:
    files.write_json(t.run.path("result.json"), result)
  t.ckpt.close()
  return result
