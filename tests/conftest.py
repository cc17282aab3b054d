"""Test set-up: 8 fake CPU devices, set before JAX initialises its backend."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_ARCHIVE = SHARED / "datasets" / "cifar10-jpeg.tar.gz"
OFFICIAL_SHAPES = SHARED / "reference" / "tas-neurips2019-shapes"


@pytest.fixture
def official_shapes_dir():
  if not OFFICIAL_SHAPES.is_dir():
    pytest.skip("../shared/reference is not beside this checkout")
  return OFFICIAL_SHAPES

# Many tests compile the same step for tiny networks: share compiled programs
# across tests and test subprocesses through JAX's persistent cache.
_CACHE = ROOT / ".pytest_cache" / "jax-compilation"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def prototype_search(search, model, size: int, classes: int, steps: int = 40, noise: float = 0.5, seed: int = 0,
                     step=None):
  """``steps`` search iterations of ``search`` (a ``tas_jax.steps.searchable.Search``) on a learnable toy task:
  noisy copies of one random image per class, tau falling from 5 to 1. ``step``: ``jax.jit(search.step)``
  already compiled elsewhere. Returns (state, first metrics, last)."""
  import jax
  import numpy as np
  state = search.init(model)
  step = step or jax.jit(search.step)
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(classes, size, size, 3)).astype(np.float32)

  def batch():
    y = rng.integers(0, classes, 32)
    return protos[y] + noise * rng.normal(size=(32, size, size, 3)).astype(np.float32), y
  first = None
  for i in range(steps):
    state, m = step(state, batch(), batch(), jax.random.key(i), 5.0 - 4.0 * i / (steps - 1))
    first = first or m
  return state, first, m
