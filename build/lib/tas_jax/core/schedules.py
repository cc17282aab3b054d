"""Gumbel temperature and learning-rate schedules (METHOD.md §4.1, 4.2).

All schedules are jittable functions of a step or epoch that may be a traced
integer (or float) scalar, and return a float32 scalar.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Schedule = Callable[[Array], Array]

TAU_SCHEDULES = ("cosine", "linear")
LR_SCHEDULES = ("cosine", "multistep", "constant")


def _progress(epoch, total_epochs) -> Array:
  """epoch / total, clipped to [0, 1] so that no schedule wraps around past its end."""
  ratio = jnp.asarray(epoch, jnp.float32) / jnp.asarray(total_epochs, jnp.float32)
  return jnp.clip(ratio, 0.0, 1.0)


def tau_cosine(epoch, total_epochs, tau_max: float = 5.0, tau_min: float = 0.1) -> Array:
  """Official cosine temperature (METHOD.md §4.2).

    tau(e) = tau_min + (tau_max - tau_min) * (1 + cos(pi * e / total)) / 2

  The official driver sets it once per epoch with total = E + W. For
  E + W = 600: 5.0 at epoch 0, 4.67 at 100, 2.55 at 300, 0.43 at 500, 0.10 at 599.
  """
  r = _progress(epoch, total_epochs)
  return tau_min + (tau_max - tau_min) * (1.0 + jnp.cos(jnp.pi * r)) / 2.0


def tau_linear(epoch, total_epochs, tau_max: float = 10.0, tau_min: float = 0.1) -> Array:
  """Paper temperature, linear from tau_max to tau_min (METHOD.md §4.2, §8).

    tau(e) = tau_max - (tau_max - tau_min) * e / total
  """
  r = _progress(epoch, total_epochs)
  return tau_max - (tau_max - tau_min) * r


def tau_schedule(name: str, **kwargs) -> Callable[[Array, Array], Array]:
  """The temperature schedule ``name`` ("cosine": official, "linear": paper) (METHOD.md §4.2).

  Returns ``f(epoch, total_epochs) -> tau`` with ``kwargs`` (tau_max, tau_min)
  bound; each schedule keeps its own defaults for the ones not given.
  """
  table = {"cosine": tau_cosine, "linear": tau_linear}
  if name not in table:
    raise ValueError(f"unknown tau schedule {name!r}; valid: {', '.join(TAU_SCHEDULES)}")
  unknown = set(kwargs) - {"tau_max", "tau_min"}
  if unknown:
    raise TypeError(f"unexpected tau schedule arguments: {sorted(unknown)}")
  return functools.partial(table[name], **kwargs)


def lr_schedule(
    kind: str,
    base_lr: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    official_tail: bool = False,
) -> Schedule:
  """Per-step learning rate, an optax-style schedule of the update count (METHOD.md §4.1).

  With e = step // steps_per_epoch, i = step % steps_per_epoch, W = warmup_epochs
  and E = epochs:

  * every kind, e < W: base * (e + i / steps_per_epoch) / W, a per-iteration
    linear warmup;
  * "cosine", e >= W, per epoch: base * (1 + cos(pi * (e - W) / (E - W))) / 2.
    E counts the warmup epochs, so the run lasts E epochs and the decay spans
    the E - W epochs after the warmup; epochs past E get 0.
  * "cosine" with ``official_tail=True``, the official CosineAnnealingLR
    (T_max = E, eta_min = 0) exactly: base * (1 + cos(pi * (e - W) / E)) / 2
    for W <= e < E and 0 for e >= E. The official loop runs E + W epochs, so
    with W > 0 the last W epochs train at lr 0 and the cosine never gets
    near 0 before them: a quirk kept only to reproduce official runs.
  * "multistep", e >= W: base * gamma ** #{m in milestones : m <= e}, where
    milestones are absolute epoch indices.
  * "constant", e >= W: base.
  """
  if kind not in LR_SCHEDULES:
    raise ValueError(f"unknown lr schedule {kind!r}; valid: {', '.join(LR_SCHEDULES)}")
  if steps_per_epoch < 1 or epochs < 1 or warmup_epochs < 0:
    raise ValueError("need steps_per_epoch >= 1, epochs >= 1 and warmup_epochs >= 0")
  base = float(base_lr)
  warm = int(warmup_epochs)
  total = int(epochs)
  marks = jnp.asarray(sorted(int(m) for m in milestones), jnp.int32).reshape(-1)
  span = float(total) if official_tail else float(max(total - warm, 1))

  def after_warmup(e: Array) -> Array:
    if kind == "cosine":
      r = jnp.clip((e - warm).astype(jnp.float32) / span, 0.0, 1.0)
      lr = base * (1.0 + jnp.cos(jnp.pi * r)) / 2.0
      return jnp.where(e >= total, 0.0, lr) if official_tail else lr
    if kind == "multistep":
      passed = jnp.sum((marks <= e).astype(jnp.float32))
      return base * jnp.power(jnp.float32(gamma), passed)
    return jnp.full((), base, jnp.float32)

  def schedule(step) -> Array:
    step = jnp.asarray(step, jnp.int32)
    e = step // steps_per_epoch
    lr = after_warmup(e)
    if warm > 0:
      frac = (step % steps_per_epoch).astype(jnp.float32) / steps_per_epoch
      ramp = base * (e.astype(jnp.float32) + frac) / warm
      lr = jnp.where(e < warm, ramp, lr)
    return jnp.asarray(lr, jnp.float32)

  return schedule

