"""What one search iteration does: which state each half changes, which data it sees, the cost-loss rule, keys.

Expected values come from the formulas (TAS's sign rule, PyTorch's SGD and
cosine schedules), not from the step's own code.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from search_test import tiny_config
from tas_jax.core import cost
from tas_jax.core import shape_files

from tas_jax.programs import search
from tas_jax.steps import search as search_lib
from tas_jax.nets import supernet
BATCH = 16


def config(**overrides):
  c = tiny_config(**overrides)
  assert c.batch_size == BATCH
  return c


def batch(seed):
  rng = np.random.default_rng(seed)
  return {"images": jnp.asarray(rng.integers(0, 255, (BATCH, 32, 32, 3)), jnp.uint8),
          "labels": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)}


@functools.lru_cache(maxsize=None)
def problem_and_state(**overrides):
  return search_lib.build(config(**overrides), 10, 4)


def fresh(**overrides):
  problem, state = problem_and_state(**overrides)
  return problem, jax.tree.map(jnp.array, state)


def same(a, b):
  return all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@functools.lru_cache(maxsize=None)
def jitted(problem, name):
  fn = getattr(search_lib, name)
  if name == "weight_step":
    return jax.jit(lambda st, b, keys, tau: fn(problem, st, b, keys, tau))
  if name == "arch_step":
    return jax.jit(lambda st, b, keys, tau, target: fn(problem, st, b, keys, tau, target))
  return jax.jit(lambda st, tb, vb, tau: fn(problem, st, tb, vb, tau))


def test_each_half_changes_only_its_own_state():
  """Catches: the weight step moving the architecture (or its Adam state), the architecture step moving the
  weights (or the SGD momentum), and running statistics not following ``arch_step_updates_bn``."""
  problem, state = fresh()
  w_keys, a_keys = search_lib.step_keys(problem, 0)
  after_w, _ = jitted(problem, "weight_step")(state, batch(0), w_keys, 2.0)
  assert same(after_w["arch"], state["arch"]) and same(after_w["a_opt"], state["a_opt"])
  assert not same(after_w["weights"], state["weights"]) and not same(after_w["w_opt"], state["w_opt"])
  assert not same(after_w["stats"], state["stats"])
  after_a, _ = jitted(problem, "arch_step")(after_w, batch(1), a_keys, 2.0, problem.target_cost)
  assert same(after_a["weights"], after_w["weights"]) and same(after_a["w_opt"], after_w["w_opt"])
  assert not same(after_a["arch"], after_w["arch"]) and not same(after_a["a_opt"], after_w["a_opt"])
  assert not same(after_a["stats"], after_w["stats"])  # official: the arch forward runs in train mode too
  problem2, state2 = fresh(arch_step_updates_bn=False)
  after_w2, _ = jitted(problem2, "weight_step")(state2, batch(0), w_keys, 2.0)
  after_a2, _ = jitted(problem2, "arch_step")(after_w2, batch(1), a_keys, 2.0, problem2.target_cost)
  assert same(after_a2["stats"], after_w2["stats"])


def _bn_rows(problem, state, idx):
  """(drawn rows, undrawn rows) of every per-candidate batch-norm scale and offset, as flat lists of arrays."""
  model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
  drawn, undrawn = [], []
  for conv, row in supernet.candidate_rows(model):
    if not conv.norm:
      continue
    chosen = set(np.asarray(idx)[row].tolist())
    for name in ("scale", "offset"):
      values = np.asarray(getattr(conv, name)[...])
      for j in range(values.shape[0]):
        (drawn if j in chosen else undrawn).append(values[j])
  return drawn, undrawn


@pytest.mark.parametrize("freeze", [True, False])
def test_undrawn_candidates_and_the_weight_optimiser(freeze):
  """Catches: weight decay and momentum moving the batch norms of candidates a step did not draw (PyTorch skips
  parameters without a gradient), or, with freeze_undrawn_bn=False, the switch doing nothing."""
  problem, state = fresh(freeze_undrawn_bn=freeze)
  step = jitted(problem, "weight_step")
  for s in range(2):  # two steps, so that momentum from the first step could leak into the second
    w_keys, _ = search_lib.step_keys(problem, s)
    model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
    idx = model.sample(w_keys[1], 2.0).idx  # the draw of this weight step, replayed
    before_drawn, before_undrawn = _bn_rows(problem, state, idx)
    state, _ = step(state, batch(s), w_keys, 2.0)
    after_drawn, after_undrawn = _bn_rows(problem, state, idx)
    moved = [not np.array_equal(a, b) for a, b in zip(before_undrawn, after_undrawn)]
    assert any(moved) != freeze
    assert all(not np.array_equal(a, b) for a, b in zip(before_drawn, after_drawn))


def test_architecture_step_sees_the_validation_half():
  """Catches: the architecture step computing its loss on the training-half batch."""
  problem, state = fresh(lr=0.0)  # the weight step then changes no weight, so only the data can matter
  step = jitted(problem, "search_step")
  tb, tb2, vb, vb2 = batch(0), batch(1), batch(2), batch(3)
  a1, _ = step(jax.tree.map(jnp.array, state), tb, vb, jnp.float32(2.0))
  a2, _ = step(jax.tree.map(jnp.array, state), tb2, vb, jnp.float32(2.0))
  a3, _ = step(jax.tree.map(jnp.array, state), tb, vb2, jnp.float32(2.0))
  assert same(a1["arch"], a2["arch"])
  assert not same(a1["arch"], a3["arch"])


def _set_arch(problem, state, column):
  """Width logits whose argmax is ``column`` of every row (0: narrowest, -1: widest), uniform depths."""
  wl = np.zeros(problem.space.width_table.shape, np.float32)
  wl[np.arange(wl.shape[0]), column % wl.shape[1]] = 1.0
  model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
  model.width_logits[...] = jnp.asarray(wl)
  return {**state, "arch": nnx.state(model, supernet.ArchParam)}, model


@pytest.mark.parametrize("weight", [3.0])  # not the default 2, so that a hard-coded lambda fails too
def test_cost_loss_sign_comes_from_the_discrete_cost(weight):
  """Catches: a flipped sign of the cost loss, the sign taken from the expected instead of the discrete cost,
  lambda not applied, a loss outside the band's edges, and a cost loss that does not move E the right way."""
  problem, state = fresh(cost_weight=weight, target_flops_ratio=0.5)
  full = cost.count(problem.space.base).macs
  low, high = cost.cost_band(0.5 * full, full, "official", 0.05)
  _, a_keys = search_lib.step_keys(problem, 0)
  arch_step = jitted(problem, "arch_step")
  for column, sign in ((-1, 1.0), (0, -1.0)):
    st, model = _set_arch(problem, state, column)
    f = cost.as_int(model.discrete_cost(*model.argmax()))
    assert (f > high) if sign > 0 else (f < low)
    e = float(model.expected_cost(model.width_probs(), model.depth_probs()))
    new, m = arch_step(st, batch(1), a_keys, 2.0, problem.target_cost)
    np.testing.assert_allclose(float(m["cost_loss"]), sign * weight * math.log(e), rtol=1e-5)
    new_model = nnx.merge(problem.graphdef, new["weights"], new["arch"], new["stats"], copy=True)
    e_new = float(new_model.expected_cost(new_model.width_probs(), new_model.depth_probs()))
    assert (e_new < e) if sign > 0 else (e_new > e)
  # In the band: no cost loss. A target just above the widest-argmax cost puts F inside [R - 0.05 MAX, R].
  st, model = _set_arch(problem, state, -1)
  f = cost.as_int(model.discrete_cost(*model.argmax()))
  _, m = arch_step(st, batch(1), a_keys, 2.0, jnp.float32(f + 0.01 * full))
  assert float(m["cost_loss"]) == 0.0


def test_sub_steps_and_iterations_draw_distinct_keys(monkeypatch):
  """Catches: the weight and architecture steps sharing one Gumbel sample or augmentation, or every iteration
  reusing the keys of the first."""
  original_w, original_a = search_lib.weight_step, search_lib.arch_step

  def spy_w(problem, state, b, keys, tau):
    new, m = original_w(problem, state, b, keys, tau)
    return new, {**m, "w_keys": jnp.stack([jax.random.key_data(k) for k in keys])}

  def spy_a(problem, state, b, keys, tau, target):
    new, m = original_a(problem, state, b, keys, tau, target)
    return new, {**m, "a_keys": jnp.stack([jax.random.key_data(k) for k in keys])}

  monkeypatch.setattr(search_lib, "weight_step", spy_w)
  monkeypatch.setattr(search_lib, "arch_step", spy_a)
  problem, state = fresh()
  step = jax.jit(lambda st, tb, vb, tau: search_lib.search_step(problem, st, tb, vb, tau))
  keys = []
  for s in range(2):
    state, m = step(state, batch(s), batch(s + 10), jnp.float32(2.0))
    keys += [np.asarray(m["w_keys"][0]), np.asarray(m["w_keys"][1]), np.asarray(m["a_keys"][0]),
             np.asarray(m["a_keys"][1])]
  assert len({k.tobytes() for k in keys}) == len(keys) == 8


def test_official_run_trains_the_raw_argmax_and_writes_the_best_genotype(tmp_path):
  """Catches: the official preset band-fitting the trained shape, a best genotype chosen outside the +-0.05 band
  or not by validation accuracy, and tau or the learning rate not following the per-epoch official schedules."""
  c = config(target_flops_ratio=0.5, epochs=3)
  assert not c.fit_to_band and not c.exact_cost and c.valid_sampling == "replacement"
  out = str(tmp_path / "run")
  result = search.run(c, out)
  last = shape_files.load(os.path.join(out, "shapes", "epoch_002.json"))
  assert shape_files.load(os.path.join(out, "shape.json")) == last == shape_files.load(os.path.join(out, "shape_argmax.json"))
  records = [json.loads(l) for l in open(os.path.join(out, "genotypes.jsonl"))]
  assert [r["epoch"] for r in records] == [0, 1, 2]
  in_band = [r for r in records if abs(r["flops_ratio"] - 0.5) <= 0.05]
  if in_band:
    best = max(in_band, key=lambda r: (r["val_acc"], r["epoch"]))
    assert result["best_epoch"] == best["epoch"]
    assert shape_files.load(os.path.join(out, "shape_best.json")) == shape_files.load(os.path.join(out, best["shape"]))
  else:
    assert not os.path.exists(os.path.join(out, "shape_best.json")) and "best_epoch" not in result
  spe = result["steps"] // 3
  for rec in map(json.loads, open(os.path.join(out, "metrics.jsonl"))):
    if "tau" not in rec or "step" not in rec or "lr" not in rec:
      continue
    e = (rec["step"] - 1) // spe
    tau = 0.1 + (5.0 - 0.1) * (1 + math.cos(math.pi * e / 3)) / 2
    lr = 0.1 * (1 + math.cos(math.pi * e / 3)) / 2
    np.testing.assert_allclose(rec["tau"], tau, rtol=1e-5)
    np.testing.assert_allclose(rec["lr"], lr, rtol=1e-5)


def test_best_genotype_rule(tmp_path):
  """Catches: the best genotype taken from the asymmetric loss band, from the last epoch, or by cost."""
  path = tmp_path / "genotypes.jsonl"
  recs = [(0, 0.30, 0.51), (1, 0.50, 0.56), (2, 0.45, 0.46), (3, 0.40, 0.54), (4, 0.20, 0.50)]
  path.write_text("".join(json.dumps({"epoch": e, "val_acc": a, "flops_ratio": r, "shape": f"s{e}"}) + "\n"
                          for e, a, r in recs))
  assert search_lib.best_genotype(str(path), 0.5)["epoch"] == 2  # epoch 1 (0.56) is outside 0.5 +- 0.05
  assert search_lib.best_genotype(str(path), 0.9) is None


def test_search_converges_into_the_band_from_uniform_logits():
  """Catches: a cost loss that does not steer the search (wrong sign, no gradient into the logits, E not
  depending on the probabilities): from uniform logits and a target far below the start, the raw argmax (no
  band fitting) must reach the band and stay there."""
  problem, state = fresh(target_flops_ratio=0.3, arch_lr=0.02)
  model = nnx.merge(problem.graphdef, state["weights"], state["arch"], state["stats"], copy=True)
  model.width_logits[...] = jnp.zeros_like(model.width_logits[...])
  model.depth_logits[...] = jnp.zeros_like(model.depth_logits[...])
  state = {**state, "arch": nnx.state(model, supernet.ArchParam)}
  full = cost.count(problem.space.base).macs
  low, high = (b / full for b in cost.cost_band(0.3 * full, full, "official", 0.05))
  step = jitted(problem, "search_step")
  ratios = []
  for s in range(60):
    state, m = step(state, batch(s), batch(1000 + s), jnp.float32(5.0))
    ratios.append(float(m["flops_ratio"]))
  first = next((i for i, r in enumerate(ratios) if low <= r <= high), None)
  assert first is not None, f"never reached [{low:.3f}, {high:.3f}]: {ratios[-5:]}"
  tail = ratios[first:]
  # Staying there: the coarse widths of a tiny network make one flip of the argmax move its cost by a few
  # percent, so the band gets a small margin; excursions must be rare and end in the band.
  trace = " ".join(f"{r:.3f}" for r in ratios)
  assert sum(low - 0.03 <= r <= high + 0.03 for r in tail) >= 0.8 * len(tail), trace
  assert all(low - 0.03 <= r <= high + 0.03 for r in ratios[-5:]), trace
