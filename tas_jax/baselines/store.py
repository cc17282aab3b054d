"""Baseline shape files and the pruned weights beside them (``NAME.json`` and ``NAME.model/``)."""

from __future__ import annotations

import json
import os

from flax import nnx

from tas_jax.runtime import files
from tas_jax.runtime import models
from tas_jax.core.shapes import Shape
from tas_jax.baselines.magnitude import Pruned

WEIGHTS_SUFFIX = ".model"


def weights_dir(path: str) -> str:
  """Where :func:`save` puts the weights of the shape file ``path``: ``FILE stem + .model``."""
  return os.path.splitext(path)[0] + WEIGHTS_SUFFIX


def save(shape: Shape, path: str, info: dict | None = None, pruned: Pruned | None = None,
         label: str | None = None) -> str | None:
  """Write ``shape`` to ``path`` (a shape JSON with a ``pruning`` record) and the weights of ``pruned``.

  The record (``info``: method, target, ...) and ``label`` (what produced the
  shape, for tables) are extra keys that :func:`tas_jax.core.shape_files.load` ignores. The weights go to
  :func:`weights_dir`
  as a model directory (``shape.json`` + Orbax ``params/``, plus
  ``kept.json``), which :func:`tas_jax.runtime.models.load_model` reads and a
  ``finetune`` run takes as ``init_from``. Returns that directory or None.
  """
  text = shape.to_json()
  if label:
    text = text[:-2] + f',\n  "label": {json.dumps(label)}\n}}'
  if info:
    text = text[:-2] + f',\n  "pruning": {json.dumps(info, sort_keys=True)}\n}}'
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text + "\n")
  os.replace(tmp, path)
  if pruned is None:
    return None
  out = weights_dir(path)
  models.save_model(out, pruned.shape, nnx.state(pruned.model, nnx.Param), nnx.state(pruned.model, nnx.BatchStat))
  files.write_json(os.path.join(out, "kept.json"), {"kept": [k.tolist() for k in pruned.kept],
                                                     "source": pruned.source, "method": pruned.method})
  return out


def pruning_info(path: str) -> dict:
  """The ``pruning`` record of a shape file written by :func:`save` ({} for any other file)."""
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return {}
  return d.get("pruning") or {} if isinstance(d, dict) else {}
