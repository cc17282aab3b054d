"""A trained network as a self-contained artefact to deploy: serialised StableHLO or ONNX, and a model card.

:func:`export_run` turns any run that saved a network (a teacher, a
distilled student, a fine-tuned or baseline network, a search's exported
network) into a directory holding

* ``model.jax_export``: the network lowered with :mod:`jax.export` and
  serialised. It takes raw ``uint8`` RGB images, NHWC, of the size it was
  trained at, with a symbolic batch size, and returns logits: the
  normalisation and the weights are inside, so using it needs nothing of
  this package::

    import jax, numpy as np
    with open("out/model.jax_export", "rb") as f:
      model = jax.export.deserialize(bytearray(f.read()))
    logits = model.call(np.zeros((8, 32, 32, 3), np.uint8))

* ``model.onnx`` (on request): the same function converted by ``jax2onnx``,
  for ONNX Runtime and other ONNX consumers; input ``images``, output
  ``logits``.

* ``model_card.json``: what the artefact is (shape, MACs, parameters, the
  accuracy measured by its run, normalisation, class names, input) and where
  it came from (run directory, configuration, package and JAX versions).

Serialising StableHLO needs ``flatbuffers`` (the ``export`` extra); ONNX
needs ``jax2onnx`` and its ONNX packages (see the README).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tas_jax import data as data_lib
from tas_jax.core import cost as cost_lib
from tas_jax.core import shapes
from tas_jax.runtime import files, models
from tas_jax.runtime.runs import RunError

CARD = "model_card.json"


class ExportError(RunError):
  """A run that cannot be exported, or an unusable output; the message says why."""


def _version() -> str:
  try:
    return importlib.metadata.version("tas_jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def inference_function(model, mean, std):
  """``f(uint8 images [B, S, S, 3]) -> logits``: the eval-mode network with its normalisation, weights as constants."""
  graphdef, state = nnx.split(model)

  def serve(images):
    return nnx.merge(graphdef, state)(data_lib.normalize(images, mean, std))

  return serve


def export_run(run_dir: str, out_dir: str, formats: str | Sequence[str] = "stablehlo") -> dict:
  """Writes the network ``run_dir`` saved to ``out_dir`` in ``formats``, with ``model_card.json`` beside it.

  ``formats``: ``"stablehlo"`` (``model.jax_export``), ``"onnx"``
  (``model.onnx``), or both (a sequence, or ``"stablehlo,onnx"``). Returns the
  model card. Raises :class:`ExportError` naming the problem: no such run, no
  saved network (a search or training run that has not finished), a network
  saved without its ``inference.json`` (by an older version: train it again),
  an unsupported format or a missing optional dependency, an unusable
  ``out_dir``. Nothing is written unless the run exports.
  """
  formats = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ExportError(f"format {', '.join(map(repr, unknown)) or 'none'} is not supported; formats: "
                      f"{', '.join(FORMATS)}")
  if not os.path.isdir(run_dir):
    raise ExportError(f"no such run directory: {run_dir}")
  problem = files.output_problem(os.path.join(out_dir, CARD))
  if problem:
    raise ExportError(f"--out: {problem}")
  shape, model = models.load_model(run_dir)  # RunError (one line) for a missing or damaged model
  directory = models.model_dir(run_dir)
  info = files.read_json(os.path.join(directory, models.INFERENCE_FILE), None)
  if info is None:
    raise ExportError(f"{directory} has no {models.INFERENCE_FILE} (the normalisation and class names of its "
                      "data): it was saved by an older version; train it again to export it")
  serve = inference_function(model, info["mean"], info["std"])
  blobs = {ARTEFACTS[f]: WRITERS[f](serve, (shape.image_size, shape.image_size, shape.in_channels)) for f in formats}
  os.makedirs(out_dir, exist_ok=True)
  for name, blob in blobs.items():
    files.write_bytes(os.path.join(out_dir, name), blob)
  # A model directory given itself (RUN/model_best) belongs to the run above it.
  source = os.path.dirname(os.path.abspath(directory)) if os.path.abspath(directory) == os.path.abspath(run_dir) \
      else run_dir
  card = model_card(source, os.path.basename(directory), shape, info)
  card["artefacts"] = {f: ARTEFACTS[f] for f in formats}
  files.write_json(os.path.join(out_dir, CARD), card)
  return card


def _stablehlo(serve, image: tuple[int, int, int]) -> bytes:
  batch = jax.export.symbolic_shape("batch")[0]
  try:
    return jax.export.export(jax.jit(serve))(jax.ShapeDtypeStruct((batch, *image), jnp.uint8)).serialize()
  except ImportError as e:  # flatbuffers, for serialising
    raise ExportError(f"serialising StableHLO needs the export extra (pip install 'tas_jax[export]'): {e}") from None


def _onnx(serve, image: tuple[int, int, int]) -> bytes:
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top  (optional, heavy)
  except ImportError as e:
    raise ExportError(f"ONNX export needs jax2onnx (see the README's Deploying section): {e}") from None
  # Its intermediate representation warns about every shape constant it leaves untyped; the model is sound.
  quiet = logging.getLogger("onnx_ir")
  level = quiet.level
  quiet.setLevel(logging.ERROR)
  try:
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {', '.join(map(str, image))}"), jnp.uint8)
    proto = jax2onnx.to_onnx(serve, inputs=[spec], model_name="tas_jax", input_names=["images"],
                             output_names=["logits"])
  finally:
    quiet.setLevel(level)
  return proto.SerializeToString()


ARTEFACTS = {"stablehlo": "model.jax_export", "onnx": "model.onnx"}
WRITERS = {"stablehlo": _stablehlo, "onnx": _onnx}
FORMATS = tuple(ARTEFACTS)


def model_card(run_dir: str, model_name: str, shape: shapes.Shape, info: dict) -> dict[str, Any]:
  """What the network ``run_dir/model_name`` is and where it came from."""
  result = files.read_json(os.path.join(run_dir, "result.json"))
  counted, full = cost_lib.count(shape), cost_lib.count(shapes.full_shape(shape))
  # The run's final figures describe its final network; its best checkpoint has a figure of its own.
  keys = ("best_test_top1", "best_test_top5", "best_val_top1") if model_name == models.BEST_DIR else ("test_top1", "test_top5", "val_top1")
  measured = {k: result[k] for k in keys if k in result}
  return {
      "formats": {"stablehlo": "jax.export, serialised StableHLO", "onnx": "ONNX (jax2onnx)"},
      "input": {"dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                "shape": ["batch", shape.image_size, shape.image_size, shape.in_channels]},
      "output": {"logits": ["batch", shape.num_classes]},
      "normalisation": {"mean": info["mean"], "std": info["std"], "applied": "inside: (x / 255 - mean) / std"},
      "class_names": info.get("class_names"),
      "shape": shape.to_dict(),
      "macs": counted.macs, "params": counted.params, "flops_ratio": counted.macs / full.macs,
      "accuracy": measured,
      "source": {"run": os.path.abspath(run_dir), "model": model_name, "mode": result.get("mode"), "dataset": info.get("dataset"),
                 "config": files.read_json(os.path.join(run_dir, "config.json"))},
      "versions": {"tas_jax": _version(), "jax": jax.__version__},
  }
