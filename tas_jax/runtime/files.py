"""The files of a run directory: atomic writes and tolerant reads.

Every result a program writes goes through :func:`write_bytes`: a reader sees
the old file or the new one, never a part.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tas_jax.runtime import metrics as metrics_lib


def write_bytes(path: str, data: bytes) -> None:
  """Replaces ``path`` with ``data`` atomically: a reader sees the old file or the new one, never a part."""
  tmp = f"{path}.tmp{os.getpid()}"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """Replaces ``path`` with ``text`` atomically (UTF-8)."""
  write_bytes(path, text.encode())


def output_problem(path: str) -> str | None:
  """Why ``path`` cannot be written as an output file, or None: checked by command lines before any work starts.

  Missing parent directories are fine (writers create them); a path that is
  a directory, or whose nearest existing parent is a file or not writable, is
  not.
  """
  if "://" in path:
    return None
  if os.path.isdir(path):
    return f"{path} is a directory; name a file"
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"cannot write {path}: {parent} is a file, not a directory"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"cannot write {path}: {parent} is not writable"
  return None


def write_json(path: str, obj) -> None:
  write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=metrics_lib.to_json_value) + "\n")


_EMPTY = object()


def read_json(path: str, default: Any = _EMPTY) -> Any:
  """The JSON object in ``path``; ``default`` (an empty dict unless given) when it is missing, cut short or not an object."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, ValueError):
    obj = None
  if isinstance(obj, dict):
    return obj
  return {} if default is _EMPTY else default
