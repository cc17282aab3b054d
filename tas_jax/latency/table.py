"""Measured latency tables for a latency-aware search: time per (layer, input width, output width).

Every searchable conv of a search space, with its batch norm (as an eval-mode
affine) and ReLU, is timed on the current device for every pair of an input
candidate width and an output candidate width, as is every shortcut conv.
Expected latency is then the bilinear form p_in^T T p_out summed over layers
(:func:`predicted`, through the supernet's cost graph), differentiable like the expected MACs.
Timings are cached per device kind and batch size, so a table is measured
once per machine type. The parts do not add up exactly to the whole (pooling,
the classifier, per-op overhead, fusion), so an affine map ``scale * sum +
offset`` is fitted to the measured latencies of the unpruned network and of
the smallest network of the space; :func:`predicted` applies it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tas_jax.latency import measure as latency_lib
from tas_jax.nets import conv as conv_lib
from tas_jax.nets import resnet as resnet_lib
from tas_jax.core import shapes as shapes_lib

log = logging.getLogger("tas_jax")


@dataclasses.dataclass(frozen=True, eq=False)
class LatencyTables:
  """Seconds per conv unit of a search space; indices are candidate indices of the rows involved."""

  stem: np.ndarray  # [K]
  convs: dict  # conv index -> [K_in, K_out]
  shortcut: dict  # (stage, block) -> [K_in, K_out]
  projection: dict  # (stage, block) -> [K_in, K_out], zero where the widths are equal
  head: np.ndarray  # [K] over the last conv's candidates
  offset: float
  device: str
  batch_size: int
  scale: float = 1.0

  def named(self) -> dict:
    """The tables by the names the supernet's cost records carry, one axis per recorded width."""
    d = {"stem": np.asarray(self.stem)[None, :], "head": np.asarray(self.head)[:, None]}
    d.update({f"conv{ci}": v for ci, v in self.convs.items()})
    d.update({f"shortcut{s},{b}": v for (s, b), v in self.shortcut.items()})
    d.update({f"projection{s},{b}": v for (s, b), v in self.projection.items()})
    return d


def _cache_file(cache_dir: str | None, device: str, batch_size: int) -> str:
  root = cache_dir or os.environ.get("TAS_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tas_jax")
  safe = "".join(ch if ch.isalnum() else "-" for ch in device)
  return os.path.join(root, "latency", f"{safe}-b{batch_size}.json")


def _unit(kernel: int, stride: int, pool: bool, relu: bool):
  def f(x, w, scale, shift):
    if pool:
      x = resnet_lib.avg_pool2(x)
    y = conv_lib.conv(x, w, stride)
    y = y * scale + shift
    return jax.nn.relu(y) if relu else y

  return f


def measure_unit(kernel: int, stride: int, in_hw: int, cin: int, cout: int, batch_size: int, *, pool: bool = False,
                 relu: bool = True, reps: int = 10, trials: int = 3) -> float:
  """Median seconds of one conv + affine (+ ReLU) on the default device.

  The unit runs ``reps`` times inside one jitted loop whose iterations depend
  on each other, so dispatch overhead is amortised and nothing is hoisted.
  """
  f = _unit(kernel, stride, pool, relu)
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch_size, in_hw, in_hw, cin), jnp.float32)
  w = jax.random.normal(key, (kernel, kernel, cin, cout), jnp.float32) * 0.1
  scale, shift = jnp.ones((cout,)), jnp.zeros((cout,))

  @jax.jit
  def loop(x, w, scale, shift):
    def body(_, carry):
      y = f(x + carry, w, scale, shift)
      return carry + 1e-12 * y[0, 0, 0, 0]
    return jax.lax.fori_loop(0, reps, body, jnp.float32(0.0))

  jax.block_until_ready(loop(x, w, scale, shift))
  times = []
  for _ in range(trials):
    t = time.perf_counter()
    jax.block_until_ready(loop(x, w, scale, shift))
    times.append(time.perf_counter() - t)
  return statistics.median(times) / reps


class _Timer:
  """Unit timings with a per-device cache on disk."""

  def __init__(self, batch_size: int, cache_dir: str | None):
    self.batch_size = batch_size
    self.device = str(jax.devices()[0].device_kind)
    self.path = _cache_file(cache_dir, self.device, batch_size)
    self.cache = {}
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          self.cache = json.load(f)
      except (OSError, json.JSONDecodeError):
        log.warning("latency cache %s is unreadable; measuring again", self.path)
    self.new = 0

  def __call__(self, kernel, stride, in_hw, cin, cout, pool=False, relu=True) -> float:
    # A ReLU fuses into its conv at no measurable cost, so units differing only there share a timing.
    key = f"k{kernel}s{stride}h{in_hw}i{cin}o{cout}p{int(pool)}"
    if key not in self.cache:
      self.cache[key] = measure_unit(kernel, stride, in_hw, cin, cout, self.batch_size, pool=pool, relu=relu)
      self.new += 1
    return self.cache[key]

  def save(self):
    if not self.new:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    tmp = f"{self.path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(self.cache, f)
    os.replace(tmp, self.path)


def _values(space, row):
  return [int(v) for v in space.width_table[row]]


def build_tables(model, batch_size: int = 1, cache_dir: str | None = None, calibrate: bool = True) -> LatencyTables:
  """Measure (or read from the cache) every unit latency of a supernet's space at ``batch_size``."""
  space = model.space
  lay, base = space.layout, space.base
  timer = _Timer(batch_size, cache_dir)
  t0 = time.perf_counter()
  stem = lay.convs[0]
  in_hw = base.image_size
  stem_t = np.array([timer(stem.kernel, stem.stride, in_hw, base.in_channels, c) for c in _values(space, 0)])
  convs, shortcut, projection = {}, {}, {}
  prev_row = 0  # the row whose candidates feed the next block (all end blocks of a stage share them)
  for b in lay.blocks:
    src = prev_row
    hw = b.in_hw
    for ci in b.convs:
      spec = lay.convs[ci]
      relu = ci != b.convs[-1]
      convs[ci] = np.array([[timer(spec.kernel, spec.stride, hw, a, c, relu=relu) for c in _values(space, ci)]
                            for a in _values(space, src)])
      src, hw = ci, spec.out_hw
    last = b.convs[-1]
    key = (b.stage, b.index)
    ins, outs = _values(space, prev_row), _values(space, last)
    if b.stride > 1 or b.nominal_in != b.nominal_out:
      pool = b.stride > 1 and base.shortcut == "avgpool"
      stride = 1 if pool else b.stride
      shortcut[key] = np.array([[timer(1, stride, b.in_hw, a, c, pool=pool, relu=False) for c in outs] for a in ins])
    else:
      projection[key] = np.array([[0.0 if a == c else timer(1, 1, b.in_hw, a, c, relu=False) for c in outs]
                                  for a in ins])
    prev_row = last
  head = np.zeros(space.width_table.shape[1])
  timer.save()
  tables = LatencyTables(stem_t, convs, shortcut, projection, head, 0.0, timer.device, batch_size)
  if timer.new:
    log.info("measured %d conv latencies in %.0f s (cached in %s)", timer.new, time.perf_counter() - t0, timer.path)
  if calibrate:
    tables = calibrate_tables(model, tables)
  return tables


def predicted(model, tables: LatencyTables, width_dist, depth_dist):
  """Latency (seconds) predicted for a supernet's width [L, K] and depth [S, Kd] distributions, differentiable.

  With softmax probabilities it is the expected latency (exact for independent widths); with one-hot
  distributions the predicted latency of that shape. Counts what the pruned net runs: projection shortcuts
  and the depth-weighted widths after truncated stages.
  """
  return tables.scale * model.table_cost(tables.named(), width_dist, depth_dist) + tables.offset


def predict(model, tables: LatencyTables, shape: shapes_lib.Shape) -> float:
  """Predicted latency (seconds) of a shape of a supernet's space."""
  space = model.space
  wi, di = space.indices_of(shape)
  wd = jax.nn.one_hot(wi, space.width_table.shape[1])
  dd = jax.nn.one_hot(di, space.depth_table.shape[1])
  return float(predicted(model, tables, wd, dd))


def calibrate_tables(model, tables: LatencyTables) -> LatencyTables:
  """Fit ``scale * sum_of_units + offset`` to the measured latency of the largest and smallest networks."""
  space = model.space
  raw = dataclasses.replace(tables, scale=1.0, offset=0.0)
  small = space.shape_from_indices(np.zeros(space.width_table.shape[0], np.int32),
                                   np.zeros(space.depth_table.shape[0], np.int32))
  points = []
  for shape in (space.base, small):
    measured = latency_lib.measure_latency(shape, tables.batch_size, runs=30)["median_ms"] / 1e3
    points.append((predict(model, raw, shape), measured))
  (p1, m1), (p0, m0) = points
  scale = (m1 - m0) / (p1 - p0) if p1 > p0 else 1.0
  scale = min(max(scale, 0.25), 4.0)  # a wild fit means noisy timings: stay near the measured parts
  return dataclasses.replace(tables, scale=scale, offset=m1 - scale * p1)


def save_tables(path: str, tables: LatencyTables) -> None:
  """Write tables (with their calibration) as JSON, atomically, so a resumed search optimises the same costs."""
  d = {"stem": tables.stem.tolist(), "head": tables.head.tolist(), "offset": tables.offset, "scale": tables.scale,
       "device": tables.device, "batch_size": tables.batch_size,
       "convs": {str(k): v.tolist() for k, v in tables.convs.items()},
       "shortcut": {f"{s},{b}": v.tolist() for (s, b), v in tables.shortcut.items()},
       "projection": {f"{s},{b}": v.tolist() for (s, b), v in tables.projection.items()}}
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(d, f)
  os.replace(tmp, path)


def load_tables(path: str) -> LatencyTables:
  with open(path) as f:
    d = json.load(f)
  pair = lambda k: tuple(int(v) for v in k.split(","))
  return LatencyTables(np.array(d["stem"]), {int(k): np.array(v) for k, v in d["convs"].items()},
                       {pair(k): np.array(v) for k, v in d["shortcut"].items()},
                       {pair(k): np.array(v) for k, v in d["projection"].items()}, np.array(d["head"]),
                       float(d["offset"]), d["device"], int(d["batch_size"]), float(d["scale"]))
