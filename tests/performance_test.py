"""bfloat16 compute: parameters stay float32 and the networks still learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tas_jax.configs import train as train_configs
from tas_jax import data
from tas_jax.steps import search as search_lib
from tas_jax.steps import train as train_lib
from tas_jax.runtime import parallel
from tas_jax.nets import resnet
from tas_jax.core import shape_files
from search_test import tiny_config


def _fixed_batch(mesh, n=32):
  d = data.load("synthetic", synthetic_train=n, synthetic_test=8)
  return parallel.global_batch(mesh, {"images": d.train_images[:n], "labels": d.train_labels[:n]})


def test_bfloat16_training_learns_with_float32_parameters():
  mesh = parallel.make_mesh(jax.devices()[:1])
  cfg = train_configs.get_config("resnet8,smoke")
  cfg.dtype, cfg.batch_size, cfg.lr, cfg.mode = "bfloat16", 32, 0.05, "base"
  shape = shape_files.preset("resnet8")
  net = resnet.build(shape, 0, jnp.bfloat16)
  problem, state, _ = train_lib.build(cfg, net, train_lib.make_plan(cfg, shape), 100)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  step, _ = train_lib.compile_step(problem, mesh, parallel.replicate(state, mesh), 32, 32)
  state = parallel.replicate(state, mesh)
  batch = _fixed_batch(mesh)
  losses = []
  for _ in range(25):
    state, m = step(state, batch, None)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_bfloat16_search_step_runs_and_reduces_the_weight_loss():
  mesh = parallel.make_mesh(jax.devices()[:1])
  cfg = tiny_config(dtype="bfloat16", batch_size=32)
  problem, state = search_lib.build(cfg, 10, 4)
  step = search_lib.compile_step(problem, mesh)
  state = parallel.replicate(state, mesh)
  batch = _fixed_batch(mesh)
  losses = []
  for _ in range(25):
    state, m = step(state, batch, batch, jnp.float32(0.5))
    losses.append(float(m["weight_loss"]))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["weights"]))
