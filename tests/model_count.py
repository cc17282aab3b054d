"""Independent counts of a built network, for checking the analytic counter."""

import jax
import numpy as np
from flax import nnx


def traced_macs(model, image_size: int, in_channels: int = 3) -> int:
  """Multiply-accumulates of conv and dot ops in the traced forward, plus the classifier bias.

  Walks the jaxpr, so it sees the real input sizes each conv is applied to.
  """
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), np.float32)
  graphdef, state = nnx.split(model)

  def f(state, x):
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(x)

  jaxpr = jax.make_jaxpr(f)(state, x)
  total = 0

  def walk(jpr):
    nonlocal total
    for eqn in jpr.eqns:
      for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
        walk(sub)
      for p in eqn.params.values():
        if hasattr(p, "jaxpr") and hasattr(p, "consts"):
          walk(p.jaxpr)
        elif hasattr(p, "eqns"):
          walk(p)
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        out = eqn.outvars[0].aval
        kh, kw, cin, cout = rhs.shape  # HWIO
        total += int(np.prod(out.shape)) * kh * kw * cin // eqn.params["feature_group_count"]
      elif eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        contract = int(np.prod([lhs.shape[d] for d in lc]))
        total += int(np.prod(eqn.outvars[0].aval.shape)) * contract

  walk(jaxpr.jaxpr)
  return total + model.head.bias.shape[0]


def param_count(model) -> int:
  return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
