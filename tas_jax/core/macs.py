"""Multiply-accumulates counted from a traced program (its jaxpr), for any JAX function.

The convention: every ``dot_general`` and every ``conv_general_dilated`` counts
its multiply-accumulates (output elements times the length of the contraction,
which for a grouped or depthwise conv is the kernel's per-group input depth
times its spatial size); everything else (adds, biases, normalisation,
activations, pooling, softmax) is free. Attention therefore costs its
projections plus the two token-by-token products, Q K^T and A V, each
``tokens^2 * width`` per image. Sub-programs are followed: jitted calls,
custom derivatives (their forward), remat, and ``scan`` bodies times their
length; a ``cond`` counts its most expensive branch. A ``while`` loop has no
static trip count and is refused.

This is the independent check of the exact counter of searchable networks
(:mod:`tas_jax.nets.searchable`): both must agree on every exported network.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


class CountError(ValueError):
  """A program whose multiply-accumulates cannot be counted statically."""


def _dot_macs(eqn) -> int:
  lhs = eqn.invars[0].aval.shape
  (contract, _), _ = eqn.params["dimension_numbers"]
  out = math.prod(eqn.outvars[0].aval.shape)
  return out * math.prod(lhs[d] for d in contract)


def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature dim, in feature dim, spatial dims...)
  per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
  out = math.prod(eqn.outvars[0].aval.shape)
  # batch_group_count > 1 (a weight gradient written as a conv) splits the input depth as well.
  return out * per_output


def _sub_jaxprs(value) -> list:
  if isinstance(value, jax_core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, jax_core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def count_jaxpr(jaxpr) -> int:
  """Multiply-accumulates of a (closed) jaxpr under the module's convention."""
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_macs(eqn)
    elif name == "conv_general_dilated":
      total += _conv_macs(eqn)
    elif name == "while":
      raise CountError("a while loop has no static trip count; its multiply-accumulates cannot be counted")
    elif name == "cond":
      total += max(count_jaxpr(b) for b in eqn.params["branches"])
    elif name == "scan":
      total += eqn.params["length"] * count_jaxpr(eqn.params["jaxpr"])
    elif name in ("custom_vjp_call", "custom_vjp_call_jaxpr"):
      sub = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
      total += count_jaxpr(sub)
    else:
      # jit (pjit), custom_jvp_call, remat, closed_call: one sub-program each, run once.
      subs = [j for key, v in eqn.params.items() if key not in ("jvp_jaxpr_fun", "jvp_jaxpr_thunk", "bwd")
              for j in _sub_jaxprs(v)]
      total += sum(count_jaxpr(j) for j in subs[:1])
  return total


def count(fn: Callable, *args: Any, **kwargs: Any) -> int:
  """Multiply-accumulates of ``fn(*args, **kwargs)``, traced abstractly (nothing is computed).

  Arguments may be arrays or ``jax.ShapeDtypeStruct``. Example::

    count(lambda x, w: x @ w, jax.ShapeDtypeStruct((1, 8), "float32"), jnp.zeros((8, 4)))  # 32
  """
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
