"""The training step of a concrete network (teacher, student, baseline), its plan and its learning rates.

Budgets (METHOD.md §7.2): ``budget="epochs"`` trains ``epochs`` epochs
whatever the shape (Scratch-E); ``budget="flops"`` trains
``int(epochs * MACs(unpruned) / MACs(shape))`` epochs with the cosine spread
over the new length and multistep milestones scaled by the same factor
(Scratch-B); ``scratch_b_rule="imagenet"`` follows Rethinking's ImageNet rule
instead (:func:`scratch_b_imagenet`).

One training step is one jitted pure function of ``{params, stats, opt,
step}``; augmentation runs on the device with keys from ``fold_in(seed,
step)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tas_jax import data as data_lib
from tas_jax.core import cost as cost_lib
from tas_jax.core import distill, optim, schedules, shapes
from tas_jax.nets import resnet
from tas_jax.runtime import parallel, runs
from tas_jax.runtime.settings import TrainSettings


# Configuration keys that change a run's trajectory: a checkpoint written under
# other values of these is refused on resume.
FINGERPRINT_KEYS = ("mode", "model", "shape", "teacher", "init_from", "budget", "kd_alpha", "kd_temperature",
                    "dataset", "num_train_examples", "data_seed", "val_examples", "epochs", "warmup_epochs",
                    "batch_size", "lr", "lr_schedule", "milestones", "gamma", "official_tail", "lr_per_epoch",
                    "momentum", "nesterov", "weight_decay", "label_smoothing", "finetune_epochs", "finetune_lr",
                    "finetune_lr_schedule", "finetune_milestones", "dtype", "seed")


def color_augment(cfg: TrainSettings, streaming: bool) -> bool:
  """Whether training adds TAS's ImageNet colour jitter and PCA lighting: ``auto`` turns them on for streamed sets.

  Streamed datasets are the ImageNet-style ones (random resized crops on the
  host), where the official TAS training adds both; CIFAR-style in-memory
  sets do not.
  """
  return cfg.color_augment == "on" or (cfg.color_augment == "auto" and bool(streaming))


def compute_dtype(cfg: TrainSettings):
  """The settings' dtype as a JAX dtype for the network's computation (None: float32)."""
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else None


def scratch_b_epochs(epochs: int, full_macs: int, macs: int) -> int:
  """Rethinking's Scratch-B length (METHOD.md §7.2), uncapped:

    epochs_B = int(epochs * MACs(unpruned) / MACs(pruned))
  """
  return int(epochs * full_macs / macs)


def scratch_b_imagenet(epochs: int, full_macs: int, macs: int) -> tuple[int, tuple[int, ...]]:
  """Rethinking's ImageNet Scratch-B (METHOD.md §7.2): ``(epochs_B, lr decay epochs)``.

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
    schedule_epochs: E of :func:`tas_jax.core.schedules.lr_schedule`.
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


def make_plan(cfg: TrainSettings | Mapping, shape: shapes.Shape) -> Plan:
  """The epochs and learning-rate schedule of a run of ``cfg`` on ``shape`` (see the module docstring)."""
  cfg = TrainSettings.resolve(cfg)
  ratio, tail = 1.0, False
  if cfg.mode == "finetune":
    epochs, lr, kind = cfg.finetune_epochs, cfg.finetune_lr, cfg.finetune_lr_schedule
    milestones, warm = cfg.finetune_milestones, 0
  else:
    epochs, lr, kind = cfg.epochs, cfg.lr, cfg.lr_schedule
    milestones, warm, tail = cfg.milestones, cfg.warmup_epochs, cfg.official_tail
    if cfg.budget == "flops" and cfg.mode in ("scratch", "kd"):
      full, mine = cost_lib.count(shapes.full_shape(shape)).macs, cost_lib.count(shape).macs
      if cfg.scratch_b_rule == "imagenet":
        new, milestones = scratch_b_imagenet(epochs, full, mine)
      else:
        new = scratch_b_epochs(epochs, full, mine)
        milestones = scale_milestones(milestones, epochs, new)
      ratio, epochs = full / mine, new
  if epochs < 1:
    raise runs.RunError(f"a run needs at least 1 epoch, got {epochs}")
  warm = effective_warmup(warm, epochs)
  return Plan(epochs + warm if tail else epochs, epochs, warm, lr, kind, tuple(int(m) for m in milestones),
              cfg.gamma, tail, ratio, cfg.lr_per_epoch)


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


def build(cfg: TrainSettings | Mapping, net: resnet.ResNet, plan: Plan, steps_per_epoch: int, mean=(0.5,) * 3,
          std=(0.25,) * 3, streaming: bool = False, teacher: resnet.ResNet | None = None):
  """The problem, the initial state ``{params, stats, opt, step}`` and the teacher's variables (or None)."""
  cfg = TrainSettings.resolve(cfg)
  lr_fn = plan.lr_fn(steps_per_epoch)
  tx = optim.weight_optimizer(lr_fn, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
  if cfg.bn_l1 > 0:  # Network Slimming's sparsity training: the penalty's subgradient, then the optimiser
    tx = optax.chain(optim.bn_l1_subgradient(cfg.bn_l1), tx)
  net.train()
  graphdef, params, stats = nnx.split(net, nnx.Param, nnx.BatchStat)
  net.eval()
  eval_graphdef, _, _ = nnx.split(net, nnx.Param, nnx.BatchStat)
  teacher_graphdef, teacher_vars = None, None
  if teacher is not None:
    teacher.eval()
    teacher_graphdef, tp, ts = nnx.split(teacher, nnx.Param, nnx.BatchStat)
    teacher_vars = {"params": tp, "stats": ts}
  problem = Problem(graphdef, eval_graphdef, tx, lr_fn, tuple(mean), tuple(std), bool(streaming), cfg.seed,
                    cfg.label_smoothing, teacher_graphdef, cfg.kd_alpha, cfg.kd_temperature,
                    color_augment(cfg, streaming))
  state = {"params": params, "stats": stats, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return problem, state, teacher_vars


def _augment(problem: Problem, key, images):
  if problem.color:
    return data_lib.augment_imagenet(key, images, problem.mean, problem.std, crop=not problem.streaming)
  if problem.streaming:  # cropped on the host already
    return data_lib.flip_and_normalize(key, images, problem.mean, problem.std)
  return data_lib.augment_cifar(key, images, problem.mean, problem.std)


def augment_fingerprint(cfg: TrainSettings, problem: Problem) -> dict:
  """Checkpoint fingerprint entries for choices added after the key list: present only when they change training.

  Runs that do not use them keep the fingerprint their checkpoints were
  written with, so they still resume.
  """
  out = {}
  if problem.color:
    out["color_augment"] = True
  if cfg.budget == "flops" and cfg.scratch_b_rule != "cifar":
    out["scratch_b_rule"] = cfg.scratch_b_rule
  if cfg.bn_l1 > 0:
    out["bn_l1"] = cfg.bn_l1
  return out


def mean_abs_gamma(params) -> float:
  """The mean ``|gamma|`` over every batch-norm scale: how far sparsity training has pushed them down."""
  mask = optim.bn_scale_mask(params)
  vals = [np.abs(np.asarray(x)).ravel() for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  return float(np.concatenate(vals).mean())


def train_step(problem: Problem, state, batch, teacher=None):
  """One SGD step on an augmented batch; pure, returns ``(new_state, metrics)``.

  Loss: cross-entropy (with ``label_smoothing``), or with a teacher
  :func:`tas_jax.core.distill.kd_loss`; the teacher runs in eval mode on the same
  augmented batch, outside the gradient (METHOD.md §6.3).
  """
  key = runs.step_key(problem.seed, state["step"])
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
  metrics = {"loss": loss, "ce": ce, "train_acc": distill.accuracy(logits, labels), "lr": problem.lr_fn(state["step"])}
  if t_logits is not None:
    metrics["kl"] = distill.kl_divergence(logits, t_logits, problem.kd_temperature)
    metrics["teacher_acc"] = distill.accuracy(t_logits, labels)
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
  """Eval-mode logits of ``{params, stats}`` for uint8 images, for :class:`tas_jax.runtime.evaluate.Evaluator`."""

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
    raise runs.RunError(f"val_examples={val_examples} leaves nothing of the {n} training examples")
  val = data_lib.balanced_subset(labels, val_examples, seed)
  mask = np.zeros(n, bool)
  mask[val] = True
  return np.flatnonzero(~mask), val
