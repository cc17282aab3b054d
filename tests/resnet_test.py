import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tas_jax.core import cost, shapes
from tas_jax.core import shape_files
from tas_jax.nets import resnet
from model_count import param_count, traced_macs


def _random_shape(base, seed):
  rng = np.random.default_rng(seed)
  widths = tuple(int(rng.integers(1, n + 1)) for n in base.nominal)
  blocks = tuple(int(rng.integers(1, n + 1)) for n in base.layers)
  return base.replace(widths=widths, blocks=blocks)


@pytest.mark.parametrize("name", ["resnet20", "resnet164", "tas-c10-resnet56", "tas-c100-resnet110",
                                  "imagenet-resnet18", "imagenet-resnet50", "tas-imagenet-resnet50"])
def test_counter_equals_traced_model(name):
  shape = shape_files.preset(name)
  if shape.arch == "imagenet":  # same structure at a smaller resolution keeps the trace cheap
    shape = shape.replace(image_size=64)
  model = nnx.eval_shape(lambda: resnet.build(shape))  # shapes only: no weights drawn
  c = cost.count(shape)
  assert traced_macs(model, shape.image_size) == c.macs
  assert param_count(model) == c.params


@pytest.mark.parametrize("seed", range(4))
def test_counter_equals_traced_model_random_shapes(seed):
  base = shapes.cifar_resnet(32 if seed % 2 else 56) if seed < 3 else shapes.cifar_resnet(164)
  shape = _random_shape(base, seed)
  model = nnx.eval_shape(lambda: resnet.build(shape))
  c = cost.count(shape)
  assert traced_macs(model, 32) == c.macs
  assert param_count(model) == c.params


@pytest.mark.slow  # shapes only; the counter and export tests build these networks too
def test_forward_shapes_and_init():
  shape = shape_files.preset("tas-c10-resnet20")
  model = resnet.build(shape, seed=1)
  y = model(jnp.ones((2, 32, 32, 3)))
  assert y.shape == (2, 10) and y.dtype == jnp.float32
  k = model.stem.conv.kernel[...]
  # Kaiming normal, fan-out: std = sqrt(2 / (k*k*cout)).
  expected = np.sqrt(2.0 / (3 * 3 * shape.widths[0]))
  big = resnet.build(shape_files.preset("resnet56"), seed=0).blocks[-1].convs[0].conv.kernel[...]
  assert abs(float(jnp.std(big)) - np.sqrt(2.0 / (9 * 64))) < 0.1 * np.sqrt(2.0 / (9 * 64))
  assert k.shape == (3, 3, 3, shape.widths[0]) and expected > 0
  assert float(jnp.abs(model.head.bias[...]).max()) == 0.0
  assert abs(float(jnp.std(model.head.kernel[...])) - 0.01) < 0.003


def test_zero_init_residual():
  shape = shape_files.preset("resnet20").replace(zero_init_residual=True)
  model = resnet.build(shape)
  for block in model.blocks:
    assert float(jnp.abs(block.convs[-1].bn.scale[...]).max()) == 0.0
    assert float(jnp.abs(block.convs[0].bn.scale[...]).min()) == 1.0


def test_truncated_stage_feeds_last_kept_width():
  base = shape_files.preset("resnet20")
  widths = list(base.widths)
  widths[2], widths[4], widths[6] = 8, 12, 14  # block outputs of stage 0
  shape = base.replace(widths=tuple(widths), blocks=(1, 2, 3))
  model = resnet.build(shape)
  assert model.blocks[1].convs[0].conv.kernel.shape[2] == 8  # stage-1 first conv reads block 0's 8 channels
  assert model.blocks[1].shortcut.conv.kernel.shape[2] == 8


def test_strided_shortcut_same_cost():
  a = shape_files.preset("imagenet-resnet18").replace(image_size=64)
  b = a.replace(shortcut="strided")
  assert cost.count(a) == cost.count(b)
  assert traced_macs(nnx.eval_shape(lambda: resnet.build(b)), 64) == cost.count(b).macs
