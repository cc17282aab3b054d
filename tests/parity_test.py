"""tas_jax in its official mode against numbers from the published TAS implementation (PyPI xautodl 1.0.0).

The fixtures in tests/fixtures/parity are written by ``make parity-fixtures``
(tools/parity/make_fixtures.py, in a virtual environment of its own with torch
and xautodl); these tests need neither. The official search network's weights,
per-candidate batch norms and architecture logits are loaded into a
:class:`tas_jax.nets.supernet.Supernet`, both networks see the same forced sample
(Gumbel noise and drawn width indices saved by the script; the weights are
recomputed here from the logits by the official formula, so gradients reach
the logits), and logits, running statistics, the loss gradients with respect
to the width and depth logits, the costs E and F, the argmax genotype, the
distillation loss and both schedules are compared.

Layouts: torch kernels are OIHW and feature maps NCHW, tas_jax kernels HWIO
and maps NHWC. Official costs are in MFLOPs, i.e. 1e6 multiply-accumulates.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tas_jax.core import cost, distill, schedules
from tas_jax.core import shape_files
from tas_jax.configs import train as train_configs

from tas_jax.nets import supernet
from tas_jax.steps import train as train_lib
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "parity"
OFFICIAL = supernet.SupernetConfig(exact_cost=False, shortcut_bn=True, block_relu=True, bn_groups=0)
MFLOPS = 1e6  # the official cost unit, in MACs
TORCH_CONVS = {"basic": ("conv_a", "conv_b"), "bottleneck": ("conv_1x1", "conv_3x3", "conv_1x4")}
BN_FIELDS = (("weight", "scale"), ("bias", "offset"), ("running_mean", "mean"), ("running_var", "var"))
DEPTHS = [20, pytest.param(56, marks=pytest.mark.slow)]  # ResNet-56 compiles for minutes on 2 cores
GRAD_RTOL = {20: 1e-3, 56: 2e-3}


def _fixture(name):
  path = FIXTURES / name
  assert path.is_file(), f"{path} is missing: `make parity-fixtures` writes it"  # committed: never skip
  with np.load(path) as f:
    return dict(f)


def _torch_modules(model: supernet.Supernet):
  """(official module prefix, tas_jax searchable conv) for every searchable conv, shortcuts included."""
  pairs = [("layers.0", model.stem)]
  names = TORCH_CONVS[model.space.base.block]
  for i, block in enumerate(model.blocks):
    pairs += [(f"layers.{i + 1}.{n}", conv) for n, conv in zip(names, block.convs)]
    if block.shortcut is not None:
      pairs.append((f"layers.{i + 1}.downsample", block.shortcut))
  return pairs


def _candidates(fx, prefix):
  """The official candidate widths of a conv: the sizes of its per-candidate batch norms."""
  j, sizes = 0, []
  while f"param/{prefix}.BNs.{j}.weight" in fx:
    sizes.append(fx[f"param/{prefix}.BNs.{j}.weight"].size)
    j += 1
  return sizes


def load_official(fx, depth: int) -> supernet.Supernet:
  """A tas_jax supernet in official mode carrying every number of the official network; all of them are used."""
  model = supernet.build(shape_files.preset(f"resnet{depth}"), OFFICIAL)
  used = set()

  def get(key):
    used.add(key)
    return np.asarray(fx[key], np.float32)

  for prefix, conv in _torch_modules(model):
    kernel = get(f"param/{prefix}.conv.weight").transpose(2, 3, 1, 0)  # OIHW -> HWIO
    assert kernel.shape == conv.kernel[...].shape, prefix
    conv.kernel[...] = jnp.asarray(kernel)
    for torch_name, name in BN_FIELDS:
      table = np.array(getattr(conv, name)[...])
      for j in range(table.shape[0]):
        v = get(f"param/{prefix}.BNs.{j}.{torch_name}")
        table[j, : v.size] = v
      getattr(conv, name)[...] = jnp.asarray(table)
  model.head.kernel[...] = jnp.asarray(get("param/classifier.weight").T)
  model.head.bias[...] = jnp.asarray(get("param/classifier.bias"))
  model.width_logits[...] = jnp.asarray(get("arch/width_attentions"))
  model.depth_logits[...] = jnp.asarray(get("arch/depth_attentions"))
  unused = {k for k in fx if k.startswith(("param/", "arch/"))} - used
  assert not unused, f"official tensors with no tas_jax counterpart: {sorted(unused)[:5]}"
  return model


def forced_selection(space, width_logits, depth_logits, sample) -> supernet.Selection:
  """The official sample for saved noise g and indices I, differentiable in the logits.

  z = (log_softmax(alpha) + g) / tau; width weights softmax(z[I]) over the two
  drawn indices; depth weights the full softmax over the choices.
  """
  tau = sample["tau"]
  idx = sample["width_index"]
  z = (jax.nn.log_softmax(width_logits, axis=-1) + sample["width_noise"]) / tau
  weight = jax.nn.softmax(jnp.take_along_axis(z, idx, axis=1), axis=1)
  depth = jax.nn.softmax((jax.nn.log_softmax(depth_logits, axis=-1) + sample["depth_noise"]) / tau, axis=-1)
  width = jnp.take_along_axis(jnp.asarray(space.width_table), idx, axis=1)
  return supernet.Selection(idx, width, weight, depth, hard=False)


def _loss(width_logits, depth_logits, graphdef, weights, arch, stats, images, labels, sample, *, train):
  model = nnx.merge(graphdef, weights, arch, stats, copy=True)
  model.width_logits[...] = width_logits
  model.depth_logits[...] = depth_logits
  sel = forced_selection(model.space, width_logits, depth_logits, sample)
  logits, costs = model.forward(images, sel, train=train)
  loss = distill.cross_entropy(logits, labels)
  return loss, (logits, costs["expected"], nnx.state(model, nnx.BatchStat))


@functools.partial(jax.jit, static_argnums=(0,))
def _official_steps(graphdef, weights, arch, stats, images, labels, sample):
  """The eval forward and the train forward with its gradients, compiled together (once per network)."""
  model = nnx.merge(graphdef, weights, arch, stats)
  args = (model.width_logits[...], model.depth_logits[...], graphdef, weights, arch, stats, images, labels, sample)
  _, (eval_logits, _, eval_stats) = _loss(*args, train=False)
  (loss, (logits, expected, new_stats)), (gw, gd) = jax.value_and_grad(_loss, argnums=(0, 1), has_aux=True)(
      *args, train=True)
  unchanged = jnp.all(jnp.stack([jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(eval_stats),
                                                                        jax.tree.leaves(stats))]))
  out = dict(eval_logits=eval_logits, eval_stats_unchanged=unchanged, loss=loss, train_logits=logits,
             expected=expected, width_grad=gw, depth_grad=gd)
  return out, new_stats


@functools.lru_cache(maxsize=None)
def _run(depth: int):
  """The official fixture, and tas_jax's forwards on it with the updated statistics loaded into the model."""
  fx = _fixture(f"resnet{depth}.npz")
  model = load_official(fx, depth)
  images = jnp.asarray(fx["images"].astype(np.float32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
  sample = {k: jnp.asarray(fx[k]) for k in ("tau", "width_noise", "width_index", "depth_noise")}
  out, new_stats = _official_steps(*supernet.split(model), images, jnp.asarray(fx["labels"]), sample)
  nnx.update(model, new_stats)
  return fx, model, jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("depth", DEPTHS)
def test_candidate_widths_and_layout_match_official(depth):
  """Catches a different candidate rounding or order (int(ratio * C), deduplicated, sorted), or convs,
  shortcuts or weight shapes that do not line up with the official search network."""
  fx = _fixture(f"resnet{depth}.npz")
  model = load_official(fx, depth)  # every official tensor is consumed and every kernel shape agrees
  convs = [p for p, _ in _torch_modules(model) if not p.endswith("downsample")]
  assert len(convs) == model.space.num_convs
  for l, prefix in enumerate(convs):
    assert _candidates(fx, prefix) == model.space.width_table[l].tolist(), prefix
  for i, block in enumerate(model.blocks):  # a shortcut shares its block's last conv's candidates
    if block.shortcut is not None:
      last = model.space.width_table[block.conv_ids[-1]].tolist()
      assert _candidates(fx, f"layers.{i + 1}.downsample") == last


@pytest.mark.parametrize("depth", DEPTHS)
def test_train_logits_and_loss(depth):
  """Catches any forward mismatch with batch statistics: the weight-sharing conv, per-candidate batch norm
  before CWI, the two re-normalised width weights (swapped or not re-normalised), CWI's segment bounds, the
  left-aligned residual add, the block-end ReLU, the shortcut's batch norm, the depth mix at stage ends, the
  first-columns classifier."""
  fx, _, out = _run(depth)
  np.testing.assert_allclose(out["train_logits"], fx["train_logits"], rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["loss"], fx["loss"], rtol=1e-5)


@pytest.mark.parametrize("depth", DEPTHS)
def test_eval_logits(depth):
  """Catches eval mode normalising with the wrong running statistics (another candidate's, batch ones), or
  moving them."""
  fx, _, out = _run(depth)
  np.testing.assert_allclose(out["eval_logits"], fx["eval_logits"], rtol=0, atol=1e-4)
  assert out["eval_stats_unchanged"]


@pytest.mark.parametrize("depth", DEPTHS)
def test_running_statistics_update(depth):
  """Catches a missing or wrong running-statistic update: momentum, biased instead of unbiased variance,
  updating a candidate that was not drawn, or the other drawn candidate's channels."""
  fx, model, _ = _run(depth)
  for prefix, conv in _torch_modules(model):
    for torch_name, name in BN_FIELDS[2:]:
      table = np.asarray(getattr(conv, name)[...])
      for j in range(table.shape[0]):
        want = fx[f"stat/{prefix}.BNs.{j}.{torch_name}"]
        got = table[j, : want.size]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{prefix}.BNs.{j}.{torch_name}")


@pytest.mark.parametrize("depth", DEPTHS)
def test_architecture_gradients(depth):
  """Catches gradients that reach the logits differently: weights not differentiated through the
  re-normalised softmax, a missing log_softmax or temperature, a stop_gradient in the wrong place, or the
  depth weights treated as constants."""
  fx, _, out = _run(depth)
  # Within rtol of each entry plus rtol of the largest one. The deeper net's gradients are float32-limited:
  # against a float64 run of the official network, its own float32 gradients are off by up to 4e-4 of the
  # largest entry and tas_jax's by up to 1.2e-3 (at the stem and the first stage's depth logits).
  rtol = GRAD_RTOL[depth]
  for name in ("width_grad", "depth_grad"):
    want, got = fx[name], out[name]
    scale = float(np.abs(want).max())
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("depth", DEPTHS)
def test_forward_expected_cost(depth):
  """Catches a supernet in official mode whose E is not the official one (units, product of expectations,
  survival weights)."""
  fx, _, out = _run(depth)
  np.testing.assert_allclose(out["expected"] / MFLOPS, fx["expected_cost"], rtol=1e-6)


@pytest.mark.parametrize("depth", [20, 56, 164])
def test_costs_and_genotypes(depth):
  """Catches E or F formula drift from the official ones (survival multipliers, the shortcut terms, the
  projection the pruned net adds, the recorded width after a truncated stage, the classifier term) and a
  genotype read from the logits differently (xchannels with the input channels first, xblocks as counts)."""
  fx = _fixture("costs.npz")
  model = nnx.eval_shape(lambda: supernet.Supernet(shape_files.preset(f"resnet{depth}"), OFFICIAL, rngs=nnx.Rngs(0)))
  space = model.space
  assert space.width_mask.all() and space.depth_mask.all()
  p = f"resnet{depth}/"
  for wl, dl, e, f, xchannels, xblocks in zip(*(fx[p + k] for k in ("width_logits", "depth_logits", "expected",
                                                                      "discrete", "xchannels", "xblocks"))):
    wl, dl = jnp.asarray(wl), jnp.asarray(dl)
    expected = model.expected_cost(jax.nn.softmax(wl, -1), jax.nn.softmax(dl, -1))
    np.testing.assert_allclose(float(expected) / MFLOPS, e, rtol=1e-6)
    wi, di = jnp.argmax(wl, -1), jnp.argmax(dl, -1)
    discrete = cost.as_int(model.discrete_cost(wi, di))
    np.testing.assert_allclose(discrete / MFLOPS, f, rtol=1e-6)
    shape = space.shape_from_indices(wi, di)
    assert [shape.in_channels, *shape.widths] == xchannels.tolist()
    assert list(shape.blocks) == xblocks.tolist()


def test_kd_loss():
  """Catches a distillation loss that is not loss_KD_fn: alpha on the wrong term, a missing T^2, KL reversed
  or averaged per class instead of per example, gradient into the teacher."""
  fx = _fixture("kd.npz")
  alpha, t = float(fx["alpha"]), float(fx["temperature"])
  for i in range(3):
    s, tl, y = (jnp.asarray(fx[f"case{i}/{k}"]) for k in ("student", "teacher", "labels"))
    loss, grad = jax.value_and_grad(distill.kd_loss)(s, tl, y, alpha=alpha, temperature=t)
    np.testing.assert_allclose(float(loss), fx[f"case{i}/loss"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), fx[f"case{i}/grad"], rtol=1e-4, atol=1e-7)


def test_tau_schedule():
  """Catches a temperature that is not the official per-epoch cosine from 5 to 0.1 over epoch / total."""
  fx = _fixture("schedules.npz")
  for key in (k for k in fx if k.startswith("tau/")):
    total = int(key.split("/")[1])
    got = schedules.tau_schedule("cosine", tau_max=5.0, tau_min=0.1)(jnp.arange(total), total)
    np.testing.assert_allclose(np.asarray(got), fx[key], rtol=1e-6, atol=1e-5, err_msg=key)


def _lr_settings(fx):
  for key in (k for k in fx if k.startswith("lr/")):
    epochs, warmup, steps, base = key.split("/")[1].split("-")
    yield key, int(epochs), int(warmup), int(steps), float(base)


def test_official_lr_schedule():
  """Catches a learning rate that is not the official CosineAnnealingLR: per-iteration warmup, per-epoch cosine
  over T_max = E after the warmup, lr 0 in the extra warmup epochs at the end."""
  fx = _fixture("schedules.npz")
  for key, epochs, warmup, steps, base in _lr_settings(fx):
    fn = schedules.lr_schedule("cosine", base, epochs, steps, warmup_epochs=warmup, official_tail=True)
    got = np.asarray(fn(jnp.arange(len(fx[key]))))
    np.testing.assert_allclose(got, fx[key], rtol=1e-6, atol=1e-8, err_msg=key)


def test_training_plan_official_option():
  """Catches the training recipe's official options (lr_per_epoch, official_tail) drifting from the official
  schedule or running a different number of epochs (E + W)."""
  fx = _fixture("schedules.npz")
  for key, epochs, warmup, steps, base in _lr_settings(fx):
    if warmup != train_lib.effective_warmup(warmup, epochs):
      continue  # short runs shorten the warmup on purpose
    config = train_configs.get_config("resnet20")
    config.update(dict(mode="scratch", epochs=epochs, lr=base, lr_schedule="cosine", warmup_epochs=warmup,
                       official_tail=True, lr_per_epoch=True))
    plan = train_lib.make_plan(config, shape_files.preset("resnet20"))
    assert plan.epochs * steps == len(fx[key]), key
    got = np.asarray(plan.lr_fn(steps)(jnp.arange(len(fx[key]))))
    np.testing.assert_allclose(got, fx[key], rtol=1e-6, atol=1e-8, err_msg=key)
