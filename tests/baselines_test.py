import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT
from tas_jax.cli import prune as prune_cli
from tas_jax.configs import train as train_configs
from tas_jax import baselines

from tas_jax.runtime import models
from tas_jax.core import cost, optim, shapes
from tas_jax.core import space as space_lib
from tas_jax.core import shape_files
from tas_jax.nets import surgery
from tas_jax.programs import train
from tas_jax.nets import resnet
TARGETS = (0.1, 0.3, 0.5, 0.7, 0.9)


def ratio(shape):
  return cost.count(shape).macs / cost.count(shapes.full_shape(shape)).macs


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_uniform_lands_in_band_with_one_width_ratio(name):
  base = shape_files.preset(name)
  for target in TARGETS:
    shape = baselines.uniform(base, target)
    assert abs(ratio(shape) - target) <= 0.02, (target, ratio(shape))
    assert shape.blocks == base.layers
    # one ratio r for every conv: each width is floor(r * nominal), so all lie in one window of width 1/16
    w = np.array(shape.widths) / np.array(shape.nominal)
    assert w.max() - w.min() < 1 / 16 and len({(n, x) for n, x in zip(shape.nominal, shape.widths)}) == 3
  shallow = baselines.uniform(base, 0.3, depth_ratio=0.6)
  assert abs(ratio(shallow) - 0.3) <= 0.02 and shallow.blocks == baselines.stage_blocks(base, 0.6)
  assert sum(shallow.blocks) < sum(base.layers)
  tight = baselines.uniform(base, 0.15, tolerance=0.005, blocks=(1, 2, 3))
  assert abs(ratio(tight) - 0.15) <= 0.005 and tight.blocks == (1, 2, 3)


def test_uniform_refuses_unreachable_targets():
  base = shape_files.preset("resnet56")
  with pytest.raises(baselines.PruneError, match=r"out of reach .* reachable ratios lie in \[0\.0\d+, 0\.32"):
    baselines.uniform(base, 0.9, blocks=(3, 3, 3))
  with pytest.raises(baselines.PruneError, match=r"must lie in \(0, 1\)"):
    baselines.uniform(base, 1.0)
  with pytest.raises(baselines.PruneError, match="nearest reachable ratios"):
    baselines.uniform(shape_files.preset("resnet8"), 0.5, tolerance=0.0)


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_random_shapes_lie_in_the_space_and_the_band(name):
  base = shape_files.preset(name)
  space = space_lib.search_space(base)
  for target in (0.1, 0.3, 0.5):
    shape = baselines.random_shape(base, target, seed=3)
    assert abs(ratio(shape) - target) <= 0.02
    space.indices_of(shape)  # raises unless every width and depth is a candidate
  a, b = (baselines.random_shape(base, 0.3, seed=s) for s in (1, 2))
  assert a == baselines.random_shape(base, 0.3, seed=1) and a != b
  if name == "resnet20":  # the walk counts one shape per step in Python: keep it to the small network
    walked = baselines.random_shape(base, 0.8, seed=0, sampler="walk", walk_steps=50)
    assert abs(ratio(walked) - 0.8) <= 0.02
    space.indices_of(walked)
  assert baselines.random_shape(base, 0.3, seed=0, search_depth=False).blocks == base.layers


def test_random_gives_up_clearly():
  with pytest.raises(baselines.PruneError, match=r"no shape within 0.02 of MAC ratio 0.9 in 1000 uniform draws"):
    baselines.random_shape(shape_files.preset("resnet20"), 0.9, max_tries=1000)
  with pytest.raises(baselines.PruneError, match=r"out of reach for the search space: reachable ratios lie in"):
    baselines.random_shape(shape_files.preset("resnet20"), 0.01, tolerance=0.005)


# ----------------------------------------------------------------------------- kept weights

def _names(path):
  return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]


def randomized(shape, seed=0):
  """A network with random weights, batch-norm statistics and scales, so that every channel matters.

  Built abstractly and filled from NumPy: random init in JAX would compile an
  initialiser for every new kernel shape.
  """
  net = nnx.eval_shape(lambda: resnet.build(shape))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    name = _names(path)[-1]
    if name == "kernel":
      v = rng.normal(0, np.sqrt(2 / np.prod(x.shape[:-1])), x.shape)
    elif name in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, x.shape)
    else:
      v = rng.normal(0, 0.2, x.shape)
    return jnp.asarray(v, jnp.float32)

  nnx.update(net, jax.tree_util.tree_map_with_path(draw, nnx.state(net)))
  net.eval()
  return net


def masked(net, kept):
  """``net`` with every dropped channel silenced: zero batch-norm scale and offset, zero shortcut columns.

  Silenced channels are exact zeros everywhere, so the masked network computes
  what the network with those channels removed computes.
  """
  out = nnx.eval_shape(lambda: resnet.build(net.shape))
  nnx.update(out, nnx.state(net))
  out.eval()

  def zero(variable, drop):
    v = np.array(variable[...])
    v[..., drop] = 0
    variable.set_value(jnp.asarray(v))

  specs = [b for b in net.shape.layout.blocks if b.index < net.shape.blocks[b.stage]]
  for e, conv in baselines.conv_modules(out).items():
    drop = np.setdiff1d(np.arange(net.shape.widths[e]), kept[e])
    zero(conv.bn.scale, drop)
    zero(conv.bn.bias, drop)
  for spec, block in zip(specs, out.blocks):
    if block.shortcut is not None:
      drop = np.setdiff1d(np.arange(net.shape.widths[spec.convs[-1]]), kept[spec.convs[-1]])
      zero(block.shortcut.conv.kernel, drop)
      if block.shortcut.bn is not None:
        zero(block.shortcut.bn.scale, drop)
        zero(block.shortcut.bn.bias, drop)
  return out


def images(n=4, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 32, 32, 3))


def logits(net, x):
  """Eval-mode logits through one jitted forward (eager execution compiles every op of a new shape)."""
  graphdef, state = nnx.split(net)
  return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def check_gathered(source, pruned_net, kept):
  """Every kernel, batch norm and classifier row of the pruned net is the source's at the kept indices."""
  src, dst = baselines.conv_modules(source), baselines.conv_modules(pruned_net)
  specs = [b for b in source.shape.layout.blocks if b.index < source.shape.blocks[b.stage]]
  feeds = {0: np.arange(source.shape.in_channels)}
  prev = kept[0]
  for spec in specs:
    for e in spec.convs:
      feeds[e], prev = prev, kept[e]
  for e, conv in dst.items():
    k = np.asarray(src[e].conv.kernel[...])[:, :, feeds[e]][:, :, :, kept[e]]
    np.testing.assert_array_equal(np.asarray(conv.conv.kernel[...]), k)
    for name in ("scale", "bias", "mean", "var"):
      np.testing.assert_array_equal(np.asarray(getattr(conv.bn, name)[...]),
                                    np.asarray(getattr(src[e].bn, name)[...])[kept[e]])
  np.testing.assert_array_equal(np.asarray(pruned_net.head.kernel[...]), np.asarray(source.head.kernel[...])[prev])


@pytest.mark.parametrize("name,residual", [("resnet8", "keep"), ("resnet8", "group"), ("resnet11", "group")])
def test_gather_is_the_source_restricted_to_the_kept_channels(name, residual):
  net = randomized(shape_files.preset(name))  # resnet11: one bottleneck block per stage
  rng = np.random.default_rng(1)
  kept = [np.arange(w) for w in net.shape.widths]
  for unit in baselines.units(net, residual):
    w = net.shape.widths[unit[0]]
    chosen = np.sort(rng.choice(w, size=max(1, w // 2 - 1), replace=False))
    for e in unit:
      kept[e] = chosen
  pruned = surgery.gather(net, kept)
  assert pruned.shape.widths == tuple(len(k) for k in kept)
  check_gathered(net, pruned, kept)
  np.testing.assert_allclose(logits(pruned, images()), logits(masked(net, kept), images()), rtol=1e-4, atol=1e-4)
  whole = surgery.gather(net, [np.arange(w) for w in net.shape.widths])
  np.testing.assert_array_equal(logits(whole, images()), logits(net, images()))


def test_units_follow_the_residual_policy():
  net = resnet.build(shape_files.preset("resnet14"))  # 2 blocks per stage: entries 0, (1, 2), (3, 4), ...
  assert baselines.units(net, "keep") == [(1,), (3,), (5,), (7,), (9,), (11,)]
  assert baselines.units(net, "group")[6:] == [(0, 2, 4), (6, 8), (10, 12)]
  with pytest.raises(baselines.PruneError, match="residual"):
    baselines.units(net, "split")


def test_bn_l1_penalty_and_subgradient():
  net = resnet.build(shape_files.preset("resnet8"))
  params = nnx.state(net, nnx.Param)
  mask = optim.bn_scale_mask(params)
  flat = jax.tree.leaves(mask)
  assert sum(flat) == 1 + 3 * 2 + 0  # the stem, two convs per block; the CIFAR stride-2 shortcuts have no BN
  scales = [x for x, m in zip(jax.tree.leaves(params), flat) if m]
  assert float(optim.bn_l1_penalty(params, 0.5)) == pytest.approx(0.5 * sum(float(jnp.abs(s).sum())
                                                                              for s in scales))
  tx = optim.bn_l1_subgradient(1e-2)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  grad = jax.grad(lambda p: optim.bn_l1_penalty(p, 1e-2))(params)
  for u, g, m, p in zip(jax.tree.leaves(updates), jax.tree.leaves(grad), flat, jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(g), rtol=1e-6)
    if m:
      np.testing.assert_allclose(np.asarray(u), 1e-2 * np.sign(np.asarray(p)))
    else:
      assert not np.asarray(u).any()


# ----------------------------------------------------------------------------- pruning a trained network

def tiny_config(**overrides):
  c = train_configs.get_config("resnet8,smoke")
  c.batch_size, c.eval_batch_size, c.num_train_examples, c.epochs = 16, 200, 32, 1
  c.log_every_steps, c.num_devices, c.bn_l1 = 2, 1, 1e-3
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sparsity"))
  result = train.run(tiny_config(), workdir)
  assert result["finished"]
  return workdir


def test_sparsity_training_writes_a_run(sparse_run):
  result = json.load(open(os.path.join(sparse_run, "result.json")))
  assert result["mode"] == "sparsity" and result["bn_l1"] == 1e-3 and result["epochs"] == 1
  assert result["macs"] == cost.count(shape_files.preset("resnet8")).macs and 0 <= result["test_top1"] <= 1
  assert result["mean_abs_gamma"] < 1.0  # the penalty and the steps pulled scales below their initial 1
  shape, _ = models.load_model(sparse_run)
  assert shape == shape_files.preset("resnet8")


@pytest.mark.parametrize("scope,residual", [("layer", "keep"), ("global", "keep"), ("layer", "group"),
                                            ("global", "group")])
def test_l1_prune_lands_in_band_and_keeps_the_largest_filters(sparse_run, scope, residual):
  _, base = models.load_model(sparse_run)
  p = baselines.l1_prune(sparse_run, 0.5, scope=scope, residual=residual)
  assert abs(p.ratio - 0.5) <= 0.02 and p.ratio == pytest.approx(ratio(p.shape))
  assert p.shape.blocks == base.shape.blocks and p.source == sparse_run
  check_gathered(base, p.model, p.kept)
  norms = baselines.l1_norms(base)
  for unit in baselines.units(base, residual):
    kept, e = p.kept[unit[0]], unit[0]
    assert all(np.array_equal(p.kept[m], kept) for m in unit)
    if scope == "layer" and len(unit) == 1:
      dropped = np.setdiff1d(np.arange(len(norms[e])), kept)
      assert not len(dropped) or norms[e][kept].min() >= norms[e][dropped].max()
  if residual == "keep":
    assert p.shape.widths[0] == 16 and p.shape.out_width == 64  # the residual stream keeps its width


def test_slimming_prune_uses_one_threshold_on_gamma(sparse_run):
  _, base = models.load_model(sparse_run)
  p = baselines.slimming_prune(sparse_run, 0.4)
  assert abs(p.ratio - 0.4) <= 0.02 and p.scope == "global"
  check_gathered(base, p.model, p.kept)
  gammas = baselines.bn_scales(base)
  kept_min, dropped_max = np.inf, -np.inf
  for (e,) in baselines.units(base, "keep"):
    dropped = np.setdiff1d(np.arange(len(gammas[e])), p.kept[e])
    if len(p.kept[e]) > 1:  # a conv's last channel survives whatever its scale
      kept_min = min(kept_min, gammas[e][p.kept[e]].min())
    if len(dropped):
      dropped_max = max(dropped_max, gammas[e][dropped].max())
  assert kept_min >= p.level > dropped_max


def test_prune_cli_writes_shape_and_weights(tmp_path, sparse_run, capsys):
  out = str(tmp_path / "r56-uniform.json")
  assert prune_cli.main(["--method", "uniform", "--base", "resnet56", "--target_flops_ratio", "0.5", "--out", out]) == 0
  assert "ratio 0.50" in capsys.readouterr().out
  shape = shape_files.load(out)
  assert abs(ratio(shape) - 0.5) <= 0.02 and baselines.pruning_info(out)["method"] == "uniform"
  out = str(tmp_path / "r8-l1.json")
  assert prune_cli.main(["--method", "l1", "--base", sparse_run, "--target_flops_ratio", "0.6", "--out", out,
                         "--scope", "global"]) == 0
  info = baselines.pruning_info(out)
  assert info["method"] == "l1" and info["scope"] == "global" and abs(info["ratio"] - 0.6) <= 0.02
  loaded_shape, loaded = models.load_model(baselines.weights_dir(out))
  expected = baselines.l1_prune(sparse_run, 0.6, scope="global")
  assert loaded_shape == shape_files.load(out) == expected.shape
  np.testing.assert_array_equal(logits(loaded, images()), logits(expected.model, images()))
  kept = json.load(open(os.path.join(baselines.weights_dir(out), "kept.json")))["kept"]
  assert [len(k) for k in kept] == list(expected.shape.widths)
  capsys.readouterr()
  for argv, message in [
      (["--method", "magnitude", "--base", "resnet56", "--target_flops_ratio", "0.5"], "unknown method 'magnitude'"),
      (["--method", "uniform", "--base", "resnet56", "--target_flops_ratio", "0"], "must lie in (0, 1)"),
      (["--method", "uniform", "--base", "resnet56", "--target_flops_ratio", "0.9", "--blocks", "3,3,3"],
       "reachable ratios lie in"),
      (["--method", "l1", "--base", str(tmp_path / "missing-run"), "--target_flops_ratio", "0.5"], "does not exist"),
      (["--method", "slimming", "--base", "resnet8", "--target_flops_ratio", "0.5"], "--workdir"),
      (["--method", "uniform", "--base", "resnet7", "--target_flops_ratio", "0.5"], "ResNet has depth")]:
    assert prune_cli.main(argv + ["--out", str(tmp_path / "x.json")]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "x.json")


def test_prune_cli_process_error_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "tas_jax.cli.prune", "--method", "uniform", "--base", "resnet20",
                         "--target_flops_ratio", "1.5", "--out", str(tmp_path / "s.json")], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip() == "error: target_flops_ratio must lie in (0, 1), got 1.5"


# ----------------------------------------------------------------------------- the papers' own rules

# Written from the Rethinking code's prune scripts, not from tas_jax: conv ids count every conv from 1 (the stem),
# a block's first conv has an even id, the stage follows from the id, and a pruned conv keeps int(n * (1 - p)).
LI = {("resnet56", "A"): ((16, 20, 38, 54), (0.1, 0.1, 0.1), (18, 36), 10.4),
      ("resnet56", "B"): ((16, 18, 20, 34, 38, 54), (0.6, 0.3, 0.1), (18, 36), 27.5),
      ("resnet110", "A"): ((36,), (0.5, 0.0, 0.0), (36, 72), 15.8),
      ("resnet110", "B"): ((36, 38, 74), (0.5, 0.4, 0.3), (36, 72), 38.5)}


def li_expected_widths(name, variant):
  skip, prob, (end0, end1), _ = LI[name, variant]
  full = shape_files.preset(name)
  widths = list(full.widths)  # widths[i - 1] is the output width of conv id i
  for conv_id in range(2, full.depth, 2):
    if conv_id in skip:
      continue
    stage = 0 if conv_id <= end0 else 1 if conv_id <= end1 else 2
    widths[conv_id - 1] = int(widths[conv_id - 1] * (1 - prob[stage]))
  return tuple(widths)


@pytest.mark.parametrize("name,variant", sorted(LI))
def test_li_variants_match_the_published_shapes(name, variant):
  """Catches a wrong skip list, stage boundary, prune fraction or rounding (int(n * (1 - p)), not n - int(n * p)),
  a pruned second conv, or a MACs reduction off Li et al.'s published one by more than 0.5 points."""
  full = shape_files.preset(name)
  shape = baselines.li_variant_shape(full, variant)
  assert shape.widths == li_expected_widths(name, variant)
  assert shape.blocks == full.layers and shape.widths[0] == 16 and shape.out_width == 64
  reduction = 100 * (1 - ratio(shape))
  assert abs(reduction - LI[name, variant][3]) <= 0.5, reduction


def test_li_variant_ids_and_refusals():
  """Catches the conv-id arithmetic (ResNet-56-A's stage-0 first convs keep 14 of 16, id 16 is whole) and variants
  requested for networks they were not defined on."""
  a = baselines.li_variant_shape(shape_files.preset("resnet56"), "A")
  assert [a.widths[i - 1] for i in range(2, 19, 2)] == [14] * 7 + [16, 14]
  assert [a.widths[i - 1] for i in (20, 22, 38, 40)] == [32, 28, 64, 57]
  assert all(a.widths[i - 1] == a.nominal[i - 1] for i in range(3, 56, 2))  # second convs keep their width
  for base, variant, message in [(shape_files.preset("resnet20"), "A", "exist for the CIFAR ResNet-56 or ResNet-110"),
                                 (shape_files.preset("resnet56"), "C", "variant must be one of A, B"),
                                 (a, "B", "already pruned"),
                                 (shape_files.preset("imagenet-resnet18"), "A", "exist for the CIFAR")]:
    with pytest.raises(baselines.PruneError, match=message):
      baselines.li_variant_shape(base, variant)


def test_li_variant_prune_keeps_the_largest_filters():
  """Catches ranking by the wrong score or direction, or kept weights not gathered from the source."""
  net = randomized(shape_files.preset("resnet56"), seed=4)
  p = baselines.li_variant_prune(net, "B")
  assert p.shape == baselines.li_variant_shape(net.shape, "B") and p.variant == "B" and p.method == "l1"
  assert p.ratio == pytest.approx(ratio(p.shape))
  norms = baselines.l1_norms(net)
  for e in baselines.li_variant_widths(net.shape, "B"):
    dropped = np.setdiff1d(np.arange(len(norms[e])), p.kept[e])
    assert not len(dropped) or norms[e][p.kept[e]].min() >= norms[e][dropped].max()
  check_gathered(net, p.model, p.kept)


def test_slimming_percent_removes_that_share_of_the_channels(sparse_run):
  """Catches a threshold that is not the int(total * p)-th smallest |gamma| over every prunable channel, a >= where
  the rule keeps scales strictly above it, or a per-layer instead of a global cut."""
  _, base = models.load_model(sparse_run)
  p = baselines.slimming_percent(sparse_run, 0.4)
  check_gathered(base, p.model, p.kept)
  gammas = baselines.bn_scales(base)
  scores = np.concatenate([gammas[e] for (e,) in baselines.units(base, "keep")])
  assert p.level == np.sort(scores)[int(len(scores) * 0.4)]
  for (e,) in baselines.units(base, "keep"):
    expected = np.flatnonzero(gammas[e] > p.level)
    np.testing.assert_array_equal(p.kept[e], expected if len(expected) else [np.argmax(gammas[e])])
  with pytest.raises(baselines.PruneError, match=r"prune_percent must lie in \(0, 1\)"):
    baselines.slimming_percent(sparse_run, 1.0)


def test_prune_cli_rules_of_the_papers(tmp_path, sparse_run, capsys):
  """Catches the CLI losing Li et al.'s variants, silently ranking filters without a trained network, or accepting
  flags of one rule with another."""
  out = str(tmp_path / "r110-B.json")
  assert prune_cli.main(["--method", "l1", "--base", "resnet110", "--variant", "B", "--shape_only", "--out", out]) == 0
  printed = capsys.readouterr().out
  assert "38.6 % fewer" in printed and "shape only" in printed
  assert shape_files.load(out).widths == li_expected_widths("resnet110", "B")
  info = baselines.pruning_info(out)
  assert info["variant"] == "B" and info["skip"] == [36, 38, 74] and not os.path.exists(baselines.weights_dir(out))
  run = str(tmp_path / "r56-run")  # a "trained" ResNet-56: random weights saved as a run's model
  net = randomized(shape_files.preset("resnet56"), seed=2)
  models.save_model(os.path.join(run, models.MODEL_DIR), net.shape, nnx.state(net, nnx.Param),
                   nnx.state(net, nnx.BatchStat))
  out = str(tmp_path / "r56-A.json")
  assert prune_cli.main(["--method", "l1", "--base", run, "--variant", "A", "--out", out]) == 0
  assert "10.4 % fewer" in capsys.readouterr().out
  loaded_shape, loaded = models.load_model(baselines.weights_dir(out))
  expected = baselines.li_variant_prune(net, "A")
  assert loaded_shape == expected.shape and baselines.pruning_info(out)["base"] == run
  np.testing.assert_array_equal(logits(loaded, images()), logits(expected.model, images()))
  out = str(tmp_path / "r8-ns.json")
  assert prune_cli.main(["--method", "slimming", "--base", sparse_run, "--prune_percent", "0.3", "--out", out]) == 0
  assert baselines.pruning_info(out)["prune_percent"] == 0.3
  capsys.readouterr()
  for argv, message in [
      (["--method", "l1", "--base", "resnet56", "--variant", "A"], "add --shape_only"),
      (["--method", "l1", "--base", sparse_run, "--variant", "A"], "exist for the CIFAR ResNet-56 or ResNet-110"),
      (["--method", "l1", "--base", "resnet56", "--variant", "a", "--shape_only"], "must be one of A, B"),
      (["--method", "uniform", "--base", "resnet56", "--variant", "A"], "goes with --method l1"),
      (["--method", "l1", "--base", "resnet56", "--variant", "A", "--target_flops_ratio", "0.5"], "drop"),
      (["--method", "l1", "--base", "resnet56", "--variant", "A", "--residual", "group"], "drop --scope"),
      (["--method", "l1", "--base", sparse_run, "--prune_percent", "0.4"], "goes with --method slimming"),
      (["--method", "slimming", "--base", sparse_run, "--prune_percent", "1.5"], "must lie in (0, 1)"),
      (["--method", "slimming", "--base", sparse_run, "--prune_percent", "0.4", "--scope", "layer"], "global"),
      (["--method", "l1", "--base", sparse_run, "--shape_only", "--target_flops_ratio", "0.5"], "--shape_only"),
      (["--method", "uniform", "--base", "resnet56"], "--target_flops_ratio is required")]:
    assert prune_cli.main(argv + ["--out", str(tmp_path / "x.json")]) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
  assert not os.path.exists(tmp_path / "x.json")
