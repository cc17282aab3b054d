"""What a network costs: the exact counter, TAS's expected cost E and discrete cost F, and the cost loss.

Counting convention (the official one, METHOD.md §3.1): MACs are the
multiply-accumulates of conv and linear layers only, a conv costing
k*k*C_in*C_out*H_out*W_out and the classifier in*out + out (its bias included);
batch norm, ReLU, pooling and adds are free. FLOPs = 2 * MACs. Parameters are
every trainable parameter of the built network: conv kernels, batch-norm scales
and offsets, classifier weight and bias.

The pruned network follows METHOD.md §6.1: a kept block whose input and output
widths differ gets a 1x1 projection shortcut, and the first block of a stage
reads the output width of the last block kept in the previous stage.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax.core import space as space_lib
from tas_jax.core.shapes import Shape


@dataclasses.dataclass(frozen=True)
class Cost:
  macs: int
  params: int

  @property
  def flops(self) -> int:
    return 2 * self.macs


def shortcut_has_bn(shape_or_arch, block: str, stride: int) -> bool:
  """Whether a projection shortcut carries batch norm (METHOD.md §6.1 table)."""
  arch = shape_or_arch if isinstance(shape_or_arch, str) else shape_or_arch.arch
  if arch == "imagenet":
    return True
  return stride == 1 and block == "basic"


def count(shape: Shape) -> Cost:
  """Exact MACs and parameters of the pruned network ``shape`` describes."""
  lay = shape.layout
  stem = lay.convs[0]
  w0 = shape.widths[0]
  macs = stem.kernel**2 * shape.in_channels * w0 * stem.out_hw**2
  params = stem.kernel**2 * shape.in_channels * w0 + 2 * w0
  for b in lay.blocks:
    if b.index >= shape.blocks[b.stage]:
      continue
    cin, ws = shape.block_widths(b.stage, b.index)
    prev = cin
    for ci, w in zip(b.convs, ws):
      spec = lay.convs[ci]
      macs += spec.kernel**2 * prev * w * spec.out_hw**2
      params += spec.kernel**2 * prev * w + 2 * w
      prev = w
    if b.stride > 1 or cin != ws[-1]:
      macs += cin * ws[-1] * b.out_hw**2
      params += cin * ws[-1] + (2 * ws[-1] if shortcut_has_bn(shape, shape.block, b.stride) else 0)
  c = shape.out_width
  macs += c * shape.num_classes + shape.num_classes
  params += c * shape.num_classes + shape.num_classes
  return Cost(int(macs), int(params))


def macs(shape: Shape) -> int:
  return count(shape).macs


def params(shape: Shape) -> int:
  return count(shape).params


# ----------------------------------------------------------------------------- on-device costs of a search space

def _cost_terms(space: space_lib.SearchSpace, wdist, ddist, *, stage_input: str, projection: bool,
                bias: bool, tables=None) -> list:
  """The additive terms of a network's cost, for width and depth distributions.

  ``wdist`` [L, K] and ``ddist`` [S, Kd] are distributions over each conv's
  candidate widths and each stage's depth choices: softmax probabilities for
  the expected cost, one-hot integers for the discrete cost (where every MAC
  term is then an exact integer). MACs use products of expected widths
  (METHOD.md §3.2). ``stage_input="mixture"`` feeds a stage the depth-weighted
  width of the previous stage's candidate end blocks, as the pruned net does;
  ``"last"`` feeds it the last block's width, as the official code does.
  ``projection`` counts the 1x1 shortcut the pruned net adds to an identity
  block whose input and output widths differ.

  With ``tables`` (a :class:`tas_jax.latency.table.LatencyTables`) each conv
  costs the bilinear form p_in^T T p_out of its measured latencies instead,
  which is the exact expectation for independent widths.
  """
  lay = space.layout
  base = space.base
  cand = jnp.asarray(space.width_table, wdist.dtype)
  e_w = (wdist * cand).sum(-1)  # expected width of every conv
  survival = jnp.cumsum(ddist[:, ::-1], axis=1)[:, ::-1]  # P(depth index >= m)
  stem = lay.convs[0]
  if tables is None:
    terms = [stem.kernel**2 * stem.out_hw**2 * base.in_channels * e_w[0]]
  else:
    terms = [(wdist[0] * tables.stem).sum()]
  in_e, in_dist = e_w[0], wdist[0]
  for s in range(len(base.layers)):
    choices = [int(d) for d, ok in zip(space.depth_table[s], space.depth_mask[s]) if ok]
    ends = []
    for b in lay.stage_blocks(s):
      m = sum(d < b.index + 1 for d in choices)
      mult = 1 if b.index == 0 else survival[s, m]
      block_terms, prev, prev_dist = [], in_e, in_dist
      for ci in b.convs:
        spec = lay.convs[ci]
        if tables is None:
          block_terms.append(spec.kernel**2 * spec.out_hw**2 * prev * e_w[ci])
        else:
          block_terms.append(prev_dist @ tables.convs[ci] @ wdist[ci])
        prev, prev_dist = e_w[ci], wdist[ci]
      last = b.convs[-1]
      k = (b.stage, b.index)
      if b.stride > 1 or b.nominal_in != b.nominal_out:
        block_terms.append(b.out_hw**2 * in_e * e_w[last] if tables is None
                           else in_dist @ tables.shortcut[k] @ wdist[last])
      elif projection:  # same candidate list on both sides: P(in != out) weighted
        if tables is None:
          same = (in_dist * wdist[last] * cand[last] ** 2).sum()
          block_terms.append(b.out_hw**2 * (in_e * e_w[last] - same))
        else:
          block_terms.append(in_dist @ tables.projection[k] @ wdist[last])
      terms.extend(mult * t for t in block_terms)
      in_e, in_dist = e_w[last], wdist[last]
      if b.index + 1 in choices:
        ends.append(last)
    if stage_input == "mixture" and len(ends) > 1:
      q = ddist[s, : len(ends)]
      in_e = (q * e_w[jnp.array(ends)]).sum()
      in_dist = (q[:, None] * wdist[jnp.array(ends)]).sum(0)
  if tables is None:
    terms.append(in_e * base.num_classes)
    if bias:
      terms.append(jnp.asarray(base.num_classes, wdist.dtype))
  else:
    terms.append((in_dist * tables.head).sum())
  return terms


def table_cost(space: space_lib.SearchSpace, tables, width_dist, depth_dist):
  """Latency predicted from measured per-conv tables (seconds), differentiable in the distributions.

  With softmax probabilities it is the expected latency (exact for
  independent widths); with one-hot distributions the predicted latency of
  that shape. Counts what the pruned net runs: projection shortcuts and the
  depth-weighted widths after truncated stages.
  """
  terms = _cost_terms(space, width_dist.astype(jnp.float32), depth_dist.astype(jnp.float32),
                      stage_input="mixture", projection=True, bias=False, tables=tables)
  return tables.scale * sum(terms) + tables.offset


def expected_cost(space: space_lib.SearchSpace, width_probs, depth_probs, exact: bool = True):
  """E(alpha, beta) of METHOD.md §3.2 in MACs, differentiable in both distributions.

  ``width_probs`` = softmax(alpha) [L, K] and ``depth_probs`` = softmax(beta)
  [S, Kd] (plain softmax, no Gumbel noise). E[C_out,l] = sum_j p_l[j] c_l[j];
  a conv costs k^2 H W E[C_in] E[C_out]; block l of stage s is weighted by its
  survival probability sum_{k: d_k >= l} P_s[k].

  ``exact=True`` (default) also counts the projection shortcut a pruned net
  adds where a block's widths differ, feeds each stage the depth-weighted
  width of the previous stage, and counts the classifier bias, so that at
  one-hot distributions E equals :func:`count`. ``exact=False`` is the official
  formula, which misses all three.
  """
  kw = dict(stage_input="mixture", projection=True, bias=True) if exact else \
      dict(stage_input="last", projection=False, bias=False)
  return sum(_cost_terms(space, width_probs.astype(jnp.float32), depth_probs.astype(jnp.float32), **kw))


def argmax_indices(space: space_lib.SearchSpace, width_logits, depth_logits):
  """Candidate index of the argmax shape (METHOD.md §5), masked candidates excluded."""
  neg = jnp.finfo(jnp.float32).min
  wi = jnp.argmax(jnp.where(space.width_mask, width_logits, neg), axis=-1)
  di = jnp.argmax(jnp.where(space.depth_mask, depth_logits, neg), axis=-1)
  return wi.astype(jnp.int32), di.astype(jnp.int32)


def discrete_cost(space: space_lib.SearchSpace, width_idx, depth_idx, exact: bool = True):
  """F(A) of METHOD.md §3.3: the MACs of the shape given by candidate indices, on device.

  Computed in integers and returned as int32 ``[high, low]`` with MACs =
  high * 2**16 + low, exact even beyond 2**31 (use :func:`as_int` on the host,
  :func:`as_float` on device). ``exact=True`` equals :func:`count` of the
  pruned net; ``exact=False`` is the official F, which feeds a truncated
  stage's successor the recorded width of its dropped last block and leaves
  out the classifier bias.
  """
  wd = jax.nn.one_hot(width_idx, space.width_table.shape[1], dtype=jnp.int32)
  dd = jax.nn.one_hot(depth_idx, space.depth_table.shape[1], dtype=jnp.int32)
  terms = _cost_terms(space, wd, dd, stage_input="mixture" if exact else "last", projection=True, bias=exact)
  terms = jnp.stack([jnp.asarray(t, jnp.int32) for t in terms])
  return jnp.stack([(terms >> 16).sum(), (terms & 0xFFFF).sum()]).astype(jnp.int32)


def as_float(pair):
  """A discrete cost pair as float32, on device (relative error about 1e-7)."""
  return pair[0].astype(jnp.float32) * 65536.0 + pair[1].astype(jnp.float32)


def as_int(pair) -> int:
  """A discrete cost pair as an exact Python integer, on the host."""
  hi, lo = (int(v) for v in np.asarray(pair))
  return hi * 65536 + lo


# ----------------------------------------------------------------------------- the cost loss

BANDS = ("official", "paper")


def cost_band(target, max_cost, band: str = "official", tolerance: float = 0.05):
  """The band [low, high] the discrete cost should lie in (METHOD.md §3.4).

  ``official``: [R - t * MAX, R]; ``paper``: [(1 - t) R, (1 + t) R]; R = target.
  """
  if band == "official":
    return target - tolerance * max_cost, target
  if band == "paper":
    return (1 - tolerance) * target, (1 + tolerance) * target
  raise ValueError(f"unknown cost band {band!r}; expected one of {BANDS}")


def cost_loss(expected, discrete, target, max_cost, band: str = "official", tolerance: float = 0.05,
              weight: float = 2.0):
  """lambda * L_cost of METHOD.md §3.4: +log E above the band, -log E below it, 0 inside.

  The sign comes from the discrete cost F (not differentiable, decided on
  device with ``jnp.where``); the gradient flows through log E. ``discrete``
  is a float MAC count (see :func:`as_float`). Units cancel in the gradient.
  """
  low, high = cost_band(target, max_cost, band, tolerance)
  sign = jnp.where(discrete > high, 1.0, jnp.where(discrete < low, -1.0, 0.0))
  return weight * jax.lax.stop_gradient(sign) * jnp.log(expected)
