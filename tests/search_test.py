import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from tas_jax import data
from tas_jax.configs import search as search_configs
from tas_jax.core import cost, shape_files, shapes
from tas_jax.core import space as space_lib
from tas_jax.programs import search
from tas_jax.runtime import checkpoint, models, parallel
from tas_jax.steps import search as search_lib
from tas_jax.core import derive


def tiny_config(**overrides):
  c = search_configs.get_config("smoke")
  c.model = "resnet8"
  c.batch_size = 16
  c.num_train_examples = 128
  c.eval_examples = 32
  c.epochs = 2
  c.log_every_steps = 2
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def final_state(config, workdir):
  """The state of the newest checkpoint of a search directory."""
  problem, state = search_lib.build(config, 10, 4)
  mesh = parallel.make_mesh(jax.devices()[:1])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)), state)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored, _ = ckpt.restore(abstract)
  ckpt.close()
  return restored


def losses(workdir):
  recs = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r["weight_loss"], r["arch_loss"]) for r in recs if "weight_loss" in r]


def test_step_compiles_once():
  config = tiny_config()
  problem, state = search_lib.build(config, 10, 4)
  mesh = parallel.make_mesh()
  state = parallel.replicate(state, mesh)
  step = search_lib.compile_step(problem, mesh)
  rng = np.random.default_rng(0)
  batch = lambda: parallel.global_batch(mesh, {"images": rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8),
                                               "labels": rng.integers(0, 10, 16).astype(np.int32)})
  for i in range(3):
    state, m = step(state, batch(), batch(), jnp.float32(5.0 - i))
  assert step._cache_size() == 1
  assert int(state["step"]) == 3
  assert np.isfinite(float(m["arch_loss"]))


def test_one_and_eight_devices_agree(tmp_path, capfd):
  r1 = search.run(tiny_config(num_devices=1), str(tmp_path / "d1"))
  # The console: one summary line per epoch with the figures a search user watches, from the logged records.
  lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("epoch ")]
  assert len(lines) == 2, lines
  last = [json.loads(l) for l in open(tmp_path / "d1" / "metrics.jsonl") if '"val_acc"' in l][-1]
  assert lines[1].startswith(f"epoch 2/2; tau {last['tau']:.3f}; lr {last['epoch_lr']:.4g}; argmax MACs ratio "
                             f"{last['flops_ratio_exact']:.3f} ({last['macs']:,} MACs), expected "
                             f"{last['epoch_expected_flops_ratio']:.3f}, band [0.450, 0.500], val acc "
                             f"{last['val_acc']:.4f}"), lines[1]
  r8 = search.run(tiny_config(num_devices=8), str(tmp_path / "d8"))
  assert r1["macs"] == r8["macs"]
  assert shape_files.load(str(tmp_path / "d1" / "shape.json")) == shape_files.load(str(tmp_path / "d8" / "shape.json"))
  l1, l8 = np.array(losses(tmp_path / "d1")), np.array(losses(tmp_path / "d8"))
  np.testing.assert_allclose(l1, l8, rtol=2e-4, atol=2e-4)
  s1, s8 = final_state(tiny_config(), tmp_path / "d1"), final_state(tiny_config(), tmp_path / "d8")
  for a, b in zip(jax.tree.leaves(s1["arch"]), jax.tree.leaves(s8["arch"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  check_exported_model(tmp_path / "d1", s1, r1)


def check_exported_model(workdir, state, result):
  """Catches a search that leaves no loadable network, one of another shape, or one without the supernet's weights.

  The saved network must compute what the final supernet computes in hard eval mode at the saved shape.
  """
  shape, net = models.load_model(str(workdir))
  assert shape == shape_files.load(str(workdir / "shape.json"))
  if result["fit_moves"]:  # band fitting moved off the argmax: the supernet's hard forward is another shape
    return
  problem, _ = search_lib.build(tiny_config(), 10, 1)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  want = search_lib.hard_logits_fn(problem)(state, images)
  got = net(data.normalize(images, problem.mean, problem.std))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # tests/faults_slow_test.py kills and resumes searches too; this one takes half a minute
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
  whole = tmp_path / "whole"
  parts = tmp_path / "parts"
  search.run(tiny_config(), str(whole))
  first = search.run(tiny_config(stop_after_steps=3), str(parts))
  assert first["finished"] is False and not (parts / "shape.json").exists()
  search.run(tiny_config(stop_after_steps=2), str(parts))  # 3 -> 5: mid-epoch stop and resume
  done = search.run(tiny_config(), str(parts))
  assert done["finished"]
  a, b = final_state(tiny_config(), whole), final_state(tiny_config(), parts)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert losses(whole) == losses(parts)  # no duplicated or missing metric records
  assert (whole / "shape.json").read_text() == (parts / "shape.json").read_text()


def test_resume_refuses_another_configuration(tmp_path):
  search.run(tiny_config(stop_after_steps=2), str(tmp_path))
  from tas_jax.runtime import runs
  with pytest.raises(runs.RunError, match="target_flops_ratio"):
    search.run(tiny_config(target_flops_ratio=0.3), str(tmp_path))


def test_unreachable_target_is_refused(tmp_path):
  from tas_jax.runtime import runs, settings
  with pytest.raises(runs.RunError, match=r"reaches: its MACs ratios span \[0\.\d+, 1\.0\]"):
    search.run(tiny_config(target_flops_ratio=0.01), str(tmp_path))
  with pytest.raises(settings.SettingsError, match=r"config.target_flops_ratio must lie in \(0, 1\)"):
    search.run(tiny_config(target_flops_ratio=1.5), str(tmp_path / "b"))
  assert not (tmp_path / "b").exists()  # refused at the door: nothing read, nothing written


def test_fit_to_band_lands_inside():
  base = shape_files.preset("resnet20")
  space = space_lib.search_space(base)
  rng = np.random.default_rng(0)
  wp = rng.dirichlet(np.ones(8), size=space.width_table.shape[0])
  dp = rng.dirichlet(np.ones(space.depth_table.shape[1]), size=3)
  full = cost.count(base).macs
  for lo, hi in [(0.45, 0.5), (0.8, 0.85)]:
    band = (lo * full, hi * full)
    shape, moves = derive.fit_to_band(space, wp, dp, base if lo > 0.5 else base, band)
    assert band[0] <= cost.count(shape).macs <= band[1] and moves > 0
    small = space.shape_from_indices(np.zeros(19, np.int32), np.zeros(3, np.int32))
    shape, _ = derive.fit_to_band(space, wp, dp, small, band)
    assert band[0] <= cost.count(shape).macs <= band[1]


@pytest.mark.multihost
@pytest.mark.slow  # tests/multihost_test.py runs two jax.distributed processes in the fast suite
def test_two_processes_complete_and_agree(tmp_path):
  import portpicker
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=str(ROOT))
  args = ["--config", str(ROOT / "tas_jax/configs/search.py:smoke"), "--config.model=resnet8",
          "--config.batch_size=16", "--config.num_train_examples=128", "--config.eval_examples=32",
          "--config.log_every_steps=2", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, "-m", "tas_jax.cli.search", *args, f"--process_id={i}",
                             f"--workdir={tmp_path / 'mh'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  single = search.run(tiny_config(num_devices=4), str(tmp_path / "single"))
  assert json.loads((tmp_path / "mh" / "result.json").read_text())["macs"] == single["macs"]
  np.testing.assert_allclose(np.array(losses(tmp_path / "mh")), np.array(losses(tmp_path / "single")),
                             rtol=2e-4, atol=2e-4)


def test_costs_are_counted_at_the_image_size_the_network_is_given():
  """Catches MACs counted at the preset's 224x224 for a network given 32x32 images (49 times too many)."""
  base = search_lib.base_shape("imagenet-resnet18", 10, 32)
  assert base.image_size == 32
  assert cost.count(base).macs == cost.count(shapes.imagenet_resnet(18, 10, image_size=32)).macs
  assert cost.count(search_lib.base_shape("imagenet-resnet18", 10)).macs > 40 * cost.count(base).macs


def test_a_searchable_family_is_refused_with_the_way_to_search_it(tmp_path):
  """Catches `model=vgg16` failing as an unknown preset, or after reading or writing anything."""
  from tas_jax.runtime import runs
  with pytest.raises(runs.RunError, match="searchable family.*tas_jax.steps.searchable.Search"):
    search.run(tiny_config(model="vgg16"), str(tmp_path / "v"))
  assert not (tmp_path / "v").exists()
