"""The stochastic supernet forward against an independent reference written from TAS's formulas.

The reference below keeps every feature map at its true width (no padding, no
folded channel-mixing matrices, no vectorisation over candidates): a conv runs
at its nominal width on the input zero-padded to the nominal input width,
candidate j of a conv takes the first c_j output channels through its own batch
norm (batch statistics in train mode, running ones in eval), channel-wise
interpolation (CWI) is a loop of segment means up to the widest drawn width,
the drawn candidates are summed with their re-normalised Gumbel weights, a
residual add puts the narrower tensor into the first channels of the wider,
and at a stage's end the candidate end blocks are mixed with the soft Gumbel
depth weights after CWI to the widest of them. The classifier reads the first
channels.

Both networks receive the same forced sample (fixed Gumbel noise and fixed
drawn indices, weights computed from the logits by the sampler's formula), so
logits, running-statistic updates and the gradients with respect to the width
and depth logits can be compared exactly, in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tas_jax.core import shapes

from tas_jax.nets import supernet
EPS = 1e-5  # batch-norm epsilon (PyTorch's default)
MOMENTUM = 0.1  # PyTorch convention: running <- (1 - m) running + m batch
HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the reference

def log_softmax_masked(x, mask):
  x = jnp.where(mask, x, -1e30)
  return jax.nn.log_softmax(x, axis=-1)


def forced_sample(wl, dl, noise, idx, tau, space):
  """Weights of the drawn widths, softmax(z[I]) with z = (log_softmax(alpha) + g) / tau, and the soft depth vector."""
  wmask = jnp.asarray(space.width_mask)
  dmask = jnp.asarray(space.depth_mask)
  z = (log_softmax_masked(wl, wmask) + noise["width"]) / tau
  weights = jax.nn.softmax(jnp.take_along_axis(z, jnp.asarray(idx), axis=1), axis=1)
  q = jax.nn.softmax(jnp.where(dmask, (log_softmax_masked(dl, dmask) + noise["depth"]) / tau, -1e30), axis=1)
  return weights, q * dmask


def segment_cwi(x, out):
  """CWI(x, out)[o] = mean of x[floor(o C / out) : ceil((o + 1) C / out)], C = x's width."""
  c = x.shape[-1]
  if c == out:
    return x
  m = np.zeros((c, out), np.float32)  # column o averages its segment of input channels
  for o in range(out):
    lo, hi = (o * c) // out, -(-((o + 1) * c) // out)
    m[lo:hi, o] = 1.0 / (hi - lo)
  return jnp.dot(x, m, precision=HI)


def left_add(a, b):
  if a.shape[-1] < b.shape[-1]:
    a, b = b, a
  return a.at[..., : b.shape[-1]].add(b)


def conv_nominal(x, kernel, stride):
  """The conv at its nominal width: the input zero-padded to the kernel's input channels."""
  x = jnp.pad(x, [(0, 0)] * 3 + [(0, kernel.shape[2] - x.shape[-1])])
  p = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HI)


def avg_pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def max_pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


class Reference:
  """The TAS search forward from the formulas, on parameters copied out of a supernet."""

  def __init__(self, model, *, train, groups, block_relu, unbiased_var):
    self.model, self.space = model, model.space
    self.train, self.groups, self.block_relu, self.unbiased = train, groups, block_relu, unbiased_var
    self.updates = {}  # (id(conv), candidate) -> (mean, var) of the running statistics after the forward

  def bn(self, conv, j, y):
    c = y.shape[-1]
    scale, bias = conv.scale[...][j, :c], conv.offset[...][j, :c]
    if not self.train:
      mean, var = conv.mean[...][j, :c], conv.var[...][j, :c]
      return (y - mean) / jnp.sqrt(var + EPS) * scale + bias
    parts = jnp.split(y, max(self.groups, 1), axis=0)
    outs, means, variances = [], [], []
    for part in parts:
      n = part.shape[0] * part.shape[1] * part.shape[2]
      m = part.mean(axis=(0, 1, 2))
      v = ((part - m) ** 2).mean(axis=(0, 1, 2))
      outs.append((part - m) / jnp.sqrt(v + EPS) * scale + bias)
      means.append(m)
      variances.append(v * n / (n - 1) if self.unbiased else v)
    old_m, old_v = conv.mean[...][j, :c], conv.var[...][j, :c]
    self.updates[(id(conv), j)] = ((1 - MOMENTUM) * old_m + MOMENTUM * sum(means) / len(means),
                                   (1 - MOMENTUM) * old_v + MOMENTUM * sum(variances) / len(variances))
    return jnp.concatenate(outs, axis=0)

  def conv(self, conv, x, row, relu, idx, weights, stride, pool=False):
    if pool:
      x = avg_pool(x)
    y = conv_nominal(x, conv.kernel[...], stride)
    cands = [int(j) for j in idx[row]]
    widths = [int(self.space.width_table[row, j]) for j in cands]
    widest = max(widths)
    out = 0.0
    for n, (j, c) in enumerate(zip(cands, widths)):
      part = y[..., :c]
      if conv.norm:
        part = self.bn(conv, j, part)
      out = out + weights[row, n] * segment_cwi(part, widest)
    return jax.nn.relu(out) if relu else out

  def __call__(self, images, idx, weights, depth):
    model, space = self.model, self.space
    lay = space.layout
    stem = lay.convs[0]
    x = self.conv(model.stem, images, 0, True, idx, weights, stem.stride)
    if space.base.arch == "imagenet":
      x = max_pool(x)
    for s in range(len(space.base.layers)):
      choices = [int(d) for d, ok in zip(space.depth_table[s], space.depth_mask[s]) if ok]
      ends = []
      for spec, block in zip(lay.blocks, model.blocks):
        if spec.stage != s:
          continue
        y = x
        for i, ci in enumerate(spec.convs):
          y = self.conv(block.convs[i], y, ci, i < len(spec.convs) - 1, idx, weights, lay.convs[ci].stride)
        if block.shortcut is None:
          sc = x
        else:
          pool = spec.stride > 1 and space.base.shortcut == "avgpool"
          sc = self.conv(block.shortcut, x, spec.convs[-1], False, idx, weights, 1 if pool else spec.stride, pool)
        x = left_add(y, sc)
        if self.block_relu:
          x = jax.nn.relu(x)
        if spec.index + 1 in choices:
          ends.append(x)
      if len(ends) > 1:
        widest = max(e.shape[-1] for e in ends)
        x = sum(depth[s, k] * segment_cwi(e, widest) for k, e in enumerate(ends))
    feats = x.mean(axis=(1, 2))
    c = feats.shape[-1]
    return jnp.dot(feats, model.head.kernel[...][:c], precision=HI) + model.head.bias[...]


# ----------------------------------------------------------------------------- the comparison

def randomized(base, config, seed):
  """A supernet with random weights, batch-norm parameters, running statistics and logits.

  Built abstractly and filled from NumPy, so no initialiser is compiled.
  """
  abstract = nnx.eval_shape(lambda: supernet.Supernet(base, config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    name = [n for n in names if isinstance(n, str) and n != "value"][-1]
    shape = leaf.shape
    if name in ("scale", "var"):
      value = rng.uniform(0.5, 2.0, size=shape)
    elif name in ("bias", "offset", "mean"):
      value = 0.1 * rng.normal(size=shape)
    elif name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    else:  # width and depth logits
      value = rng.normal(size=shape)
    return jnp.asarray(value, jnp.float32)

  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state)


def forced_draw(space, k, seed):
  """Fixed Gumbel noise and k distinct valid candidate indices per conv row."""
  rng = np.random.default_rng(seed + 100)
  noise = {"width": jnp.asarray(rng.gumbel(size=space.width_table.shape), jnp.float32),
           "depth": jnp.asarray(rng.gumbel(size=space.depth_table.shape), jnp.float32)}
  idx = np.zeros((space.width_table.shape[0], k), np.int32)
  for r in range(idx.shape[0]):
    valid = np.flatnonzero(space.width_mask[r])
    idx[r] = rng.choice(valid, size=k, replace=False)
  return noise, idx


def stat_leaves(model):
  """{(id(conv), name): array} of every per-candidate running statistic."""
  convs = [model.stem] + [c for b in model.blocks for c in list(b.convs) + ([b.shortcut] if b.shortcut else [])]
  return {(id(c), n): np.asarray(getattr(c, n)[...]) for c in convs if c.norm for n in ("mean", "var")}, convs


def compare(base, config, *, k, train, seed=0, batch=4, image=16, tau=1.7):
  model = randomized(base, config, seed)
  space = model.space
  noise, idx = forced_draw(space, k, seed)
  rng = np.random.default_rng(seed + 7)
  images = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, base.num_classes, batch), jnp.int32)
  wl0, dl0 = model.width_logits[...], model.depth_logits[...]
  graphdef, weights, arch, stats = supernet.split(model)

  def supernet_loss(wl, dl):
    m = nnx.merge(graphdef, weights, arch, stats, copy=True)
    w, q = forced_sample(wl, dl, noise, idx, tau, space)
    widths = jnp.take_along_axis(jnp.asarray(space.width_table), jnp.asarray(idx), axis=1)
    sel = supernet.Selection(jnp.asarray(idx), widths, w, q, hard=False)
    logits, _ = m.forward(images, sel, train=train, with_costs=False)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return ce, (logits, nnx.state(m, nnx.BatchStat))

  ref = Reference(model, train=train, groups=config.bn_groups, block_relu=config.block_relu,
                  unbiased_var=config.unbiased_var)

  def reference_loss(wl, dl):
    w, q = forced_sample(wl, dl, noise, idx, tau, space)
    ref.updates = {}
    logits = ref(images, idx, w, q)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return ce, (logits, dict(ref.updates))

  (ce, (logits, new_stats)), grads = jax.jit(jax.value_and_grad(supernet_loss, argnums=(0, 1), has_aux=True))(wl0, dl0)
  (ce_ref, (logits_ref, updates)), grads_ref = jax.jit(
      jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True))(wl0, dl0)
  scale = float(jnp.abs(logits_ref).max())
  np.testing.assert_allclose(logits, logits_ref, atol=1e-4 * max(scale, 1.0), rtol=0)
  for g, g_ref, what in zip(grads, grads_ref, ("width", "depth")):
    g, g_ref = np.asarray(g), np.asarray(g_ref)
    tol = 2e-3 * max(np.abs(g_ref).max(), 1e-6)
    np.testing.assert_allclose(g, g_ref, atol=tol, rtol=0, err_msg=f"gradient w.r.t. the {what} logits")

  # Running statistics: the drawn candidates' rows move to the reference's values on their first c_j
  # channels; every other row stays as it was.
  before, convs = stat_leaves(model)
  m_after = nnx.merge(graphdef, weights, arch, new_stats, copy=True)
  after, convs_after = stat_leaves(m_after)
  by_position = {id(c): id(c2) for c, c2 in zip(convs, convs_after)}
  row_of = {id(model.stem): 0}
  for spec, b in zip(space.layout.blocks, model.blocks):
    for i, ci in enumerate(spec.convs):
      row_of[id(b.convs[i])] = ci
    if b.shortcut is not None:
      row_of[id(b.shortcut)] = spec.convs[-1]
  checked = 0
  for conv in convs:
    if not conv.norm:
      continue
    row = row_of[id(conv)]
    for n_i, name in enumerate(("mean", "var")):
      old, new = before[(id(conv), name)], after[(by_position[id(conv)], name)]
      drawn = set(int(j) for j in idx[row])
      for j in range(old.shape[0]):
        if j in drawn and train:
          c = int(space.width_table[row, j])
          np.testing.assert_allclose(new[j, :c], updates[(id(conv), j)][n_i], rtol=2e-4, atol=2e-5,
                                     err_msg=f"running {name} of candidate {j} (row {row})")
          checked += 1
        else:
          np.testing.assert_array_equal(new[j], old[j], err_msg=f"running {name} of an undrawn candidate {j}")
  assert checked > 0 or not train
  return float(ce), float(ce_ref)


# Small networks keep compilation short; every feature of the search forward still occurs: a stage with two
# candidate end blocks (depth mixing), stride-2 blocks with avg-pool projection shortcuts, width changes.
BASIC = shapes.unpruned("cifar", "basic", (2, 1, 1))
BOTTLENECK = shapes.unpruned("cifar", "bottleneck", (2, 1, 1))
IMAGENET = shapes.unpruned("imagenet", "basic", (2, 1, 1, 1), image_size=32, num_classes=5)


@pytest.mark.parametrize("k,train", [(2, True), (3, False)])
def test_supernet_matches_reference(k, train):
  """Catches: the drawn widths' weights swapped or not re-normalised, BN of the wrong candidate or on the wrong
  channels, running statistics never updated (or updated for undrawn candidates, with the wrong momentum, or
  read in eval mode from the wrong row), CWI segments off by one, a right-aligned residual add, a missing block
  ReLU, depth weights applied to the wrong end block, the classifier reading the wrong channels, and wrong
  gradients into the width and depth logits; for k = 2 (train mode) and k = 3 (eval mode)."""
  compare(BASIC, supernet.SupernetConfig(num_sampled=k), k=k, train=train)


def test_switches_match_reference():
  """Catches: bn_groups ignored (each batch slice must be normalised with its own statistics), block_relu=False
  or shortcut_bn=False ignored (the paper-era supernet), unbiased_var=False still applying n / (n - 1)."""
  config = supernet.SupernetConfig(bn_groups=2, block_relu=False, shortcut_bn=False, unbiased_var=False)
  compare(BASIC, config, k=2, train=True, seed=3)


@pytest.mark.parametrize("mode", ["width", "depth"])
def test_width_and_depth_modes_match_reference(mode):
  """Catches: a width-only search that still mixes depths, a depth-only search that narrows convs."""
  compare(BASIC, supernet.SupernetConfig(mode=mode), k=1 if mode == "depth" else 2, train=True, seed=5)


def test_bottleneck_supernet_matches_reference():
  """Catches: a bottleneck shortcut reading another conv's draw, the stride on the wrong conv of the block."""
  compare(BOTTLENECK, supernet.SupernetConfig(), k=2, train=True, seed=1)


@pytest.mark.parametrize("train", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_imagenet_supernet_matches_reference(train):
  """Catches: the ImageNet stem (7x7 stride 2, max pool) or its avg-pool shortcut wrong in the search forward.

  Batch 4: with 2 images the last stage normalises over two values per channel, where float32 rounding alone
  moves a few gradient entries by 1 %.
  """
  compare(IMAGENET, supernet.SupernetConfig(), k=2, train=train, seed=2, batch=4, image=32)


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 3])
def test_resnet20_supernet_matches_reference(k):
  """The same checks on a full ResNet-20 (three blocks per stage, three depth choices)."""
  compare(shapes.cifar_resnet(20), supernet.SupernetConfig(num_sampled=k), k=k, train=True, seed=4, batch=4)
