"""A decode-once cache of in-memory datasets as ``.npz`` files outside the repository.

The key covers the source's resolved path and its size and modification time
(for a directory, those of every file under it), so an edited or replaced source
is decoded again. Files are written to a temporary name and renamed into place,
so a crash leaves either the old cache or none; a cache that does not read back
completely (truncated, bad CRC, wrong key) is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_ENV = "TAS_JAX_CACHE"
# Bump when the stored layout or the decoding changes, so old files are not reused.
CACHE_FORMAT = "tas_jax.data.cache/1"
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names", "skipped", "mean", "std")


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The cache directory: ``cache_dir``, else ``$TAS_JAX_CACHE``, else ``~/.cache/tas_jax``."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir).expanduser()
  env = os.environ.get(CACHE_ENV)
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "tas_jax"


def source_fingerprint(path: pathlib.Path) -> dict[str, Any]:
  """What identifies the content of a file or directory tree without reading it."""
  path = path.resolve()
  if path.is_dir():
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        st = os.stat(full)
        digest.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        count += 1
    return {"path": str(path), "kind": "dir", "files": count, "listing": digest.hexdigest()}
  st = path.stat()
  return {"path": str(path), "kind": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_key(fingerprint: dict[str, Any]) -> str:
  blob = json.dumps({"format": CACHE_FORMAT, **fingerprint}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(root: pathlib.Path, source: pathlib.Path, key: str) -> pathlib.Path:
  stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)[:80]
  return root / f"{stem}-{key[:20]}.npz"


def read(path: pathlib.Path, key: str) -> dict[str, np.ndarray] | None:
  """The arrays stored at ``path``, or ``None`` if missing, stale or damaged."""
  if not path.exists():
    return None
  try:
    with np.load(path, allow_pickle=False) as npz:
      # Reading every member in full makes zipfile verify each CRC.
      out = {name: npz[name] for name in _ARRAYS}
      stored_key = str(npz["key"])
    _check(out)
    if stored_key != key:
      raise ValueError("key mismatch")
  except Exception as e:  # noqa: BLE001 - any damage means "rebuild"
    log.warning("ignoring unreadable cache %s (%s: %s); decoding the source again", path, type(e).__name__, e)
    return None
  return out


def _check(arrays: dict[str, np.ndarray]) -> None:
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"bad {split} images {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"{split}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(arrays["class_names"])):
      raise ValueError(f"{split} labels out of range")


def write(path: pathlib.Path, key: str, arrays: dict[str, np.ndarray]) -> bool:
  """Atomically stores ``arrays`` at ``path``; returns False (and logs) if it cannot."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  except OSError as e:
    log.warning("cannot write the dataset cache in %s (%s); continuing without it", path.parent, e)
    return False
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, key=np.asarray(key), **arrays)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file private; the cache holds nothing secret.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException as e:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    if isinstance(e, OSError):
      log.warning("cannot write the dataset cache %s (%s); continuing without it", path, e)
      return False
    raise
  return True
