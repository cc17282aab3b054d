"""Image-folder trees and archives in the ``split/class/image`` layout.

A tree (a directory, or a .tar, .tar.gz, .tgz or .zip archive) holds
``train/<class>/<image>`` and ``test/<class>/<image>`` (``val/`` or
``validation/`` are accepted for the test split); an optional leading folder
inside an archive is ignored. Labels number the train classes sorted by name.

Small images (both sides at most :data:`MAX_IN_MEMORY_SIDE`) are decoded once
into uint8 arrays and cached as ``.npz`` outside the repository (see
:mod:`tas_jax.data.cache`). Archives are read member by member without
extracting anything to disk. Larger images are streamed: the tree is indexed
and each batch decodes only its images (see :mod:`tas_jax.data.streaming`).
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import tarfile
import time
import zipfile
import zlib
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from tas_jax.data import cache, streaming
from tas_jax.data.core import IMAGENET_MEAN, IMAGENET_STD, DataError, Dataset, as_triple, channel_stats

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "validation")}
MAX_IN_MEMORY_SIDE = 64
BAD_IMAGE_POLICIES = ("error", "skip")


class BadImage(Exception):
  """An image file that Pillow cannot decode."""


def is_archive(path: str | os.PathLike) -> bool:
  return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def decode(data: bytes, name: str) -> np.ndarray:
  """``[H, W, 3]`` uint8 pixels of an encoded image; :class:`BadImage` if unreadable."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
    raise BadImage(f"{name}: {type(e).__name__}: {e}") from e


def _image_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from an image header without decoding it, or None if unreadable."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return img.size[1], img.size[0]
  except Exception:  # noqa: BLE001
    return None


def _locate(name: str) -> tuple[str, str] | None:
  """(split, class) of an archive member or relative file path, or None if it is no image of the layout."""
  parts = pathlib.PurePosixPath(name.replace("\\", "/")).parts
  if len(parts) < 3 or any(p.startswith(".") or p == "__MACOSX" for p in parts):
    return None
  if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
    return None
  for split, dirs in SPLIT_DIRS.items():
    if parts[-3] in dirs:
      return split, parts[-2]
  return None


class _Entry:
  """One image of the tree: where it is, and how to read its bytes."""

  __slots__ = ("split", "cls", "name", "read")

  def __init__(self, split: str, cls: str, name: str, read: Callable[[], bytes]):
    self.split, self.cls, self.name, self.read = split, cls, name, read


def _archive_error(path: pathlib.Path, e: BaseException) -> DataError:
  return DataError(f"archive {path} is truncated or corrupt ({type(e).__name__}: {e})")


def _tar_entries(path: pathlib.Path) -> Iterator[_Entry]:
  """Members in archive order, read sequentially ("r|*") so .tar.gz is decompressed once."""
  try:
    with tarfile.open(path, "r|*") as tar:
      for member in tar:
        loc = _locate(member.name) if member.isfile() else None
        if loc is None:
          continue
        f = tar.extractfile(member)
        data = f.read() if f is not None else b""
        if len(data) != member.size:
          raise DataError(f"archive {path} is truncated: {member.name} has {len(data)} of {member.size} bytes")
        yield _Entry(loc[0], loc[1], member.name, lambda data=data: data)
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise _archive_error(path, e) from e


def _zip_entries(path: pathlib.Path) -> Iterator[_Entry]:
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        loc = None if info.is_dir() else _locate(info.filename)
        if loc is None:
          continue
        data = zf.read(info)
        yield _Entry(loc[0], loc[1], info.filename, lambda data=data: data)
  except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
    raise _archive_error(path, e) from e


def _dir_entries(root: pathlib.Path) -> Iterator[_Entry]:
  for split, dirs in SPLIT_DIRS.items():
    split_dir = next((root / d for d in dirs if (root / d).is_dir()), None)
    if split_dir is None:
      continue
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
      for f in sorted(class_dir.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name.lower().endswith(IMAGE_SUFFIXES):
          yield _Entry(split, class_dir.name, str(f.relative_to(root)), lambda f=f: f.read_bytes())


def _entries(path: pathlib.Path) -> Iterator[_Entry]:
  if path.is_dir():
    return _dir_entries(path)
  if path.name.lower().endswith(".zip"):
    return _zip_entries(path)
  return _tar_entries(path)


def _first_image_size(path: pathlib.Path) -> tuple[int, int] | None:
  """Size of the first readable image, peeked without decoding the tree."""
  for entry in _entries(path):
    size = _image_size(entry.read())
    if size is not None:
      return size
  return None


def _check_layout(path: pathlib.Path, seen: dict[str, set[str]]) -> tuple[str, ...]:
  missing = [s for s in ("train", "test") if not seen[s]]
  if missing:
    names = " and ".join(f"{s}/<class>/<image>" for s in missing)
    raise DataError(f"{path} has no {names} images (expected the split/class/image layout with train/ and test/)")
  classes = tuple(sorted(seen["train"]))
  unknown = sorted(seen["test"] - seen["train"])
  if unknown:
    raise DataError(f"{path}: test classes {unknown} have no train images")
  return classes


def _decode_tree(path: pathlib.Path, on_bad_image: str) -> dict[str, np.ndarray]:
  """Decodes every image of the tree into the arrays the cache stores."""
  start = time.perf_counter()
  found: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": []}
  seen: dict[str, set[str]] = {"train": set(), "test": set()}
  skipped: list[str] = []
  shape = None
  for entry in _entries(path):
    seen[entry.split].add(entry.cls)
    try:
      pixels = decode(entry.read(), entry.name)
    except BadImage as e:
      if on_bad_image == "error":
        raise DataError(f"unreadable image {entry.name} in {path} ({e}); "
                        "pass on_bad_image='skip' to leave it out") from e
      skipped.append(entry.name)
      continue
    if shape is None:
      shape = pixels.shape
    elif pixels.shape != shape:
      raise DataError(f"{entry.name} in {path} is {pixels.shape[1]}x{pixels.shape[0]}, other images are "
                      f"{shape[1]}x{shape[0]}: in-memory trees need one image size (pass streaming=True)")
    found[entry.split].append((entry.cls, entry.name, pixels))
  classes = _check_layout(path, seen)
  index = {c: i for i, c in enumerate(classes)}
  arrays = {}
  for split, items in found.items():
    # Archive member order is arbitrary; sorting makes labels and order depend on content only.
    items.sort(key=lambda t: (index[t[0]], t[1]))
    if not items:
      raise DataError(f"{path}: every {split} image is unreadable")
    arrays[f"{split}_images"] = np.stack([t[2] for t in items])
    arrays[f"{split}_labels"] = np.asarray([index[t[0]] for t in items], np.int32)
  mean, std = channel_stats(arrays["train_images"])
  arrays.update(class_names=np.asarray(classes, dtype=str), skipped=np.asarray(skipped, dtype=str),
                mean=np.asarray(mean), std=np.asarray(std))
  log.info("decoded %d+%d images of %s in %.1f s", len(found["train"]), len(found["test"]), path,
           time.perf_counter() - start)
  return arrays


def _report_skipped(path: pathlib.Path, skipped: np.ndarray, on_bad_image: str) -> None:
  if not skipped.size:
    return
  if on_bad_image == "error":
    raise DataError(f"unreadable image {skipped[0]} in {path} ({skipped.size} in all); "
                    "pass on_bad_image='skip' to leave them out")
  log.warning("skipped %d unreadable images of %s (first: %s)", skipped.size, path, skipped[0])


def resolve(spec: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise DataError(f"dataset path {os.fspath(spec)} does not exist (expected a directory or a "
                    f"{'/'.join(ARCHIVE_SUFFIXES)} archive with train/<class>/<image> and test/<class>/<image>)")
  if path.is_file() and not is_archive(path):
    raise DataError(f"{path} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive")
  return path


def load_tree(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, on_bad_image: str = "error",
              streaming: bool | None = None, image_size: int | None = None) -> Dataset:
  """Reads an image tree or archive; see the module docstring.

  Args:
    spec: directory or archive path.
    cache_dir: where decoded in-memory datasets are cached (see :func:`cache.cache_root`).
    on_bad_image: ``"error"`` raises :class:`DataError` naming an unreadable
      image; ``"skip"`` leaves it out and logs how many were skipped.
    streaming: ``None`` streams when the images are larger than 64x64.
    image_size: crop size of a streamed dataset (default 224).
  """
  if on_bad_image not in BAD_IMAGE_POLICIES:
    raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
  path = resolve(spec)
  name = os.fspath(spec)
  key = cache.cache_key(cache.source_fingerprint(path))
  cached_at = cache.cache_path(cache.cache_root(cache_dir), path, key)
  arrays = None if streaming else cache.read(cached_at, key)
  if arrays is None:
    if streaming is None:
      size = _first_image_size(path)
      streaming = size is not None and max(size) > MAX_IN_MEMORY_SIDE
    if streaming:
      return _streaming_tree(path, name, on_bad_image, image_size)
    arrays = _decode_tree(path, on_bad_image)
    if cache.write(cached_at, key, arrays):
      log.info("cached %s as %s", path, cached_at)
  else:
    log.info("read %s from the cache %s", path, cached_at)
  _report_skipped(path, arrays["skipped"], on_bad_image)
  height, width = arrays["train_images"].shape[1:3]
  if height != width:
    raise DataError(f"{path} holds {width}x{height} images: in-memory datasets need square images "
                    "(pass streaming=True to crop them)")
  if image_size is not None and image_size != height:
    raise DataError(f"{path} holds {width}x{height} images; image_size={image_size} applies to streamed datasets only")
  return Dataset(
      name=name,
      num_classes=len(arrays["class_names"]),
      class_names=tuple(str(c) for c in arrays["class_names"]),
      image_size=int(height),
      train_images=arrays["train_images"],
      train_labels=arrays["train_labels"].astype(np.int32),
      test_images=arrays["test_images"],
      test_labels=arrays["test_labels"].astype(np.int32),
      mean=as_triple(arrays["mean"]),
      std=as_triple(arrays["std"]),
  )


def _streaming_tree(path: pathlib.Path, name: str, on_bad_image: str, image_size: int | None) -> Dataset:
  """Indexes the tree (no decoding) and returns a streamed :class:`Dataset`."""
  files: dict[str, list[tuple[str, str, object]]] = {"train": [], "test": []}
  seen: dict[str, set[str]] = {"train": set(), "test": set()}
  if path.is_dir():
    for entry in _dir_entries(path):
      seen[entry.split].add(entry.cls)
      files[entry.split].append((entry.cls, entry.name, entry.name))
    reader: streaming.ByteReader = streaming.DirReader(path)
  elif path.name.lower().endswith(".zip"):
    try:
      with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as e:
      raise _archive_error(path, e) from e
    for info in infos:
      loc = None if info.is_dir() else _locate(info.filename)
      if loc is not None:
        seen[loc[0]].add(loc[1])
        files[loc[0]].append((loc[1], info.filename, info.filename))
    reader = streaming.ZipReader(path)
  elif path.name.lower().endswith(".tar"):
    try:
      with tarfile.open(path, "r:") as tar:
        members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
      raise _archive_error(path, e) from e
    for m in members:
      loc = _locate(m.name) if m.isfile() else None
      if loc is not None:
        seen[loc[0]].add(loc[1])
        files[loc[0]].append((loc[1], m.name, (m.offset_data, m.size)))
    reader = streaming.TarReader(path)
  else:
    raise DataError(f"{path} is a compressed tar of images larger than {MAX_IN_MEMORY_SIDE}x{MAX_IN_MEMORY_SIDE}, "
                    "which cannot be read at random: extract it, or repack it as .tar or .zip")
  classes = _check_layout(path, seen)
  index = {c: i for i, c in enumerate(classes)}
  sources = {}
  for split, items in files.items():
    items.sort(key=lambda t: (index[t[0]], t[1]))
    sources[split] = streaming.FileSource(
        reader, names=[t[1] for t in items], keys=[t[2] for t in items],
        labels=np.asarray([index[t[0]] for t in items], np.int32), on_bad_image=on_bad_image)
  return streaming.streaming_dataset(
      name=name, class_names=classes, train_source=sources["train"], test_source=sources["test"],
      image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
