"""Saved networks: a model directory holds ``shape.json`` and Orbax parameters ``params/``.

Training runs write their final network to ``RUN/model`` (and the best
validation epoch to ``RUN/model_best``); a search run writes its exported
network to ``RUN/model`` too, so every finished run can be loaded the same way.
"""

from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx

from tas_jax.core import shapes
from tas_jax.core import shape_files
from tas_jax.nets import resnet
from tas_jax.runtime import parallel
from tas_jax.runtime.files import write_json
from tas_jax.runtime.runs import RunError


MODEL_DIR = "model"
BEST_DIR = "model_best"
INFERENCE_FILE = "inference.json"
_PARTIAL, _OLD = ".partial", ".old"


def _complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "shape.json")) and os.path.isdir(os.path.join(directory, "params"))


def model_dir(run_dir: str) -> str:
  """The model directory of a run directory (or the model directory itself)."""
  if _complete(run_dir):
    return run_dir
  directory = os.path.join(run_dir, MODEL_DIR)
  if not _complete(directory) and _complete(directory + _OLD):  # killed between the two renames of save_model
    return directory + _OLD
  return directory


def save_model(directory: str, shape: shapes.Shape, params, stats, is_main: bool = True,
               inference: dict | None = None) -> None:
  """Write ``directory/params`` (Orbax: ``{"params", "stats"}``) and ``directory/shape.json``, atomically.

  The model is written aside into ``directory.partial`` (``shape.json``, the
  completion marker, last) and then renamed into place; a model it replaces is
  moved to ``directory.old`` first and deleted last, so a process killed at
  any moment leaves a complete model under ``directory`` or, between the two
  renames, under ``directory.old`` (which :func:`load_model` reads then).
  ``inference`` (:func:`tas_jax.runtime.runs.inference_record`: the
  normalisation, class names and input size) is written beside them as
  ``inference.json``, so the directory holds all that inference needs.
  Every process calls it (Orbax coordinates the write); process 0 renames.
  """
  partial, old = directory + _PARTIAL, directory + _OLD
  if is_main and os.path.isdir(partial):  # a write cut short earlier
    shutil.rmtree(partial)
  parallel.barrier("tas_jax.runtime.models.save_model.clean")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(os.path.join(partial, "params")), {"params": params, "stats": stats}, force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  if is_main:
    if inference is not None:
      write_json(os.path.join(partial, INFERENCE_FILE), inference)
    shape_files.save(shape, os.path.join(partial, "shape.json"))
    if os.path.isdir(directory):
      if os.path.isdir(old):
        shutil.rmtree(old)
      os.rename(directory, old)
    os.rename(partial, directory)
    if os.path.isdir(old):
      shutil.rmtree(old)
  parallel.barrier("tas_jax.runtime.models.save_model")


def load_model(run_dir: str, dtype=None) -> tuple[shapes.Shape, resnet.ResNet]:
  """The trained network of a training run, in eval mode, for inference.

  ``run_dir`` is a training run directory (its ``model/`` is read) or a model
  directory itself (``shape.json`` + ``params/``, e.g. ``RUN/model_best``).
  ``dtype`` (e.g. ``jnp.bfloat16``) sets the computation dtype; parameters
  stay float32. Returns ``(shape, model)``; ``model(images)`` maps normalised
  NHWC float images to logits.

  Example::

    shape, model = load_model("runs/r20-base")
    logits = model(data.normalize(images_uint8, dataset.mean, dataset.std))
  """
  directory = model_dir(run_dir)
  shape_path, params_path = os.path.join(directory, "shape.json"), os.path.join(directory, "params")
  if not (os.path.isfile(shape_path) and os.path.isdir(params_path)):
    raise RunError(f"no trained model in {run_dir} (expected {MODEL_DIR}/shape.json and {MODEL_DIR}/params, "
                          "written when a training or search run finishes)")
  shape = shape_files.load(shape_path)
  # Built abstractly: an eager build runs every initialiser (a compilation per conv shape), which the restored
  # values would overwrite anyway; this way loading costs little more than the restore.
  abstract = nnx.eval_shape(lambda: resnet.build(shape, 0, dtype))
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        {"params": params, "stats": stats})
  ckptr = ocp.StandardCheckpointer()
  try:
    restored = ckptr.restore(os.path.abspath(params_path), target)
  except Exception as e:  # a damaged or foreign parameter directory
    raise RunError(f"cannot read the parameters in {params_path}: {type(e).__name__}: {e}") from None
  finally:
    ckptr.close()
  model = nnx.merge(graphdef, restored["params"], restored["stats"])
  model.eval()
  return shape, model
