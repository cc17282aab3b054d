"""Data parallelism over every device of every process.

TAS only needs data parallelism: parameters, optimiser states and architecture
logits are replicated, batches are split along their leading axis over a 1-D
``"data"`` mesh, and ``jax.jit`` inserts the gradient all-reduce. The same code
runs on one CPU, one GPU host or a TPU pod slice:

* :func:`initialize_distributed` joins the multi-process runtime when there is
  one (explicit coordinator arguments, or a TPU pod / SLURM / Open MPI job that
  JAX detects by itself) and is a no-op on a single host;
* :func:`make_mesh` builds the mesh over ``jax.devices()`` (global devices);
* :func:`global_batch` assembles each process's slice of a batch into global
  ``jax.Array`` s, :func:`replicate` puts parameters on every device.

Every process must run the same program and call these functions in the same
order, with the same shapes: that is what makes the collectives line up.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

_log = logging.getLogger(__name__)
# Set once the multi-process question has been answered, so that repeated calls
# neither re-run cluster detection nor repeat its log lines.
_distributed_checked = False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int = 300,
) -> tuple[int, int]:
  """Joins the JAX multi-process runtime if this run is distributed.

  With any of ``coordinator_address``, ``num_processes`` or ``process_id``
  given, calls ``jax.distributed.initialize`` with them (JAX fills in the
  others from the cluster environment) and lets its errors through. With none
  given, tries ``jax.distributed.initialize()`` with auto-detection (Cloud TPU
  pods, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``); the ``ValueError`` it
  raises when no cluster is found means "single process" and is swallowed.

  Must run before anything touches the JAX backend (``jax.devices()``, array
  creation); called later with no arguments it only reports the current state.
  Safe to call more than once.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: index of this process, ``0 <= process_id < num_processes``.
    local_device_ids: restricts this process to some of its local devices
      (e.g. one GPU per process).
    initialization_timeout: seconds to wait for every process to connect.

  Returns:
    ``(jax.process_index(), jax.process_count())``.
  """
  global _distributed_checked
  explicit = any(a is not None for a in (coordinator_address, num_processes, process_id))
  if jax.distributed.is_initialized() or (_distributed_checked and not explicit):
    return jax.process_index(), jax.process_count()
  kwargs: dict[str, Any] = dict(
      local_device_ids=local_device_ids, initialization_timeout=initialization_timeout)
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
  else:
    try:
      jax.distributed.initialize(**kwargs)
    except ValueError as e:
      # JAX's "coordinator_address should be defined": no cluster was detected.
      _log.info("Not a multi-process run (%s); running as a single process.", e)
    except RuntimeError as e:
      # The backend is already up, so it is too late to join a cluster. That
      # only matters when the environment describes one.
      level = logging.WARNING if _cluster_hint() else logging.DEBUG
      _log.log(level, "jax.distributed.initialize() skipped: %s", e)
  _distributed_checked = True
  index, count = jax.process_index(), jax.process_count()
  if count > 1:
    _log.info("Process %d of %d, %d local / %d global devices.", index, count,
              jax.local_device_count(), jax.device_count())
  return index, count


def _cluster_hint() -> str | None:
  """The environment variable suggesting a multi-process job, if any."""
  for var, multi in (("JAX_COORDINATOR_ADDRESS", False), ("MEGASCALE_COORDINATOR_ADDRESS", False),
                     ("SLURM_NTASKS", True), ("OMPI_COMM_WORLD_SIZE", True)):
    value = os.environ.get(var)
    if value and (not multi or (value.isdigit() and int(value) > 1)):
      return var
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "TPU_WORKER_HOSTNAMES"
  return None


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and summaries."""
  return jax.process_index() == 0


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"data"`` over all devices of all processes.

  The axis type is always given: ``jax.make_mesh`` defaults to
  ``AxisType.Explicit``, under which ``with_sharding_constraint`` refuses
  specs and sharding shows up in types; this project relies on the
  compiler-propagated (``Auto``) behaviour.

  Args:
    devices: devices to use, in mesh order; default ``jax.devices()``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device")
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``"data"``, the rest whole: how batches live."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device: how parameters and optimiser states live."""
  return NamedSharding(mesh, P())


def local_batch_size(
    global_batch: int, process_count: int | None = None, device_count: int | None = None
) -> int:
  """The number of examples each process loads per step.

  Args:
    global_batch: examples per step over all devices.
    process_count: default ``jax.process_count()``.
    device_count: devices the batch is split over; default ``jax.device_count()``.

  Raises:
    ValueError: if ``global_batch`` does not split evenly over devices or
      processes (each device must get the same number of examples).
  """
  process_count = jax.process_count() if process_count is None else process_count
  device_count = jax.device_count() if device_count is None else device_count
  if global_batch <= 0:
    raise ValueError(f"the global batch size must be positive, got {global_batch}")
  for n, what in ((device_count, "devices"), (process_count, "processes")):
    if n <= 0 or global_batch % n:
      raise ValueError(
          f"global batch size {global_batch} does not split evenly over {n} {what}; "
          f"use a multiple of {n} (e.g. {max(n, global_batch // n * n)})")
  return global_batch // process_count


def global_batch(mesh: Mesh, local_tree: Any) -> Any:
  """Builds global arrays, sharded along ``"data"``, from this process's slices.

  Every process passes the examples it loaded (numpy arrays with the same
  leading size on all processes); the result is one ``jax.Array`` per leaf
  whose leading axis is the concatenation over processes, in process order of
  the mesh. Works unchanged with one process.

  Args:
    mesh: a mesh from :func:`make_mesh`.
    local_tree: pytree of arrays whose leading axis is this process's batch.

  Raises:
    ValueError: for scalar leaves, leaves of different leading sizes, or a
      local batch that does not split over this process's devices.
  """
  sharding = data_sharding(mesh)
  leaves, treedef = jax.tree.flatten(local_tree)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  sizes = set()
  for leaf in leaves:
    if np.ndim(leaf) == 0:
      raise ValueError("global_batch needs arrays with a leading batch axis, got a scalar")
    sizes.add(np.shape(leaf)[0])
  if len(sizes) > 1:
    raise ValueError(f"all leaves of a batch need the same leading size, got {sorted(sizes)}")
  if sizes and local_devices and next(iter(sizes)) % local_devices:
    raise ValueError(
        f"the local batch of {next(iter(sizes))} examples does not split over this "
        f"process's {local_devices} devices")
  out = [jax.make_array_from_process_local_data(sharding, np.asarray(leaf)) for leaf in leaves]
  return jax.tree.unflatten(treedef, out)


def _host_value(x: Any) -> np.ndarray:
  """``x`` on the host, with the dtype ``jnp.asarray`` would give it."""
  host = np.asarray(x)
  return host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Copies every leaf of ``tree`` onto every device of ``mesh``.

  Every process must pass the same values. With several processes, values
  that live on one process (host arrays, single-device arrays) are built
  through ``make_array_from_callback`` from a host copy, which needs no
  cross-process transfer; global arrays are resharded by ``device_put``.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x: Any) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    host = _host_value(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name``; free with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """Logical OR of ``flag`` over processes (a collective: all must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(bool(flag), dtype=np.int32))
  return bool(np.any(flags))


def all_processes(flag: bool) -> bool:
  """Logical AND of ``flag`` over processes (a collective: all must call it)."""
  return not any_process(not flag)
