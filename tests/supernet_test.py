import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tas_jax.core import cost, shapes
from tas_jax.core import shape_files

from tas_jax.nets import conv, supernet
from tas_jax.nets import surgery
apply = jax.jit(supernet.apply, static_argnums=(0,), static_argnames=("train", "hard"))


def _randomize(model, seed):
  """Random arch logits, weights and batch-norm statistics, so the argmax shape and export are non-trivial."""
  rng = np.random.default_rng(seed)
  model.width_logits[...] = jnp.asarray(rng.normal(size=model.width_logits.shape), jnp.float32)
  model.depth_logits[...] = jnp.asarray(rng.normal(size=model.depth_logits.shape), jnp.float32)
  _, w, _, s = supernet.split(model)
  w = jax.tree.map(lambda t: t + 0.1 * jnp.asarray(rng.normal(size=t.shape), jnp.float32), w)
  s = jax.tree.map(lambda t: jnp.where(t == 0, 0.05 * jnp.asarray(rng.normal(size=t.shape), jnp.float32),
                                       t * jnp.asarray(rng.uniform(0.5, 1.5, size=t.shape), jnp.float32)), s)
  nnx.update(model, w, s)


@pytest.mark.parametrize("mode,base", [("width", "resnet20"), ("depth", "resnet20"), ("shape", "resnet32")])
def test_output_shapes_every_mode(mode, base):
  m = supernet.build(shape_files.preset(base), supernet.SupernetConfig(mode=mode))
  g, w, a, s = supernet.split(m)
  x = jnp.ones((2, 32, 32, 3))
  logits, costs, s2 = apply(g, w, a, s, x, jax.random.key(0), 5.0)
  assert logits.shape == (2, 10)
  assert costs["expected"].shape == () and costs["discrete"].shape == (2,)
  chex.assert_trees_all_equal_shapes(s, s2)
  sp = m.space
  if mode == "depth":
    assert sp.width_table.shape[1] == 1 and sp.depth_table.shape[1] > 1
  if mode == "width":
    assert sp.depth_table.shape[1] == 1 and sp.width_table.shape[1] == 8


@pytest.mark.slow  # the export cases below run these networks too
def test_bottleneck_and_imagenet_forward():
  for base in (shapes.cifar_resnet(11, block="bottleneck"), shape_files.preset("imagenet-resnet18", 5).replace(image_size=32)):
    m = supernet.build(base)
    g, w, a, s = supernet.split(m)
    logits, costs, _ = apply(g, w, a, s, jnp.ones((2, base.image_size, base.image_size, 3)), jax.random.key(1), 1.0)
    assert logits.shape == (2, base.num_classes)
    assert np.isfinite(np.asarray(logits)).all()


def test_arch_params_only_in_their_variable_type():
  m = supernet.build(shape_files.preset("resnet20"))
  arch = nnx.state(m, supernet.ArchParam)
  names = {str(p[-1]) for p, _ in jax.tree_util.tree_flatten_with_path(arch)[0]}
  assert any("width_logits" in n for n in map(str, jax.tree_util.tree_flatten_with_path(arch)[0]))
  leaves = jax.tree.leaves(arch)
  assert sorted(l.shape for l in leaves) == sorted([(19, 8), (3, 3)])
  params = nnx.state(m, nnx.Param)
  assert all(l.shape not in ((19, 8), (3, 3)) for l in jax.tree.leaves(params))
  # Initialised N(0, 0.01).
  assert 0.002 < float(jnp.std(m.width_logits[...])) < 0.02 and names


@pytest.mark.slow  # tests/supernet_reference_test.py checks these gradients against a reference
def test_gradients_reach_architecture():
  m = supernet.build(shape_files.preset("resnet20"))
  g, w, a, s = supernet.split(m)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  y = jnp.arange(4) % 10
  macs = cost.count(shape_files.preset("resnet20")).macs

  def loss(a):
    logits, costs, _ = supernet.apply(g, w, a, s, x, jax.random.key(3), 2.0)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()
    return ce + cost.cost_loss(costs["expected"], cost.as_float(costs["discrete"]), 0.3 * macs, macs)

  grads = jax.jit(jax.grad(loss))(a)
  gw, gd = (np.asarray(l) for l in sorted(jax.tree.leaves(grads), key=lambda l: -l.size))
  assert np.abs(gw).sum() > 0 and np.abs(gd).sum() > 0
  assert np.isfinite(gw).all() and np.isfinite(gd).all()
  # Every conv row receives gradient through the cost loss (the full net is far above 30%).
  assert (np.abs(gw).sum(1) > 0).all()


def test_traces_once_over_steps():
  m = supernet.build(shape_files.preset("resnet20"), supernet.SupernetConfig(mode="shape"))
  g, w, a, s = supernet.split(m)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(w, a, s, x, key, tau):
    logits, costs, s = supernet.apply(g, w, a, s, x, key, tau)
    return logits.sum() + costs["expected"], s

  x = jnp.ones((2, 32, 32, 3))
  for i in range(4):
    _, s = step(w, a, s, x, jax.random.key(i), jnp.float32(5.0 - i))


CASES = [("resnet20", True, 0), ("cifar-bottleneck", True, 3),
         pytest.param("cifar-bottleneck", False, 4, marks=pytest.mark.slow), ("imagenet", True, 5)]


def _base(name):
  if name == "cifar-bottleneck":
    return shapes.cifar_resnet(20, block="bottleneck")
  if name == "imagenet":
    return shape_files.preset("imagenet-resnet18", 7).replace(image_size=32)
  return shape_files.preset(name)


@pytest.mark.parametrize("name,shortcut_bn,seed", CASES)
def test_argmax_supernet_equals_exported_network(name, shortcut_bn, seed):
  base = _base(name)
  m = supernet.build(base, supernet.SupernetConfig(shortcut_bn=shortcut_bn), seed=seed)
  _randomize(m, seed)
  shape, net = surgery.export(m)
  # The random shape exercises truncation and width changes at stride 1.
  kept = shape.kept_blocks()
  assert any(cin != ws[-1] for (st, i), (cin, ws) in kept.items() if i > 0) or shape.blocks != base.layers
  g, w, a, s = supernet.split(m)
  x = jax.random.normal(jax.random.key(seed), (4, base.image_size, base.image_size, 3))
  logits, costs, _ = apply(g, w, a, s, x, jax.random.key(0), 1.0, train=False, hard=True)
  net.eval()
  expected = nnx.jit(lambda n, x: n(x))(net, x)
  scale = float(jnp.abs(expected).max())
  assert float(jnp.std(expected, axis=0).max()) > 1e-3  # not a degenerate constant network
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-4 * max(scale, 1.0))
  assert cost.as_int(costs["discrete"]) == cost.count(shape).macs


def test_argmax_shape_from_supernet_is_counted_exactly_for_many_shapes():
  m = supernet.build(shape_files.preset("resnet56"))
  g, w, a, s = supernet.split(m)
  f = jax.jit(lambda a: nnx.merge(g, w, a, s).costs())
  rng = np.random.default_rng(0)
  for _ in range(5):
    a = jax.tree.map(lambda t: jnp.asarray(rng.normal(size=t.shape), jnp.float32), a)
    nnx.update(m, a)
    assert cost.as_int(f(a)["discrete"]) == cost.count(m.argmax_shape()).macs


def test_width_multiple_and_options():
  cfg = supernet.SupernetConfig(width_multiple=8, num_sampled=3, block_relu=False, bn_groups=2)
  m = supernet.build(shape_files.preset("resnet20"), cfg)
  assert set(np.unique(m.space.width_table)) <= {8, 16, 24, 32, 40, 48, 56, 64}
  g, w, a, s = supernet.split(m)
  logits, _, _ = apply(g, w, a, s, jnp.ones((4, 32, 32, 3)), jax.random.key(0), 1.0)
  assert logits.shape == (4, 10)
  with pytest.raises(ValueError, match="mode"):
    supernet.SupernetConfig(mode="everything")


def test_scanned_blocks_equal_unrolled_blocks():
  """Catches a scan over a stage's identical blocks that drops their running-statistics updates, mixes the
  depth candidates from the wrong blocks, or feeds a block another block's selection rows: the scanned
  supernet must give the unrolled one's logits (search and argmax forwards), statistics and gradients."""
  base = shape_files.preset("resnet20")
  nets = [supernet.build(base, supernet.SupernetConfig(scan_blocks=scan), seed=0) for scan in (False, True)]
  _randomize(nets[0], 3)
  graphdef0, weights, arch, stats = supernet.split(nets[0])
  graphdef1 = supernet.split(nets[1])[0]
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  key = jax.random.key(2)
  outs = []
  for g in (graphdef0, graphdef1):

    @jax.jit
    def run(weights, stats, g=g):
      logits, _, new_stats = supernet.apply(g, weights, arch, stats, x, key, 1.5, with_costs=False)
      hard, _, _ = supernet.apply(g, weights, arch, new_stats, x, None, 1.0, train=False, hard=True,
                                  with_costs=False)
      grads = jax.grad(lambda w: supernet.apply(g, w, arch, stats, x, key, 1.5, with_costs=False)[0].sum())(weights)
      return logits, hard, new_stats, grads

    outs.append(run(weights, stats))
  (l0, h0, s0, g0), (l1, h1, s1, g1) = outs
  np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-5)
  np.testing.assert_allclose(h1, h0, rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_gradients_written_as_forward_convs_equal_autodiff(kernel):
  """Catches a wrong kernel or input gradient in the scan-friendly conv (an unflipped or untransposed kernel, a
  shifted window): both must equal JAX's autodiff of the plain convolution."""
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 4))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 5))
  dy = jax.random.normal(jax.random.key(2), (3, 6, 6, 5))
  p = kernel // 2
  plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((p, p), (p, p)),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want_y, want_vjp = jax.vjp(plain, x, w)
  got_y, got_vjp = jax.vjp(conv.conv_same, x, w)
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(got_vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_forward_leaves_the_supernet_as_built():
  """Catches draws or the eval mode left on the supernet after an eager forward: its split would then fail on
  state no filter takes, or hand out another graph structure than the one the steps were compiled for."""
  model = supernet.build(shape_files.preset("resnet8"))
  graphdef, *states = supernet.split(model)
  x = jnp.zeros((2, 32, 32, 3))
  model(x, jax.random.key(0), 1.0)
  model.hard(x, train=False)
  again, *after = supernet.split(model)
  assert again == graphdef
  assert jax.tree.structure(after) == jax.tree.structure(states)


def test_cost_tables_must_name_every_layer():
  """Catches a latency table missing for a layer (or one for a layer the network lacks) silently costing
  nothing."""
  model = supernet.build(shape_files.preset("resnet8"), abstract=True)
  names = {t.name for t in model.graph.terms if t.name}
  tables = {n: np.ones((8, 8)) for n in names}
  wp = jnp.ones(model.space.width_table.shape) / model.space.width_table.shape[1]
  dp = jnp.ones(model.space.depth_table.shape) / model.space.depth_table.shape[1]
  model.table_cost(tables, wp, dp)
  with pytest.raises(ValueError, match="differ"):
    model.table_cost({n: t for n, t in tables.items() if n != "head"}, wp, dp)
