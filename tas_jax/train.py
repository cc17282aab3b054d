"""Training of concrete networks: TAS's teacher and student (steps 1 and 3) and the Rethinking baselines.

``config.mode`` chooses what is trained and from where:

* ``base``: the unpruned network of ``config.model`` from random init, the
  KD teacher (TAS-SPEC 6.2) and the "unpruned" row of every table.
* ``scratch``: ``config.shape`` from random init, with the cross-entropy loss
  (TAS's "NMT"; Rethinking's Scratch-E or, with ``budget="flops"``, Scratch-B).
* ``kd``: ``config.shape`` from random init, distilled from the trained
  network of the base run ``config.teacher`` (TAS's "KDT", TAS-SPEC 6.3).
* ``finetune``: ``config.shape`` with weights inherited from the run
  directory ``config.init_from``: a training run (first filters of every conv,
  see :func:`inherit`) or a search run (the supernet's export), trained with
  the fine-tuning schedule (``finetune_*`` keys; Rethinking: 40 epochs at a
  constant lr of 0.001, PRUNING-BASELINES 1.2).

Budgets (PRUNING-BASELINES 1.2): ``budget="epochs"`` trains ``epochs`` epochs
whatever the shape (Scratch-E); ``budget="flops"`` trains
``int(epochs * MACs(unpruned) / MACs(shape))`` epochs, as Rethinking's CIFAR
``main_B.py`` does, with the cosine spread over the new length and multistep
milestones scaled by the same factor (Scratch-B); with
``scratch_b_rule="imagenet"`` it follows Rethinking's ImageNet ``main_B.py``
instead (:func:`scratch_b_imagenet`: at most twice the epochs, lr steps every
third). Base and finetune runs ignore the budget. MACs are this project's
conv + linear multiply-accumulates (:mod:`tas_jax.cost`), not Rethinking's
all-op FLOPs, so the ratio can differ slightly from theirs.

Learning rate: :func:`tas_jax.schedules.lr_schedule` evaluated per step
(``lr_per_epoch=False``, the default): the warmup ramps every step as in the
official code, and the cosine anneals every step too, where the official code
holds each epoch's value for the whole epoch. Over 300 epochs the two differ by
less than 1 % of the base lr at any step; over a short run the per-epoch
staircase degenerates (a 1-epoch run would never anneal). Multistep and
constant schedules are the same either way. ``lr_per_epoch=True`` gives the
official staircase, and ``official_tail=True`` adds the official code's
``warmup_epochs`` extra epochs at lr 0 after the cosine (TAS-SPEC 4.1, 6.3);
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
Orbax parameters ``params/``), which :func:`load_model` reads back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from tas_jax import checkpoint as checkpoint_lib
from tas_jax import cost as cost_lib
from tas_jax import data as data_lib
from tas_jax import distill
from tas_jax import engine
from tas_jax import optim
from tas_jax import parallel
from tas_jax import resnet
from tas_jax import schedules
from tas_jax import search
from tas_jax import shapes
from tas_jax import supernet

log = logging.getLogger("tas_jax")

MODES = ("base", "scratch", "kd", "finetune")
BUDGETS = ("epochs", "flops")
SCRATCH_B_RULES = ("cifar", "imagenet")
COLOR_AUGMENT = ("auto", "on", "off")
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
MODEL_DIR = "model"
BEST_DIR = "model_best"

# Configuration keys that change a run's trajectory: a checkpoint written under
# other values of these is refused on resume.
FINGERPRINT_KEYS = ("mode", "model", "shape", "teacher", "init_from", "budget", "kd_alpha", "kd_temperature",
                    "dataset", "num_train_examples", "data_seed", "val_examples", "epochs", "warmup_epochs",
                    "batch_size", "lr", "lr_schedule", "milestones", "gamma", "official_tail", "lr_per_epoch",
                    "momentum", "nesterov", "weight_decay", "label_smoothing", "finetune_epochs", "finetune_lr",
                    "finetune_lr_schedule", "finetune_milestones", "dtype", "seed")


def check_config(config) -> None:
  """Refuse a configuration that cannot run, before any data is read."""
  mode = config.get("mode")
  if mode not in MODES:
    raise engine.RunError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
  compute_dtype(config)
  if config.get("budget", "epochs") not in BUDGETS:
    raise engine.RunError(f"budget must be one of {', '.join(BUDGETS)}, got {config.budget!r}")
  color_augment(config, False)
  if mode in ("scratch", "kd") and not config.get("shape"):
    raise engine.RunError(f"mode {mode} needs config.shape (a preset, a shape JSON or an official .config)")
  if mode == "kd" and not config.get("teacher"):
    raise engine.RunError("mode kd needs config.teacher: the directory of a finished base run")
  if mode == "finetune" and not config.get("init_from"):
    raise engine.RunError("mode finetune needs config.init_from: a finished training or search run directory")
  try:  # an unknown model or a malformed shape file, named before the data is loaded
    family = shapes.resolve(config.model)
    if config.get("shape"):
      shapes.resolve(config.shape)
  except shapes.ShapeError as e:
    raise engine.RunError(str(e)) from None
  check_recipe(config, family)


def check_recipe(config, family: shapes.Shape) -> None:
  """Refuse Rethinking's CIFAR schedule on an ImageNet network and its ImageNet schedule on a CIFAR one.

  The two protocols differ in epochs, lr steps and Scratch-B rule; a model
  override after choosing the recipe would otherwise mix them silently.
  """
  recipe = config.get("recipe", "")
  if recipe == "rethinking" and family.arch == "imagenet":
    raise engine.RunError(f"recipe rethinking is Rethinking's CIFAR protocol; {config.model} is an ImageNet network: "
                          "use the rethinking-imagenet recipe")
  if recipe == "rethinking-imagenet" and family.arch != "imagenet":
    raise engine.RunError(f"recipe rethinking-imagenet is Rethinking's ImageNet protocol; {config.model} is a "
                          f"{family.arch} network: use the rethinking recipe")
  rule = config.get("scratch_b_rule", "cifar")
  if rule not in SCRATCH_B_RULES:
    raise engine.RunError(f"scratch_b_rule must be one of {', '.join(SCRATCH_B_RULES)}, got {rule!r}")


def color_augment(config, streaming: bool) -> bool:
  """Whether training adds TAS's ImageNet colour jitter and PCA lighting: ``auto`` turns them on for streamed sets.

  Streamed datasets are the ImageNet-style ones (random resized crops on the
  host), where the official TAS training adds both; CIFAR-style in-memory
  sets do not.
  """
  value = config.get("color_augment", "auto")
  if value not in COLOR_AUGMENT:
    raise engine.RunError(f"color_augment must be one of {', '.join(COLOR_AUGMENT)}, got {value!r}")
  return value == "on" or (value == "auto" and bool(streaming))


def compute_dtype(config):
  """``config.dtype`` as a JAX dtype for the network's computation (None: float32)."""
  name = config.get("dtype", "float32")
  if name not in DTYPES:
    raise engine.RunError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  return DTYPES[name]


# ----------------------------------------------------------------------------- budgets and schedules

def scratch_b_epochs(epochs: int, full_macs: int, macs: int) -> int:
  """Rethinking's Scratch-B length (PRUNING-BASELINES 1.2), uncapped:

    epochs_B = int(epochs * MACs(unpruned) / MACs(pruned))
  """
  return int(epochs * full_macs / macs)


def scratch_b_imagenet(epochs: int, full_macs: int, macs: int) -> tuple[int, tuple[int, ...]]:
  """Rethinking's ImageNet Scratch-B (PRUNING-BASELINES 1.2): ``(epochs_B, lr decay epochs)``.

  With ratio = MACs(unpruned) / MACs(pruned): at most twice the budget
  (``ratio >= 2``: 180 epochs of a 90-epoch recipe, decays every 60), else
  ``int(epochs * ratio)`` epochs; the lr is divided by 10 every
  ``epochs_B // 3`` epochs, every multiple below ``epochs_B`` (so 100 epochs
  decay at 33, 66 and 99, as the official step function does).
  """
  ratio = full_macs / macs
  new = 2 * int(epochs) if ratio >= 2 else int(epochs * ratio)
  step = new // 3
  return new, tuple(range(step, new, step)) if step else ()


def scale_milestones(milestones, epochs: int, new_epochs: int) -> tuple[int, ...]:
  """Milestones stretched with the run: ``floor(m * new_epochs / epochs)``.

  160 -> 320 epochs moves (80, 120) to (160, 240): Rethinking's decays at
  int(50 %) and int(75 %) of the new epoch count.
  """
  return tuple(int(m) * int(new_epochs) // int(epochs) for m in milestones)


def effective_warmup(warmup_epochs: int, epochs: int) -> int:
  """Warmup epochs a run uses: ``min(warmup_epochs, epochs // 10)``.

  Keeps the recipes' 5 warmup epochs for runs of 50 epochs or more and
  shrinks them for short runs, which would otherwise spend most of their
  epochs at a small learning rate (a 1-epoch run gets none).
  """
  return max(0, min(int(warmup_epochs), int(epochs) // 10))


@dataclasses.dataclass(frozen=True)
class Plan:
  """How long and at which learning rates a run trains.

  Attributes:
    epochs: epochs trained, the official zero-lr tail included.
    schedule_epochs: E of :func:`tas_jax.schedules.lr_schedule`.
    warmup_epochs: linear warmup epochs (after :func:`effective_warmup`).
    lr: base learning rate.
    lr_schedule: ``cosine``, ``multistep`` or ``constant``.
    milestones: multistep decay epochs (scaled for Scratch-B).
    gamma: multistep decay factor.
    official_tail: whether the last ``warmup_epochs`` epochs run at lr 0.
    per_epoch: hold the lr for whole epochs (the official cosine) rather than anneal every step.
    budget_ratio: MACs(unpruned) / MACs(shape) for a FLOP-matched budget, else 1.
  """

  epochs: int
  schedule_epochs: int
  warmup_epochs: int
  lr: float
  lr_schedule: str
  milestones: tuple[int, ...]
  gamma: float
  official_tail: bool
  budget_ratio: float
  per_epoch: bool = False

  def lr_fn(self, steps_per_epoch: int):
    """The learning rate of every step (an optax schedule of the update count)."""
    if self.per_epoch:
      return schedules.lr_schedule(self.lr_schedule, self.lr, self.schedule_epochs, steps_per_epoch,
                                   warmup_epochs=self.warmup_epochs, milestones=self.milestones, gamma=self.gamma,
                                   official_tail=self.official_tail)
    # The same schedule on a time axis of steps: one-step "epochs" make every epoch-wise formula step-wise.
    spe = int(steps_per_epoch)
    return schedules.lr_schedule(self.lr_schedule, self.lr, self.schedule_epochs * spe, 1,
                                 warmup_epochs=self.warmup_epochs * spe, milestones=[m * spe for m in self.milestones],
                                 gamma=self.gamma, official_tail=self.official_tail)


def make_plan(config, shape: shapes.Shape) -> Plan:
  """The epochs and learning-rate schedule of a run of ``config`` on ``shape`` (see the module docstring)."""
  mode = config.mode
  budget = config.get("budget", "epochs")
  if budget not in BUDGETS:
    raise engine.RunError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
  ratio = 1.0
  tail = False
  if mode == "finetune":
    epochs, lr, kind = int(config.finetune_epochs), float(config.finetune_lr), config.finetune_lr_schedule
    milestones, warm = tuple(config.get("finetune_milestones") or ()), 0
  else:
    epochs, lr, kind = int(config.epochs), float(config.lr), config.lr_schedule
    milestones, warm = tuple(config.get("milestones") or ()), int(config.get("warmup_epochs", 0))
    tail = bool(config.get("official_tail", False))
    if budget == "flops" and mode in ("scratch", "kd"):
      full, mine = cost_lib.count(shapes.full_shape(shape)).macs, cost_lib.count(shape).macs
      if config.get("scratch_b_rule", "cifar") == "imagenet":
        new, milestones = scratch_b_imagenet(epochs, full, mine)
      else:
        new = scratch_b_epochs(epochs, full, mine)
        milestones = scale_milestones(milestones, epochs, new)
      ratio, epochs = full / mine, new
  if epochs < 1:
    raise engine.RunError(f"a run needs at least 1 epoch, got {epochs}")
  if kind not in schedules.LR_SCHEDULES:
    raise engine.RunError(f"lr_schedule must be one of {', '.join(schedules.LR_SCHEDULES)}, got {kind!r}")
  warm = effective_warmup(warm, epochs)
  return Plan(epochs + warm if tail else epochs, epochs, warm, lr, kind, tuple(int(m) for m in milestones),
              float(config.get("gamma", 0.1)), tail, ratio, bool(config.get("lr_per_epoch", False)))


# ----------------------------------------------------------------------------- saved networks

def _model_dir(run_dir: str) -> str:
  if os.path.isfile(os.path.join(run_dir, "shape.json")) and os.path.isdir(os.path.join(run_dir, "params")):
    return run_dir
  return os.path.join(run_dir, MODEL_DIR)


def save_model(directory: str, shape: shapes.Shape, params, stats, is_main: bool = True) -> None:
  """Write ``directory/params`` (Orbax: ``{"params", "stats"}``) and ``directory/shape.json``.

  Every process calls it (Orbax coordinates the write); ``shape.json`` is
  written last, so its presence marks a complete model.
  """
  os.makedirs(directory, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(os.path.join(directory, "params")), {"params": params, "stats": stats}, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  if is_main:
    shapes.save(shape, os.path.join(directory, "shape.json"))
  parallel.barrier("tas_jax.train.save_model")


def load_model(run_dir: str, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  """The trained network of a training run, in eval mode, for inference.

  ``run_dir`` is a training run directory (its ``model/`` is read) or a model
  directory itself (``shape.json`` + ``params/``, e.g. ``RUN/model_best``).
  ``dtype`` (e.g. ``jnp.bfloat16``) sets the computation dtype; parameters
  stay float32. Returns ``(shape, model)``; ``model(images)`` maps normalised
  NHWC float images to logits.

  Example::

    shape, model = load_model("runs/r20-base")
    logits = model(data.normalize(images_uint8, dataset.mean, dataset.std))
  """
  directory = _model_dir(run_dir)
  shape_path, params_path = os.path.join(directory, "shape.json"), os.path.join(directory, "params")
  if not (os.path.isfile(shape_path) and os.path.isdir(params_path)):
    raise engine.RunError(f"no trained model in {run_dir} (expected {MODEL_DIR}/shape.json and {MODEL_DIR}/params, "
                          "written when a training run finishes)")
  shape = shapes.load(shape_path)
  model = resnet.build(shape, 0, dtype)
  target = {"params": nnx.state(model, nnx.Param), "stats": nnx.state(model, nnx.BatchStat)}
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(os.path.abspath(params_path), target)
  except Exception as e:  # a damaged or foreign parameter directory
    raise engine.RunError(f"cannot read the parameters in {params_path}: {type(e).__name__}: {e}") from None
  finally:
    ckptr.close()
  nnx.update(model, restored["params"], restored["stats"])
  model.eval()
  return shape, model


# ----------------------------------------------------------------------------- inherited weights

def _set_bn(bn: nnx.BatchNorm, scale, bias, mean, var) -> None:
  bn.scale[...], bn.bias[...], bn.mean[...], bn.var[...] = scale, bias, mean, var


def _neutral_bn(bn: nnx.BatchNorm, n: int) -> None:
  # var = 1 - eps makes the eval-mode normalisation an exact identity.
  _set_bn(bn, jnp.ones(n), jnp.zeros(n), jnp.zeros(n), jnp.full((n,), 1.0 - resnet.BN_EPSILON))


def _copy_conv(dst: resnet.ConvBN, src: resnet.ConvBN, what: str) -> None:
  """dst's kernel = src's first ``c_in`` input and ``c_out`` output channels; its batch norm the first ``c_out``."""
  kernel = src.conv.kernel[...]
  kh, kw, cin, cout = dst.conv.kernel[...].shape
  if kernel.shape[:2] != (kh, kw) or kernel.shape[2] < cin or kernel.shape[3] < cout:
    raise shapes.ShapeError(f"cannot inherit {what}: it needs a {kh}x{kw} conv of {cin} -> {cout} channels, "
                            f"the source has {kernel.shape[0]}x{kernel.shape[1]} of {kernel.shape[2]} -> "
                            f"{kernel.shape[3]}")
  dst.conv.kernel[...] = kernel[:, :, :cin, :cout]
  if dst.bn is not None and src.bn is not None:
    _set_bn(dst.bn, *(getattr(src.bn, n)[...][:cout] for n in ("scale", "bias", "mean", "var")))
  elif dst.bn is not None:
    _neutral_bn(dst.bn, cout)
  elif src.bn is not None:
    raise shapes.ShapeError(f"cannot inherit {what}: the source has a batch norm the target lacks")


def inherit(source: resnet.ResNet, shape: shapes.Shape, seed: int = 0, dtype=None) -> resnet.ResNet:
  """The network of ``shape`` carrying the weights of a larger trained network of the same family.

  Every conv keeps its first c_in input and c_out output channels and the
  matching batch-norm entries (filter slicing with "first c" selection, the
  weight sharing of TAS's supernet); the classifier keeps its first c rows.
  Blocks ``shape`` drops are simply omitted. Where ``shape`` needs a
  projection shortcut the source lacks (a stride-1 block whose pruned input
  and output widths differ), it starts as an identity on the first channels
  with a neutral batch norm, as :func:`tas_jax.supernet.export` does, so a
  network of the source's own shape reproduces the source's eval-mode logits
  exactly.

  Raises:
    ShapeError: another family or class count, a block kept by ``shape`` but
      not by the source, or a width above the source's.
  """
  src_shape = source.shape
  for f in ("arch", "block", "layers", "num_classes", "in_channels", "shortcut"):
    if getattr(src_shape, f) != getattr(shape, f):
      raise shapes.ShapeError(f"cannot inherit weights across networks of different {f}: "
                              f"{getattr(src_shape, f)} (source) vs {getattr(shape, f)}")
  net = resnet.build(shape, seed, dtype)
  _copy_conv(net.stem, source.stem, "the stem")
  src_blocks = dict(zip(src_shape.kept_blocks(), source.blocks))
  for (stage, index), dst in zip(shape.kept_blocks(), net.blocks):
    name = f"block {index} of stage {stage}"
    if (stage, index) not in src_blocks:
      raise shapes.ShapeError(f"cannot inherit {name}: the source network drops it")
    src = src_blocks[(stage, index)]
    for i, (d, s) in enumerate(zip(dst.convs, src.convs)):
      _copy_conv(d, s, f"conv {i} of {name}")
    if dst.shortcut is None:
      continue
    if src.shortcut is not None:
      _copy_conv(dst.shortcut, src.shortcut, f"the shortcut of {name}")
      continue
    cin, cout = dst.shortcut.conv.kernel[...].shape[2:]
    dst.shortcut.conv.kernel[...] = jnp.eye(cin, cout)[None, None]
    if dst.shortcut.bn is not None:
      _neutral_bn(dst.shortcut.bn, cout)
  rows = source.head.kernel[...]
  c = shape.out_width
  if rows.shape[0] < c:
    raise shapes.ShapeError(f"cannot inherit the classifier: it reads {c} channels, the source {rows.shape[0]}")
  net.head.kernel[...] = rows[:c]
  net.head.bias[...] = source.head.bias[...]
  return net


def _with_dtype(net: resnet.ResNet, dtype) -> resnet.ResNet:
  if dtype is None:
    return net
  model = resnet.build(net.shape, 0, dtype)
  nnx.update(model, nnx.state(net))
  return model


def is_search_run(run_dir: str) -> bool:
  path = os.path.join(run_dir, "config.json")
  if os.path.isdir(os.path.join(run_dir, MODEL_DIR)) or not os.path.isfile(path):
    return False
  with open(path) as f:
    return "target_flops_ratio" in json.load(f)


def export_search(run_dir: str, shape: shapes.Shape | None = None) -> tuple[shapes.Shape, resnet.ResNet]:
  """The pruned network of a finished search's final supernet (:func:`tas_jax.supernet.export`).

  By default the supernet's argmax shape; with ``shape`` (which must lie in
  the search space, e.g. the search's band-fitted ``shape.json``) the
  architecture logits are pointed at that shape before the export, so its
  convs get their own candidates' batch norms.
  """
  if not os.path.isfile(os.path.join(run_dir, "result.json")):
    raise engine.RunError(f"the search in {run_dir} has not finished (no result.json); finish it first")
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  searched = shapes.load(os.path.join(run_dir, "shape.json"))
  problem, state = search.build(cfg, searched.num_classes, 1)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=None)
  try:
    state, _ = ckpt.restore(abstract)
  except checkpoint_lib.CheckpointError as e:
    raise engine.RunError(f"cannot read the search's final checkpoint: {e}") from None
  finally:
    ckpt.close()
  model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"])
  if shape is not None:
    wi, di = model.space.indices_of(shape)
    model.width_logits[...] = jax.nn.one_hot(wi, model.space.width_table.shape[1])
    model.depth_logits[...] = jax.nn.one_hot(di, model.space.depth_table.shape[1])
  exported, net = supernet.export(model)
  if shape is not None and (exported.widths, exported.blocks) != (shape.widths, shape.blocks):
    raise shapes.ShapeError("the exported shape differs from the requested one")
  return exported, net


def initial_network(config, num_classes: int, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  """The shape a run trains and its network before the first step.

  Random init (Kaiming, TAS-SPEC 6.1) for base, scratch and kd; inherited
  weights for finetune (:func:`inherit` from a training run,
  :func:`export_search` from a search run).
  """
  mode = config.mode
  try:
    if mode == "base":
      shape = shapes.full_shape(shapes.resolve(config.model, num_classes))
    elif config.get("shape"):
      shape = shapes.resolve(config.shape, num_classes)
    elif mode == "finetune":
      shape = None  # the source's own shape
    else:
      raise engine.RunError(f"mode {mode} needs config.shape (a preset, a shape JSON or an official .config)")
    if mode != "finetune":
      return shape, resnet.build(shape, int(config.seed), dtype)
    source = config.get("init_from") or ""
    if not source:
      raise engine.RunError("mode finetune needs config.init_from: a finished training or search run directory")
    if is_search_run(source):
      shape, net = export_search(source, shape)
      net = _with_dtype(net, dtype)
    else:
      src_shape, src = load_model(source)
      shape = shape or src_shape
      net = inherit(src, shape, int(config.seed), dtype)
  except shapes.ShapeError as e:
    raise engine.RunError(str(e)) from None
  if shape.num_classes != num_classes:
    raise engine.RunError(f"{config.init_from} has {shape.num_classes} classes, the dataset {num_classes}")
  return shape, net


def load_teacher(config, num_classes: int, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  path = config.get("teacher") or ""
  if not path:
    raise engine.RunError("mode kd needs config.teacher: the directory of a finished base run")
  shape, model = load_model(path, dtype)
  if shape.num_classes != num_classes:
    raise engine.RunError(f"the teacher in {path} has {shape.num_classes} classes, the dataset {num_classes}")
  return shape, model


# ----------------------------------------------------------------------------- the step

@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  """Everything static about one training run: networks, optimiser, schedule, normalisation, losses."""

  graphdef: Any  # the network in training mode (batch statistics)
  eval_graphdef: Any  # the same network in eval mode (running statistics)
  tx: optax.GradientTransformation
  lr_fn: Any
  mean: tuple
  std: tuple
  streaming: bool
  seed: int
  label_smoothing: float = 0.0
  teacher_graphdef: Any = None  # eval mode; None without distillation
  kd_alpha: float = 0.9
  kd_temperature: float = 4.0
  color: bool = False  # TAS's ImageNet colour jitter and PCA lighting (see color_augment)


def build(config, net: resnet.ResNet, plan: Plan, steps_per_epoch: int, mean=(0.5,) * 3, std=(0.25,) * 3,
          streaming: bool = False, teacher: resnet.ResNet | None = None):
  """The problem, the initial state ``{params, stats, opt, step}`` and the teacher's variables (or None)."""
  lr_fn = plan.lr_fn(steps_per_epoch)
  tx = optim.weight_optimizer(lr_fn, momentum=float(config.momentum), nesterov=bool(config.nesterov),
                              weight_decay=float(config.weight_decay))
  net.train()
  graphdef, params, stats = nnx.split(net, nnx.Param, nnx.BatchStat)
  net.eval()
  eval_graphdef, _, _ = nnx.split(net, nnx.Param, nnx.BatchStat)
  teacher_graphdef, teacher_vars = None, None
  if teacher is not None:
    teacher.eval()
    teacher_graphdef, tp, ts = nnx.split(teacher, nnx.Param, nnx.BatchStat)
    teacher_vars = {"params": tp, "stats": ts}
  problem = Problem(graphdef, eval_graphdef, tx, lr_fn, tuple(mean), tuple(std), bool(streaming), int(config.seed),
                    float(config.get("label_smoothing", 0.0)), teacher_graphdef,
                    float(config.get("kd_alpha", 0.9)), float(config.get("kd_temperature", 4.0)),
                    color_augment(config, streaming))
  state = {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return problem, state, teacher_vars


def _augment(problem: Problem, key, images):
  if problem.color:
    return data_lib.augment_imagenet(key, images, problem.mean, problem.std, crop=not problem.streaming)
  if problem.streaming:  # cropped on the host already
    return data_lib.flip_and_normalize(key, images, problem.mean, problem.std)
  return data_lib.augment_cifar(key, images, problem.mean, problem.std)


def augment_fingerprint(config, problem: Problem) -> dict:
  """Checkpoint fingerprint entries for choices added after the key list: present only when they change training.

  Runs that do not use them keep the fingerprint their checkpoints were
  written with, so they still resume.
  """
  out = {}
  if problem.color:
    out["color_augment"] = True
  if config.get("budget", "epochs") == "flops" and config.get("scratch_b_rule", "cifar") != "cifar":
    out["scratch_b_rule"] = config.scratch_b_rule
  return out


def train_step(problem: Problem, state, batch, teacher=None):
  """One SGD step on an augmented batch; pure, returns ``(new_state, metrics)``.

  Loss: cross-entropy (with ``label_smoothing``), or with a teacher
  :func:`tas_jax.distill.kd_loss`; the teacher runs in eval mode on the same
  augmented batch, outside the gradient (TAS-SPEC 6.3).
  """
  key = engine.step_key(problem.seed, state["step"])
  x = _augment(problem, key, batch["images"])
  labels = batch["labels"]
  t_logits = None
  if teacher is not None:
    t_model = nnx.merge(problem.teacher_graphdef, teacher["params"], teacher["stats"], copy=True)
    t_logits = jax.lax.stop_gradient(t_model(x))

  def loss_fn(params):
    model = nnx.merge(problem.graphdef, params, state["stats"], copy=True)
    logits = model(x)
    ce = distill.cross_entropy(logits, labels, problem.label_smoothing)
    if t_logits is None:
      loss = ce
    else:
      loss = distill.kd_loss(logits, t_logits, labels, problem.kd_alpha, problem.kd_temperature,
                             problem.label_smoothing)
    return loss, (nnx.state(model, nnx.BatchStat), logits, ce)

  (loss, (stats, logits, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = problem.tx.update(grads, state["opt"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"params": params, "stats": stats, "opt": opt, "step": state["step"] + 1}
  metrics = {"loss": loss, "ce": ce, "train_acc": search.accuracy(logits, labels), "lr": problem.lr_fn(state["step"])}
  if t_logits is not None:
    metrics["kl"] = distill.kl_divergence(logits, t_logits, problem.kd_temperature)
    metrics["teacher_acc"] = search.accuracy(t_logits, labels)
  return new_state, metrics


def compile_step(problem: Problem, mesh, state, batch_size: int, image_size: int, teacher=None):
  """The train step compiled once, ahead of the loop, for replicated state and a batch sharded over ``mesh``.

  Returns ``(step_fn, seconds spent compiling)``; ``step_fn(state, batch,
  teacher)`` donates ``state``.
  """
  repl = parallel.replicated(mesh)
  jitted = jax.jit(functools.partial(train_step, problem), donate_argnums=(0,), out_shardings=(repl, repl))
  sharding = parallel.data_sharding(mesh)
  batch = {"images": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8, sharding=sharding),
           "labels": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}
  t = time.perf_counter()
  compiled = jitted.lower(state, batch, teacher).compile()
  return compiled, time.perf_counter() - t


def logits_fn(problem: Problem):
  """Eval-mode logits of ``{params, stats}`` for uint8 images, for :class:`tas_jax.engine.Evaluator`."""

  def fn(variables, images):
    model = nnx.merge(problem.eval_graphdef, variables["params"], variables["stats"], copy=True)
    return model(data_lib.normalize(images, problem.mean, problem.std))

  return fn


def holdout(labels: np.ndarray, val_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices: a class-balanced random ``val_examples`` held out of the training split."""
  n = len(labels)
  if val_examples <= 0:
    return np.arange(n), np.zeros(0, np.int64)
  if val_examples >= n:
    raise engine.RunError(f"val_examples={val_examples} leaves nothing of the {n} training examples")
  val = data_lib.balanced_subset(labels, val_examples, seed)
  mask = np.zeros(n, bool)
  mask[val] = True
  return np.flatnonzero(~mask), val


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


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


# ----------------------------------------------------------------------------- the program

def run(config, workdir: str, distributed=None) -> dict:
  """The training program: resumable; writes model/, result.json, metrics.jsonl (see the module docstring).

  Returns the result dict (``finished`` False when ``stop_after_steps`` stopped it early).
  """
  t_start = time.time()
  check_config(config)
  dtype = compute_dtype(config)
  run_ = engine.start(config, workdir, distributed)
  dataset = engine.load_data(config)
  bs = int(config.batch_size)
  eval_bs = int(config.get("eval_batch_size") or bs)
  engine.check_batch_size(bs)
  engine.check_batch_size(eval_bs)
  shape, net = initial_network(config, dataset.num_classes, dtype)
  plan = make_plan(config, shape)
  teacher = load_teacher(config, dataset.num_classes, dtype) if config.mode == "kd" else None
  train_idx, val_idx = holdout(dataset.labels("train"), int(config.get("val_examples", 0) or 0), int(config.seed))
  if len(train_idx) < bs:
    raise engine.RunError(f"batch_size {bs} exceeds the {len(train_idx)} training examples")
  batches = data_lib.Batches(len(train_idx), bs, seed=int(config.seed))
  spe = batches.steps_per_epoch
  total = spe * plan.epochs
  problem, state, teacher_vars = build(config, net, plan, spe, dataset.mean, dataset.std, bool(dataset.streaming),
                                       teacher[1] if teacher else None)
  state = engine.replicate(run_, state)
  teacher_vars = engine.replicate(run_, teacher_vars) if teacher_vars is not None else None
  fp = engine.fingerprint(config, FINGERPRINT_KEYS)
  fp.update(trained_shape={"widths": list(shape.widths), "blocks": list(shape.blocks)}, trained_epochs=plan.epochs)
  fp.update(augment_fingerprint(config, problem))
  ckpt = engine.open_checkpoints(run_, fp)
  state, meta, start = engine.restore(run_, ckpt, state)
  if start:
    log.info("resuming at step %d of %d", start, total)
  macs = cost_lib.count(shape)
  full_macs = cost_lib.count(shapes.full_shape(shape)).macs
  log.info("%s: %s, %d MACs (%.3f of unpruned), %d params; %d epochs of %d steps, warmup %d", config.mode,
           config.get("shape") or config.get("model"), macs.macs, macs.macs / full_macs, macs.params, plan.epochs,
           spe, plan.warmup_epochs)
  step_fn, compile_s = compile_step(problem, run_.mesh, state, bs, dataset.image_size, teacher_vars)
  evaluate = functools.partial(engine.Evaluator, run_, dataset)
  test_eval = evaluate("test", np.arange(dataset.num_examples("test")), eval_bs, logits_fn(problem))
  val_eval = evaluate("train", val_idx, eval_bs, logits_fn(problem)) if len(val_idx) else None
  every = int(config.get("eval_every_epochs", 0) or 0)
  best = dict(meta.get("best") or {})
  images_before = int(meta.get("images", 0))
  clock = _Clock(float(meta.get("train_s", 0.0)))
  prefetch = data_lib.Prefetcher(
      lambda step: engine.device_batch(run_, dataset, "train", train_idx[batches.indices(step)], step), start,
      end_step=total)

  def variables(state):
    return {"params": state["params"], "stats": state["stats"]}

  def one_step(state, step):
    return step_fn(state, next(prefetch), teacher_vars)

  def on_epoch(state, epoch, averaged):
    out = {}
    with clock.exclude(state):
      if val_eval is not None:
        out["val_top1"], out["val_top5"] = val_eval(variables(state))
        if out["val_top1"] > best.get("val_top1", -1.0):
          best.update(epoch=epoch, val_top1=out["val_top1"], val_top5=out["val_top5"])
          save_model(run_.path(BEST_DIR), shape, state["params"], state["stats"], run_.is_main)
      if every and (epoch + 1) % every == 0 and epoch + 1 < plan.epochs:
        out["test_top1"], out["test_top5"] = test_eval(variables(state))  # monitoring only, never selection
    return out

  def save(state, step):
    with clock.exclude(state):
      ckpt.save(step, state, meta={"epoch": step // spe, "step": step, "best": best, "train_s": clock.seconds(),
                                   "images": images_before + (step - start) * bs}, force=True)

  loop = engine.make_loop(run_, config, total_steps=total, steps_per_epoch=spe, save=save, on_epoch=on_epoch)
  state = engine.drive(run_, loop, state, start, one_step, prefetch, ckpt)
  if state is None:
    return {"finished": False, "step": min(total, start + loop.stop_after)}
  train_s = clock.seconds()
  images = images_before + (total - start) * bs
  top1, top5 = test_eval(variables(state))
  if start < total or not engine.logged(run_, total, "test_top1"):  # also after a kill right after the last step
    run_.writer.write(total, {"test_top1": top1, "test_top5": top5}, epoch=plan.epochs - 1)
  save_model(run_.path(MODEL_DIR), shape, state["params"], state["stats"], run_.is_main)
  result = {"finished": True, "mode": config.mode, "recipe": config.get("recipe", ""), "test_top1": top1,
            "test_top5": top5, "macs": macs.macs, "params": macs.params, "flops_ratio": macs.macs / full_macs,
            "shape": shape.to_dict(), "shape_spec": config.get("shape") or config.get("model"),
            "model": config.get("model"), "dataset": dataset.name, "seed": int(config.seed),
            "epochs": plan.epochs, "steps": total, "batch_size": bs, "warmup_epochs": plan.warmup_epochs,
            "lr": plan.lr, "lr_schedule": plan.lr_schedule, "milestones": list(plan.milestones),
            "lr_per_epoch": plan.per_epoch, "official_tail": plan.official_tail,
            "budget": config.get("budget", "epochs"), "budget_ratio": plan.budget_ratio,
            "scratch_b_rule": config.get("scratch_b_rule", "cifar"), "color_augment": problem.color,
            "dtype": config.get("dtype", "float32"), "num_devices": int(run_.mesh.size),
            "wall_s": time.time() - t_start, "train_s": train_s, "compile_s": compile_s,
            "train_images_per_s": images / train_s if train_s > 0 else None}
  if config.mode == "kd":
    result.update(teacher=config.teacher, teacher_shape=teacher[0].to_dict(), kd_alpha=problem.kd_alpha,
                  kd_temperature=problem.kd_temperature,
                  teacher_test_top1=_read_json(os.path.join(config.teacher, "result.json")).get("test_top1"))
  if config.mode == "finetune":
    result["init_from"] = config.init_from
  if val_eval is not None:
    result["val_examples"] = len(val_idx)
    result["val_top1"], result["val_top5"] = val_eval(variables(state))
    if best:
      _, best_model = load_model(run_.path(BEST_DIR), dtype)
      best_vars = engine.replicate(run_, {"params": nnx.state(best_model, nnx.Param),
                                          "stats": nnx.state(best_model, nnx.BatchStat)})
      b1, b5 = test_eval(best_vars)
      result.update(best_epoch=best["epoch"], best_val_top1=best["val_top1"], best_test_top1=b1, best_test_top5=b5)
  if run_.is_main:
    engine.write_json(run_.path("result.json"), result)
  run_.writer.close()
  ckpt.close()
  return result
