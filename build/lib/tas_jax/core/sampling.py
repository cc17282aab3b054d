"""Gumbel sampling of width and depth candidates (METHOD.md §2.1).

Every function is pure, takes an explicit PRNG key where it is random, and is
jittable and vmappable. Candidates lie on the last axis unless an ``axis`` is
given. An optional boolean ``mask`` (True = valid candidate) lets rows with
fewer candidates share one padded array: masked candidates get probability
exactly 0, are never drawn while enough valid ones exist, and receive zero
(never NaN) gradient, whatever finite or non-finite value their logit holds.

Key contract (so that a reference can rebuild the randomness):

* ``gumbel_softmax(key, ...)`` perturbs with ``gumbel_noise(key, logits.shape)``;
* ``sample_widths(key, ...)`` splits ``k_soft, k_pick = jax.random.split(key)``,
  builds p̂ with ``gumbel_softmax(k_soft, ...)`` and ranks candidates with
  ``gumbel_noise(k_pick, logits.shape)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Default additive floor of the official multinomial draw (METHOD.md §2.1 item 3).
OFFICIAL_MULTINOMIAL_EPS = 1e-7


def _float_dtype(x: Array):
  return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32


def _row_mask(mask: Array | None, shape: tuple[int, ...]) -> Array | None:
  if mask is None:
    return None
  return jnp.broadcast_to(jnp.asarray(mask, dtype=bool), shape)


def _masked_log_softmax(x: Array, mask: Array | None, axis: int) -> Array:
  """log softmax over the valid entries; masked entries hold 0 (a filler).

  The filler is finite on purpose: callers re-apply the mask, and a finite
  filler keeps every backward product free of 0 * inf.
  """
  if mask is None:
    return jax.nn.log_softmax(x, axis=axis)
  x = jnp.where(mask, x, 0.0)
  peak = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  shifted = jnp.where(mask, x - peak, 0.0)
  total = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=axis, keepdims=True)
  lse = jnp.log(jnp.where(total > 0, total, 1.0))
  return jnp.where(mask, shifted - lse, 0.0)


def _masked_softmax(z: Array, mask: Array | None, axis: int) -> Array:
  """softmax over the valid entries; masked entries are exactly 0."""
  if mask is None:
    return jax.nn.softmax(z, axis=axis)
  z = jnp.where(mask, z, 0.0)
  peak = jnp.max(jnp.where(mask, z, -jnp.inf), axis=axis, keepdims=True)
  peak = lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  # Masked slots are set to the peak before exp so that exp never overflows
  # in a branch that `where` later discards (its gradient would be NaN).
  e = jnp.where(mask, jnp.exp(jnp.where(mask, z - peak, 0.0)), 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def gumbel_noise(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
  """Standard Gumbel noise g = -log(E), E = -log(U) ~ Exponential(1) (METHOD.md §2.1 item 1).

  U is uniform on [tiny, 1), so E lies in (0, -log(tiny)] and g is always
  finite; this replaces the official redraw-until-finite loop. The noise is
  computed in at least float32 and cast to ``dtype`` at the end.
  """
  compute = jnp.promote_types(dtype, jnp.float32)
  u = jax.random.uniform(key, shape, compute, minval=jnp.finfo(compute).tiny, maxval=1.0)
  return (-jnp.log(-jnp.log(u))).astype(dtype)


def _gumbel_logits(key: Array, logits: Array, tau, mask: Array | None, axis: int) -> Array:
  """z = (log_softmax(logits) + g) / tau; masked entries hold 0 (METHOD.md §2.1 item 2)."""
  logits = jnp.asarray(logits)
  logits = logits.astype(_float_dtype(logits))
  logp = _masked_log_softmax(logits, mask, axis)
  g = gumbel_noise(key, logits.shape, logits.dtype)
  z = (logp + g) / jnp.asarray(tau, logits.dtype)
  return z if mask is None else jnp.where(mask, z, 0.0)


def gumbel_softmax(key: Array, logits: Array, tau, mask: Array | None = None, axis: int = -1) -> Array:
  """Soft Gumbel-softmax p̂ = softmax((log_softmax(logits) + g) / tau) (METHOD.md §2.1 item 2).

  ``g = gumbel_noise(key, logits.shape)``. With ``mask``, both softmaxes run
  over the valid candidates only and masked entries of p̂ are exactly 0.
  """
  logits = jnp.asarray(logits)
  mask = _row_mask(mask, logits.shape)
  z = _gumbel_logits(key, logits, tau, mask, axis)
  return _masked_softmax(z, mask, axis)


def sample_widths(
    key: Array,
    logits: Array,
    tau,
    k: int = 2,
    mask: Array | None = None,
    eps: float = OFFICIAL_MULTINOMIAL_EPS,
) -> tuple[Array, Array]:
  """Draw k distinct width candidates per row and their re-normalised weights (METHOD.md §2.1 items 1-4).

  For logits [..., n] (rows independent):

    p̂ = softmax(z),  z = (log_softmax(logits) + g1) / tau
    I  = k draws without replacement from Multinomial(p̂ + eps)
    w  = softmax(z[I]) = p̂[I] / sum(p̂[I])

  The draw without replacement uses the Gumbel-top-k trick: the k largest
  of log(p̂ + eps) + g2, with g2 a second, independent Gumbel noise, follow
  exactly the law of successive multinomial draws without replacement.
  ``eps`` defaults to the official 1e-7 floor; ``eps=0`` draws from p̂
  itself. The ranking runs in log space (log(p̂ + eps) = logaddexp(log p̂,
  log eps)), so candidates whose p̂ underflows are still ranked correctly.

  I is computed under stop_gradient; w is differentiable w.r.t. logits (and
  tau). Masked candidates are drawn only when a row has fewer than k valid
  ones, and then carry weight exactly 0.

  Returns (indices int32 [..., k], weights [..., k]).
  """
  logits = jnp.asarray(logits)
  n = logits.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"k must lie in [1, {n}], got {k}")
  mask = _row_mask(mask, logits.shape)
  k_soft, k_pick = jax.random.split(key)
  z = _gumbel_logits(k_soft, logits, tau, mask, -1)

  zs = lax.stop_gradient(z)
  log_p = _masked_log_softmax(zs, mask, -1)
  if eps > 0:
    log_p = jnp.logaddexp(log_p, jnp.log(jnp.asarray(eps, log_p.dtype)))
  score = log_p + gumbel_noise(k_pick, logits.shape, log_p.dtype)
  if mask is not None:
    score = jnp.where(mask, score, -jnp.inf)
  _, idx = lax.top_k(score, k)
  idx = lax.stop_gradient(idx.astype(jnp.int32))

  z_sel = jnp.take_along_axis(z, idx, axis=-1)
  mask_sel = None if mask is None else jnp.take_along_axis(mask, idx, axis=-1)
  return idx, _masked_softmax(z_sel, mask_sel, -1)


def sample_depth(key: Array, logits: Array, tau, mask: Array | None = None) -> Array:
  """Soft Gumbel-softmax q̂ over all depth candidates, last axis (METHOD.md §2.1 item 5, 2.5).

  q̂ = softmax((log_softmax(beta) + g) / tau): neither hard nor top-k.
  """
  return gumbel_softmax(key, logits, tau, mask=mask, axis=-1)

