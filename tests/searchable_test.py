"""Searchable layers (tas_jax.nets.searchable) against references written from TAS's formulas.

References: enumeration of every joint choice for the expected cost (each choice
exported and counted from its traced program), numpy batch norm and segment
averages for channel-wise interpolation, the sampling module's documented keys
for the draws.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import prototype_search
from flax import nnx

from tas_jax.core import cost, macs, sampling
from tas_jax.nets import cost_graph, searchable as S, surgery
from tas_jax.steps.searchable import Search

RATIOS = (0.5, 1.0)


class Block(nnx.Module):

  def __init__(self, stream, rngs, ratios=RATIOS):
    hidden = S.Width(4, ratios=ratios, rngs=rngs)
    self.a = S.Conv(stream, hidden, 3, rngs=rngs)
    self.b = S.Conv(hidden, stream, 3, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(x + self.b(jax.nn.relu(self.a(x))))


class Tiny(nnx.Module):
  """A stem, a stack of two residual blocks (depth 1 or 2), a 1x1 conv reading and writing one group, a head."""

  def __init__(self, rngs, ratios=RATIOS):
    stream = S.Width(6, ratios=ratios, rngs=rngs)
    self.stem = S.Conv(3, stream, 3, rngs=rngs)
    self.stack = S.Stack([Block(stream, rngs, ratios), Block(stream, rngs, ratios)], rngs=rngs)
    self.mix = S.Conv(stream, stream, 1, stride=2, rngs=rngs)
    self.head = S.Dense(stream, 5, rngs=rngs)

  def __call__(self, x):
    x = self.stack(jax.nn.relu(self.stem(x)))
    return self.head(jax.nn.relu(self.mix(x)).mean(axis=(1, 2)))


def _randomise(model, seed):
  for i, (_, node) in enumerate(S.searched(model)):
    node.logits.set_value(2.0 * jax.random.normal(jax.random.key(seed * 100 + i), node.logits.shape))


IMAGE = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)


@pytest.fixture(scope="module")
def tiny():
  net = Tiny(nnx.Rngs(0))
  _randomise(net, 1)
  return net


def test_expected_cost_is_the_mean_over_every_joint_choice(tiny):
  """Catches E built from products of expected widths where a group appears twice (E[c]^2 for E[c^2]), a depth
  weight applied to the wrong blocks (P(depth = j) for P(depth > j)), or a layer's cost left out."""
  graph = cost_graph.trace(tiny, IMAGE)
  searched = S.searched(tiny)
  probs = {p: np.asarray(jax.nn.softmax(n.logits[...]), np.float64) for p, n in searched}
  total = 0.0
  for combo in itertools.product(*[range(len(probs[p])) for p, _ in searched]):
    choice = dict(zip([p for p, _ in searched], combo))
    weight = np.prod([probs[p][i] for p, i in choice.items()])
    total += weight * macs.count(surgery.export_searchable(tiny, choice), IMAGE)
  np.testing.assert_allclose(float(graph.expected(tiny)), total, rtol=1e-5)


def test_discrete_cost_and_count_are_the_exported_networks_macs(tiny):
  """Catches the argmax cost counting the nominal widths, the whole stack, or a different layer set than the
  concrete network runs."""
  graph = cost_graph.trace(tiny, IMAGE)
  exported = surgery.export_searchable(tiny)
  traced = macs.count(exported, IMAGE)
  assert graph.count(tiny) == traced
  assert float(graph.discrete(tiny)) == pytest.approx(traced, rel=1e-6)
  assert graph.full(tiny) == macs.count(surgery.export_searchable(tiny, {p: len(n.logits[...]) - 1
                                                               for p, n in S.searched(tiny)}), IMAGE)


def test_argmax_supernet_equals_exported_network(tiny):
  """Catches export slicing the wrong filters or the wrong candidate's batch norm, or the argmax forward
  leaking channels beyond the chosen width."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  net = nnx.clone(tiny)
  for layer in [n for _, n in S.nodes(net, S.Layer) if n.norm]:  # distinct statistics per candidate
    k = jax.random.key(len(layer.mean[...].ravel()))
    layer.mean.set_value(0.1 * jax.random.normal(k, layer.mean.shape))
    layer.var.set_value(jax.random.uniform(k, layer.var.shape, minval=0.5, maxval=2.0))
    layer.scale.set_value(jax.random.uniform(jax.random.fold_in(k, 1), layer.scale.shape, minval=0.5, maxval=1.5))
  exported = surgery.export_searchable(net)
  S.use_argmax(net)
  net.eval()
  exported.eval()
  run = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(run(net, x), run(exported, x), rtol=1e-5, atol=1e-5)


def _segment_average(z, c_in, c_out, channels):
  """CWI from the formula: out[o] = mean z[floor(o c_in / c_out) : ceil((o + 1) c_in / c_out)], 0 beyond c_out."""
  out = np.zeros(z.shape[:-1] + (channels,))
  for o in range(c_out):
    lo, hi = (o * c_in) // c_out, -(-((o + 1) * c_in) // c_out)
    out[..., o] = z[..., lo:hi].mean(-1)
  return out


def test_search_forward_of_a_conv_matches_the_formula():
  """Catches per-candidate norms sharing statistics or parameters, CWI to the wrong width, weights not
  re-normalised over the drawn widths, running statistics updated for candidates not drawn, or draws
  not following the documented keys."""
  rngs = nnx.Rngs(3)
  w = S.Width(10, ratios=(0.3, 0.5, 0.8, 1.0), rngs=rngs)
  conv = S.Conv(4, w, 3, rngs=rngs)
  k = len(w.candidates)
  conv.scale.set_value(jax.random.uniform(jax.random.key(1), (k, 10), minval=0.5, maxval=1.5))
  conv.offset.set_value(jax.random.normal(jax.random.key(2), (k, 10)))
  w.logits.set_value(jnp.array([0.3, -0.2, 0.5, 0.1]))
  x = np.asarray(jax.random.normal(jax.random.key(4), (3, 5, 5, 4)), np.float64)
  key, tau = jax.random.key(7), 2.0
  S.sample(conv, key, tau)
  idx, weight = sampling.sample_widths(jax.random.fold_in(jax.random.split(key)[0], 0), w.logits[...], tau, 2)
  np.testing.assert_array_equal(w.idx, idx)
  got = nnx.jit(lambda m, x: m(x))(conv, jnp.asarray(x, jnp.float32))  # one compile, not one per op

  y = np.asarray(jax.lax.conv_general_dilated(x, np.asarray(conv.kernel[...], np.float64), (1, 1),
                                              ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
  m, v = y.mean((0, 1, 2)), y.var((0, 1, 2))
  widths = [w.candidates[int(i)] for i in idx]
  c_star = max(widths)
  want = 0
  for j, i in enumerate(np.asarray(idx)):
    z = (y - m) / np.sqrt(v + 1e-5) * np.asarray(conv.scale[...][i]) + np.asarray(conv.offset[...][i])
    want = want + float(weight[j]) * _segment_average(z[..., :widths[j]], widths[j], c_star, 10)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  n = 3 * 5 * 5
  drawn = np.isin(np.arange(k), np.asarray(idx))
  np.testing.assert_allclose(np.asarray(conv.mean[...])[drawn], np.tile(0.1 * m, (2, 1)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(conv.var[...])[drawn], np.tile(0.9 + 0.1 * v * n / (n - 1), (2, 1)),
                             rtol=1e-4)
  assert (np.asarray(conv.mean[...])[~drawn] == 0).all() and (np.asarray(conv.var[...])[~drawn] == 1).all()


def test_stack_mixes_candidate_depths_with_soft_weights():
  """Catches a hard choice where TAS mixes softly, mixing weights applied to the wrong depths, or a stack
  that drops a block every depth choice keeps."""
  rngs = nnx.Rngs(0)
  blocks = [S.Dense(6, 6, rngs=rngs) for _ in range(3)]
  stack = S.Stack(blocks, choices=(1, 3), rngs=rngs)
  stack.logits.set_value(jnp.array([0.4, -0.1]))
  x = jax.random.normal(jax.random.key(1), (2, 6))
  key = jax.random.key(5)
  S.sample(stack, key, 1.5)
  q = sampling.sample_depth(jax.random.fold_in(jax.random.split(key)[1], 0), stack.logits[...], 1.5)
  y1 = blocks[0](x)
  y3 = blocks[2](blocks[1](y1))
  np.testing.assert_allclose(stack(x), q[0] * y1 + q[1] * y3, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def search_of_tiny():
  """One search problem (and one compiled step) for the tests that need a step but no particular target."""
  net = Tiny(nnx.Rngs(1), ratios=S.WIDTH_RATIOS)
  search = Search.create(net, IMAGE, target_ratio=0.5, cost_weight=4.0, arch_tx=optax.adam(0.05))
  return net, search, jax.jit(search.step)


def test_search_moves_the_cost_into_its_band_and_learns(search_of_tiny):
  """Catches a weight step that does not learn through the search forward (the loss stays at chance) and an
  export outside the band after fitting; the direction of the cost loss is the next test's."""
  net, search, step = search_of_tiny
  state, first, m = prototype_search(search, net, 8, 5, noise=0.3, step=step)
  low, high = search.band_limits()
  assert float(m["weight_loss"]) < min(float(first["weight_loss"]), np.log(5)) - 0.2
  exported = search.export(state)
  assert low <= macs.count(exported, IMAGE) <= high


@pytest.mark.parametrize("start, scale, target", [pytest.param(-1, 1.0, 0.4, marks=pytest.mark.slow),
                                                  pytest.param(0, 1.0, 0.8, marks=pytest.mark.slow),
                                                  (-1, 0.02, 0.6)])
def test_architecture_step_moves_the_expected_cost_towards_the_target(start, scale, target):
  """Catches a cost loss with its sign reversed or decided by the expected instead of the discrete cost, or
  an architecture step that ignores the cost: from the widest (narrowest) argmax the expected cost must fall
  (rise) towards a target below (above) it. In the third case the logits are almost uniform: the argmax is
  the widest network (above the band) while the expected cost lies below the band, so only a sign taken from
  the discrete cost makes E fall."""
  net = Tiny(nnx.Rngs(2), ratios=S.WIDTH_RATIOS)
  for _, node in S.searched(net):
    node.logits.set_value(scale * jax.nn.one_hot(start % node.logits.shape[0], node.logits.shape[0]))
  search = Search.create(net, IMAGE, target_ratio=target, cost_weight=50.0)
  if scale < 1:
    low, high = search.band_limits()
    graph = search.graph
    assert float(graph.expected(net)) < low and float(graph.discrete(net)) > high
  state = search.init(net)
  step = jax.jit(search.step)
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  y = jnp.arange(8) % 5
  ratios = []
  for i in range(3):
    state, m = step(state, (x, y), (x, y), jax.random.key(i), 1.0)
    ratios.append(float(m["expected_ratio"]))
  if start == -1:
    assert ratios[2] < ratios[0] and float(m["discrete_ratio"]) > target
  else:
    assert ratios[2] > ratios[0] and float(m["discrete_ratio"]) < target


def test_bad_declarations_are_refused():
  rngs = nnx.Rngs(0)
  with pytest.raises(ValueError, match="depthwise"):
    S.Conv(S.Width(8, rngs=rngs), S.Width(8, rngs=rngs), 3, depthwise=True, rngs=rngs)
  with pytest.raises(ValueError, match="depth choices"):
    S.Stack([S.Dense(4, 4, rngs=rngs)] * 2, choices=(1,), rngs=rngs)
  with pytest.raises(ValueError, match="outside what"):
    Search.create(Tiny(rngs), IMAGE, target_ratio=0.01)
  with pytest.raises(ValueError, match="reads 8 channels"):
    S.Conv(S.Width(8, rngs=rngs), 4, 3, rngs=rngs)(jnp.zeros((1, 4, 4, 3)))


@pytest.mark.slow
def test_custom_model_example_runs_in_three_minutes():
  """Catches the README's own-network example breaking (an API it uses renamed) or slowing past its promise."""
  import os, subprocess, sys, time
  from conftest import ROOT
  start = time.time()
  out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "custom_model.py")], capture_output=True,
                       text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  assert time.time() - start < 180
  acc = float(out.stdout.rsplit("test accuracy after the search:", 1)[1].split()[0])
  assert acc > 0.1


@pytest.mark.slow
def test_step_sharded_over_eight_devices_equals_one_device():
  """Catches a step whose statistics or gradients depend on how the batch is split over devices (per-shard batch
  norm, a missing all-reduce): with the batch sharded over 8 devices and everything else replicated, two
  iterations must give the single-device state."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  net = Tiny(nnx.Rngs(4))
  search = Search.create(net, IMAGE, target_ratio=0.6)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  y = jnp.arange(16) % 5
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  results = []
  for shard in (False, True):
    state = search.init(net)
    batch = (x, y)
    if shard:
      state = jax.device_put(state, rep)
      batch = jax.device_put(batch, data)
    step = jax.jit(search.step)
    for i in range(2):
      state, _ = step(state, batch, batch, jax.random.key(i), 2.0)
    results.append(state)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_a_described_choice_rebuilds_the_same_network(tiny):
  """Catches a record that cannot be read back into the network it describes (a path renamed, an index stored
  for a width), and a foreign or damaged record accepted silently."""
  choice = {p: 0 for p, _ in S.searched(tiny)}
  record = S.describe(tiny, choice)
  rebuilt = Tiny(nnx.Rngs(0))  # the same architecture, other weights
  assert S.choice_of(rebuilt, record) == choice
  assert macs.count(surgery.export_searchable(rebuilt, S.choice_of(rebuilt, record)), IMAGE) == macs.count(surgery.export_searchable(tiny, choice), IMAGE)
  name = next(iter(record))
  with pytest.raises(ValueError, match="not one of its candidates"):
    S.choice_of(rebuilt, {**record, name: 999})
  with pytest.raises(ValueError, match="names no width"):
    S.choice_of(rebuilt, {k: v for k, v in record.items() if k != name})
  with pytest.raises(ValueError, match="does not search"):
    S.choice_of(rebuilt, {**record, "other/out": 4})
  with pytest.raises(ValueError, match="not one of its candidates"):
    S.choice_of(rebuilt, {**record, name: record[name] + 0.5})


def test_an_export_outside_an_unreachable_band_is_reported(tiny, caplog):
  """Catches an export silently out of its band when the space has no network inside it."""
  graph = cost_graph.trace(tiny, IMAGE)
  full = graph.full(tiny)
  searched = S.searched(tiny)
  costs = sorted({graph.count(tiny, dict(zip([p for p, _ in searched], c))) / full
                  for c in itertools.product(*[range(len(n.logits[...])) for _, n in searched])})
  gap = next((a, b) for a, b in zip(costs, costs[1:]) if b - a > 0.08)  # nothing in (a, b)
  search = Search.create(tiny, IMAGE, target_ratio=gap[1] - 0.01)
  with caplog.at_level("WARNING", logger="tas_jax"):
    search.export(search.init(tiny))
  assert "no network the fitting reaches lies in the cost band" in caplog.text


def test_weight_step_leaves_the_norms_of_undrawn_candidates_untouched(search_of_tiny):
  """Catches weight decay or momentum moving the norm of a candidate the forward did not draw (the official
  code's per-candidate norms get no gradient then, and PyTorch skips them), and a mask that also freezes
  the drawn ones."""
  net, search, step = search_of_tiny
  state = search.init(net)
  x = jax.random.normal(jax.random.key(0), (32, 8, 8, 3))
  batch = (x, jnp.arange(32) % 5)
  key = jax.random.key(3)
  new, _ = step(state, batch, batch, key, 2.0)
  model = search.model(state)
  model.train()
  S.sample(model, jax.random.split(key)[0], 2.0, search.num_sampled)  # the weight step's draw
  drawn = np.zeros(len(model.stem.out.candidates), bool)
  drawn[np.asarray(model.stem.out.idx)] = True
  before = np.asarray(state["weights"]["stem"]["scale"][...])
  after = np.asarray(new["weights"]["stem"]["scale"][...])
  np.testing.assert_array_equal(after[~drawn], before[~drawn])
  assert (np.abs(after[drawn] - before[drawn]).max(axis=1) > 0).all()


def test_fitting_a_band_nothing_reaches_keeps_the_cheaper_side():
  """Catches band fitting that, finding nothing inside the band, ends on the network above it (here the
  whole one) instead of the last choice within the target."""
  rngs = nnx.Rngs(0)
  stack = S.Stack([S.Dense(10, 10, rngs=rngs), S.Dense(10, 10, rngs=rngs)], rngs=rngs)
  stack.logits.set_value(jnp.array([0.0, 1.0]))  # argmax: both blocks, 200 MACs
  graph = cost_graph.trace(stack, jax.ShapeDtypeStruct((1, 10), jnp.float32))
  assert graph.count(stack, graph.fit(stack, 140, 160)) == 100


def test_declarations_the_trace_cannot_use_are_refused():
  """Catches a searched group no layer writes (its channels would never be cut, its export would fail) and a
  stack whose candidate outputs differ in shape, each passing silently or failing deep inside JAX."""
  rngs = nnx.Rngs(0)

  class Unwritten(nnx.Module):
    def __init__(self):
      self.w = S.Width(8, rngs=rngs)
      self.fc = S.Dense(self.w, 4, rngs=rngs)
    def __call__(self, x):
      return self.fc(x)
  with pytest.raises(ValueError, match="no searchable layer writes it"):
    cost_graph.trace(Unwritten(), jax.ShapeDtypeStruct((1, 8), jnp.float32))
  shrink = S.Stack([S.Conv(3, 3, 3, stride=2, rngs=rngs), S.Conv(3, 3, 3, stride=2, rngs=rngs)], rngs=rngs)
  with pytest.raises(ValueError, match="differ in shape"):
    shrink(jnp.zeros((1, 8, 8, 3)))


class Widening(nnx.Module):
  """A block writing a group of its own: a conv, then the left-aligned add of its input (TAS's ResNet block)."""

  def __init__(self, cin, out, rngs):
    self.cin, self.out = cin, out
    self.conv = S.Conv(cin, out, 3, rngs=rngs)

  def __call__(self, xw):
    x, w = xw
    y = self.conv(x)
    S.record(x.shape[1] * x.shape[2], self.cin, self.out, kind="projection")
    return y + x, jnp.maximum(w, self.out.drawn_widths().max())


class Chain(nnx.Module):
  """A stem and a stack of two blocks that write different groups, read after the stack by a head."""

  def __init__(self, rngs):
    g = [S.Width(4, ratios=(0.5, 1.0), rngs=rngs) for _ in range(3)]
    self.stem = S.Conv(3, g[0], 3, rngs=rngs)
    self.stack = S.Stack([Widening(g[0], g[1], rngs), Widening(g[1], g[2], rngs)], rngs=rngs)
    self.head = S.Dense(S.StackOutput(self.stack, [g[1], g[2]]), 5, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    x, _ = self.stack((x, self.stem.out.drawn_widths().max()))
    return self.head(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("official", [False, True])
def test_stack_of_different_groups_costs_its_depth_mixed_output_and_projections(official):
  """Catches the layer after a stack reading the last block's width where the chosen depth ends earlier (or
  reading it in official mode, where it should), a projection counted where the added widths match (or left
  out where they differ), and projections kept in the official E."""
  net = Chain(nnx.Rngs(0))
  _randomise(net, 3)
  graph = cost_graph.trace(net, IMAGE, official=official)
  groups = [net.stem.out] + [b.out for b in net.stack.blocks]
  p = [np.asarray(jax.nn.softmax(g.logits[...]), np.float64) for g in groups]
  q = np.asarray(jax.nn.softmax(net.stack.logits[...]), np.float64)
  hw, total = 8 * 8, 0.0
  for i0, i1, i2, d in itertools.product(range(2), range(2), range(2), range(2)):
    c0, c1, c2 = groups[0].candidates[i0], groups[1].candidates[i1], groups[2].candidates[i2]
    macs_of = 9 * hw * 3 * c0 + 9 * hw * c0 * c1 + (0 if official else hw * c0 * c1 * (c0 != c1))
    if d == 1:
      macs_of += 9 * hw * c1 * c2 + (0 if official else hw * c1 * c2 * (c1 != c2))
    macs_of += 5 * (c2 if official or d == 1 else c1)
    total += p[0][i0] * p[1][i1] * p[2][i2] * q[d] * macs_of
  np.testing.assert_allclose(float(graph.expected(net)), total, rtol=1e-5)


def test_stack_of_different_groups_mixes_its_ends_interpolated_to_the_widest():
  """Catches the ends of different widths summed without channel-wise interpolation, or mixed by the wrong
  weights."""
  net = Chain(nnx.Rngs(1))
  _randomise(net, 4)
  net.eval()
  for g, i in zip([net.stem.out] + [b.out for b in net.stack.blocks], (0, 0, 1)):  # ends 2 and 4 wide
    g.idx, g.weight, g.hard = jnp.array([i]), jnp.ones((1,)), False
  net.stack.q, net.stack.hard = jnp.array([0.3, 0.7]), False
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 3))
  got, width = net.stack((net.stem(x), net.stem.out.drawn_widths().max()))
  h = net.stem(x)
  ends = []
  w = int(net.stem.out.drawn_widths().max())
  for block in net.stack.blocks:
    h, w = block((h, w))
    ends.append((np.asarray(h), int(w)))
  widest = max(e[1] for e in ends)
  assert [e[1] for e in ends] == [2, 4]
  q = np.asarray(net.stack.q)
  want = np.zeros_like(ends[0][0])
  for (e, c), weight in zip(ends, q):
    for o in range(widest):  # segment averages over the first c channels
      lo, hi = (o * c) // widest, -(-((o + 1) * c) // widest)
      want[..., o] += weight * e[..., lo:hi].mean(-1)
  assert int(width) == widest
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="projection"):
    surgery.export_searchable(net)


class Huge(nnx.Module):
  """One searchable conv and a declared op of more than 2**31 multiply-accumulates."""

  def __init__(self, rngs):
    self.conv = S.Conv(3, S.Width(8, rngs=rngs), 3, rngs=rngs)

  def __call__(self, x):
    y = self.conv(x)
    S.record(2**30, self.conv.out)
    return y.mean(axis=(1, 2))


def test_discrete_cost_of_terms_beyond_int32_is_not_wrapped_around():
  """Catches F summed in int32 where one term alone passes 2**31: it wraps around to a negative or small count,
  and the cost loss then pushes the wrong way."""
  net = Huge(nnx.Rngs(0))
  _randomise(net, 5)
  graph = cost_graph.trace(net, IMAGE)
  assert not graph.int32_safe
  want = graph.count(net)
  assert want > 2**31
  np.testing.assert_allclose(float(graph.discrete(net)), want, rtol=1e-6)
  np.testing.assert_allclose(float(cost.as_float(graph.discrete_pair(net))), want, rtol=1e-6)
