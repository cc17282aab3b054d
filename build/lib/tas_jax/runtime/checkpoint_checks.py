"""What a checkpoint is checked against before it is trusted: its fingerprint and its layout, and the errors that say what failed."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from tas_jax.runtime.metrics import to_json_value


_MISSING = "<missing>"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message says which and why.

  Attributes:
    directory: the checkpoint directory.
    step: the step concerned, or None.
  """

  def __init__(self, message: str, *, directory: str = "", step: int | None = None):
    super().__init__(message)
    self.directory = directory
    self.step = step


class FingerprintMismatchError(CheckpointError):
  """The checkpoint was written by a run with a different fingerprint.

  Attributes:
    differences: dotted key -> (value in the checkpoint, value of this run);
      ``"<missing>"`` where one side lacks the key.
  """

  def __init__(self, message: str, *, differences: Mapping[str, tuple[Any, Any]], **kwargs: Any):
    super().__init__(message, **kwargs)
    self.differences = dict(differences)


class CorruptCheckpointError(CheckpointError):
  """Files of the step are missing, truncated or unreadable.

  Attributes:
    reason: what failed, in one line.
    previous_step: the newest older step, the candidate to fall back to.
  """

  def __init__(self, message: str, *, reason: str, previous_step: int | None, **kwargs: Any):
    super().__init__(message, **kwargs)
    self.reason = reason
    self.previous_step = previous_step


class IncompatibleCheckpointError(CheckpointError):
  """The requested state's structure or shapes differ from the checkpoint's."""


def _flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dicts as ``{"a.b": value}``, so differences name the inner key."""
  out: dict[str, Any] = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(_flatten_dict(value, name + "."))
    else:
      out[name] = value
  return out


def fingerprint_differences(saved: Mapping[str, Any] | None,
                            current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """Dotted key -> (saved, current) for every key whose values differ."""
  old = _flatten_dict(to_json_value(dict(saved or {})))
  new = _flatten_dict(to_json_value(dict(current)))
  return {k: (old.get(k, _MISSING), new.get(k, _MISSING))
          for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)}


def _key_name(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path: Sequence[Any]) -> str:
  return "/".join(_key_name(k) for k in path) or "<root>"


def abstract_target(tree: Any) -> Any:
  """What Orbax restores into: a ShapeDtypeStruct (with sharding) per device array.

  Concrete JAX arrays contribute their shape, dtype and sharding; numpy
  values are restored as numpy arrays and Python scalars as Python scalars.
  """

  def leaf(path: Sequence[Any], x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
      if x.sharding is None:
        # Without one Orbax would fall back to the sharding at save time,
        # which names devices of the run that wrote it.
        raise ValueError(f"restore target {_path_name(path)}: ShapeDtypeStruct has no sharding; "
                         "give every leaf one, e.g. parallel.replicated(mesh)")
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
      return np.asarray(x)
    if isinstance(x, (bool, int, float, complex)):
      return x
    raise TypeError(f"restore target {_path_name(path)}: unsupported leaf type {type(x).__name__}")

  return jax.tree_util.tree_map_with_path(leaf, tree)


def layout_problems(saved_tree: Any, target: Any, limit: int = 6) -> list[str]:
  """How the target's leaf paths and shapes differ from a checkpoint's metadata."""
  saved = {_path_name(p): tuple(getattr(x, "shape", None) or ())
           for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {_path_name(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  problems = [f"{k}: not in the checkpoint" for k in sorted(set(wanted) - set(saved))]
  problems += [f"{k}: in the checkpoint but not in the requested state"
               for k in sorted(set(saved) - set(wanted))]
  problems += [f"{k}: checkpoint shape {saved[k]}, requested {wanted[k]}"
               for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if len(problems) > limit:
    problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
  return problems


def one_line(error: BaseException, limit: int = 300) -> str:
  """The start of an error message; TensorStore errors run to pages."""
  text = str(error).strip().splitlines()
  first = text[0] if text else ""
  if len(first) > limit:
    first = first[:limit] + "..."
  return f"{type(error).__name__}: {first}"
