"""Optimisers of the bilevel search (METHOD.md §4.1), with PyTorch's coupled weight decay.

PyTorch's SGD and Adam add ``weight_decay * param`` to the gradient before
any moment is formed (L2 regularisation, not decoupled decay), and the
official code relies on that for both the network weights and the
architecture logits. Decay applies to every parameter, BN and biases included.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import optax

LearningRate = Union[float, Callable[[int], float]]


def weight_optimizer(
    lr_schedule: LearningRate,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> optax.GradientTransformation:
  """SGD with Nesterov momentum and coupled L2, as torch.optim.SGD (METHOD.md §4.1).

  Per step t, with d = g + wd * p:

    buf = momentum * buf + d            (buf starts at 0, so buf_1 = d_1)
    u   = d + momentum * buf  if nesterov else buf
    p   = p - lr(t) * u

  ``lr_schedule`` is a float or a schedule of the update count (0 first).
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(lr_schedule, momentum=momentum if momentum else None, nesterov=nesterov),
  )


def arch_optimizer(
    lr: LearningRate = 1e-3,
    b1: float = 0.5,
    b2: float = 0.999,
    weight_decay: float = 1e-3,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Adam with coupled L2 on the architecture logits, as torch.optim.Adam (METHOD.md §4.1).

  Per step t = 1, 2, ..., with d = g + wd * p:

    m = b1 * m + (1 - b1) * d,   v = b2 * v + (1 - b2) * d**2
    p = p - lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.adam(lr, b1=b1, b2=b2, eps=eps),
  )


def masked_update(tx: optax.GradientTransformation, grads, opt_state, params, mask) -> tuple[Any, Any]:
  """One step of ``tx`` that leaves the entries where ``mask`` is False untouched.

  PyTorch's optimisers skip a parameter whose gradient is None (one the
  forward did not use): no weight decay, no momentum step, no moment update.
  ``mask`` is a tree like ``params`` whose boolean leaves broadcast against
  them; where it is False the parameter keeps its value and every optimiser
  state entry shaped like the parameters (momentum, moments) keeps its value.
  Scalar state such as the step count advances as usual.

  Returns ``(new_params, new_opt_state)``.
  """
  updates, new_state = tx.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, mask)
  treedef = jax.tree.structure(params)

  def params_like(node) -> bool:
    return jax.tree.structure(node) == treedef

  def keep(new, old):
    if params_like(new):
      return jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new, old, mask)
    return new

  new_state = jax.tree.map(keep, new_state, opt_state, is_leaf=params_like)
  return optax.apply_updates(params, updates), new_state


def _is_bn_scale(path) -> bool:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return len(names) >= 2 and names[-2:] == ["bn", "scale"]


def bn_scale_mask(params) -> Any:
  """A tree like ``params`` (an ``nnx.State`` of ``nnx.Param``): True at every batch-norm scale."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _is_bn_scale(p), params)


def bn_l1_penalty(params, strength: float) -> jax.Array:
  """``strength * sum |gamma|`` over every batch-norm scale: Network Slimming's sparsity term, for a loss."""
  leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if _is_bn_scale(p)]
  return strength * sum(jnp.abs(x).sum() for x in leaves)


def bn_l1_subgradient(strength: float) -> optax.GradientTransformation:
  """Adds ``strength * sign(gamma)`` to the gradient of every batch-norm scale (the penalty's subgradient).

  Chain it before the optimiser (``optax.chain(bn_l1_subgradient(s), tx)``);
  it reads the parameters, so ``update`` must get them.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("bn_l1_subgradient needs the parameters")
    out = jax.tree_util.tree_map_with_path(
        lambda p, g, w: g + strength * jnp.sign(w).astype(g.dtype) if _is_bn_scale(p) else g, updates, params)
    return out, state

  return optax.GradientTransformation(init, update)
