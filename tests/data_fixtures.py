"""Tiny image trees and archives written with Pillow, for the input-pipeline tests."""

from __future__ import annotations

import io
import pathlib
import tarfile
import zipfile

import numpy as np
from PIL import Image

CLASSES = ("dog", "ant", "cat")  # deliberately unsorted: labels must follow sorted names


def random_image(rng: np.random.Generator, size: int) -> np.ndarray:
  return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "png") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
  return buf.getvalue()


def write_tree(root: pathlib.Path, *, counts: dict[str, int] | None = None, classes: tuple[str, ...] = CLASSES,
               size: int = 8, fmt: str = "png", seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
  """Writes ``root/<split>/<class>/<i>.<fmt>``; returns per split the (class, pixels) in loader order.

  The loader orders examples by sorted class name, then file name, which for
  fewer than ten files per class is the numeric order.
  """
  counts = counts or {"train": 4, "test": 2}
  rng = np.random.default_rng(seed)
  written: dict[str, list[tuple[str, np.ndarray]]] = {}
  for split, n in counts.items():
    items = []
    for cls in classes:
      folder = root / split / cls
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        pixels = random_image(rng, size)
        (folder / f"{i}.{fmt}").write_bytes(encode(pixels, fmt))
        items.append((cls, pixels))
    written[split] = sorted(items, key=lambda t: sorted(classes).index(t[0]))
  return written


def pack_tar(src: pathlib.Path, dest: pathlib.Path, prefix: str = "", mode: str = "w:gz") -> pathlib.Path:
  with tarfile.open(dest, mode) as tar:
    for path in sorted(src.rglob("*"), reverse=True):  # reversed member order must not matter
      tar.add(path, arcname=prefix + str(path.relative_to(src)), recursive=False)
  return dest


def pack_zip(src: pathlib.Path, dest: pathlib.Path, prefix: str = "") -> pathlib.Path:
  with zipfile.ZipFile(dest, "w") as zf:
    for path in sorted(src.rglob("*")):
      if path.is_file():
        zf.write(path, prefix + str(path.relative_to(src)))
  return dest


def tfds_builders():
  """Two tiny TFDS builders (fixed 8x8 and variable-size 70x90 images), for real ArrayRecord reads.

  Defined on first use so importing this module does not import TFDS.
  """
  global _BUILDERS
  if _BUILDERS is None:
    import tensorflow_datasets as tfds

    class _Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
      VERSION = tfds.core.Version("1.0.0")
      SHAPE: tuple = (8, 8, 3)
      COUNTS = {"train": 6, "test": 4}

      def _info(self):
        shape = self.SHAPE if self.SHAPE[0] <= 64 else (None, None, 3)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=shape, encoding_format="png"),
            "label": tfds.features.ClassLabel(names=["left", "right"])}))

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self.COUNTS}

      def _generate_examples(self, split):
        # Paths of existing PNGs pass through without TensorFlow encoding them.
        rng = np.random.default_rng(len(split))
        folder = pathlib.Path(self.data_dir).parent / f"src-{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(self.COUNTS[split]):
          path = folder / f"{i}.png"
          Image.fromarray(rng.integers(0, 256, self.SHAPE, dtype=np.uint8)).save(path)
          yield i, {"image": str(path), "label": i % 2}

    class TasJaxTinyFixed(_Tiny):
      SHAPE = (8, 8, 3)

    class TasJaxTinyLarge(_Tiny):
      SHAPE = (70, 90, 3)

    _BUILDERS = (TasJaxTinyFixed, TasJaxTinyLarge)
  return _BUILDERS


_BUILDERS = None
