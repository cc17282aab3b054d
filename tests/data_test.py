"""Tests of the input pipeline: sources, caching, batching, search split and augmentation."""

from __future__ import annotations

import colorsys
import logging
import os
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tas_jax import data
from tas_jax.data import cache, image_tree, streaming
from data_fixtures import CLASSES, encode, pack_tar, pack_zip, tfds_builders, write_tree

CIFAR_ARCHIVE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  # Nothing a test does may land in the user's real cache.
  path = tmp_path / "cache"
  monkeypatch.setenv(cache.CACHE_ENV, str(path))
  return path


@pytest.fixture
def decode_counter(monkeypatch):
  calls = {"n": 0}
  real = image_tree.decode

  def counting(raw, name):
    calls["n"] += 1
    return real(raw, name)

  monkeypatch.setattr(image_tree, "decode", counting)
  return calls


def _stack(items):
  return np.stack([p for _, p in items])


def _labels(items):
  names = sorted(CLASSES)
  return np.asarray([names.index(c) for c, _ in items])


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic data.


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y):
  means = np.stack([train_x[train_y == c].mean(0) for c in range(10)])
  pred = np.argmin(((test_x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  return float((pred == test_y).mean())


def test_synthetic_is_deterministic_and_well_formed():
  a = data.load("synthetic", seed=3, synthetic_train=200, synthetic_test=50)
  b = data.load("synthetic", seed=3, synthetic_train=200, synthetic_test=50)
  c = data.load("synthetic", seed=4, synthetic_train=200, synthetic_test=50)
  assert "synthetic" in a.name
  assert a.num_classes == 10 and len(a.class_names) == 10 and a.image_size == 32 and not a.streaming
  assert a.train_images.shape == (200, 32, 32, 3) and a.train_images.dtype == np.uint8
  assert a.test_images.shape == (50, 32, 32, 3) and a.test_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(a.train_labels), np.full(10, 20))
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert not np.array_equal(a.train_images, c.train_images)
  mean, std = data.channel_stats(a.train_images)
  np.testing.assert_allclose(a.mean, mean)
  np.testing.assert_allclose(a.mean, a.train_images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)
  np.testing.assert_allclose(a.std, (a.train_images.reshape(-1, 3) / 255).std(0), rtol=1e-6)


def test_synthetic_is_learnable_but_not_by_mean_colour():
  ds = data.load("synthetic", seed=0, synthetic_train=1000, synthetic_test=500)
  x_train = ds.train_images.astype(np.float32) / 255
  x_test = ds.test_images.astype(np.float32) / 255

  def spectrum(x):
    # Translation-invariant features: a stand-in for what a CNN can learn.
    x = x - x.mean(axis=(1, 2), keepdims=True)
    return np.log1p(np.abs(np.fft.fft2(x, axes=(1, 2)))).reshape(len(x), -1)

  colour = _nearest_mean_accuracy(x_train.mean((1, 2)), ds.train_labels, x_test.mean((1, 2)), ds.test_labels)
  pattern = _nearest_mean_accuracy(spectrum(x_train), ds.train_labels, spectrum(x_test), ds.test_labels)
  assert colour < 0.25, colour
  assert 0.6 < pattern < 1.0, pattern


def test_num_train_examples_is_a_balanced_reproducible_subset():
  full = data.load("synthetic", seed=1, synthetic_train=300, synthetic_test=20)
  a = data.load("synthetic", seed=1, synthetic_train=300, synthetic_test=20, num_train_examples=95)
  b = data.load("synthetic", seed=1, synthetic_train=300, synthetic_test=20, num_train_examples=95)
  assert a.train_images.shape[0] == 95
  counts = np.bincount(a.train_labels, minlength=10)
  assert counts.max() - counts.min() <= 1
  np.testing.assert_array_equal(a.train_images, b.train_images)
  # Every kept example is one of the full set's, with its own label.
  keep = data.balanced_subset(full.train_labels, 95, 1)
  np.testing.assert_array_equal(a.train_images, full.train_images[keep])
  np.testing.assert_array_equal(a.train_labels, full.train_labels[keep])
  np.testing.assert_array_equal(a.test_images, full.test_images)


def test_balanced_subset_with_uneven_classes():
  labels = np.asarray([0] * 50 + [1] * 3 + [2] * 20)
  keep = data.balanced_subset(labels, 30, seed=0)
  assert len(np.unique(keep)) == 30 and np.all(np.diff(keep) > 0)
  counts = np.bincount(labels[keep])
  assert counts[1] == 3 and sorted([counts[0], counts[2]]) == [13, 14]
  assert not np.array_equal(keep, data.balanced_subset(labels, 30, seed=1))


# ---------------------------------------------------------------------------------------------------------------------
# Image trees and archives.


def _check_tree(ds, written):
  assert ds.class_names == tuple(sorted(CLASSES)) and ds.num_classes == 3 and not ds.streaming
  for split in ("train", "test"):
    np.testing.assert_array_equal(ds.images(split), _stack(written[split]))
    np.testing.assert_array_equal(ds.labels(split), _labels(written[split]))
    assert ds.labels(split).dtype == np.int32
  mean = _stack(written["train"]).reshape(-1, 3).mean(0) / 255
  np.testing.assert_allclose(ds.mean, mean, rtol=1e-6)


def test_image_tree_directory(tmp_path, cache_dir):
  written = write_tree(tmp_path / "tree")
  ds = data.load(str(tmp_path / "tree"))
  _check_tree(ds, written)
  assert ds.image_size == 8
  assert list(cache_dir.glob("*.npz")), "decoded tree was not cached under $TAS_JAX_CACHE"


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_image_tree_archives(tmp_path, cache_dir, kind):
  written = write_tree(tmp_path / "tree")
  if kind == "zip":
    archive = pack_zip(tmp_path / "tree", tmp_path / "set.zip", prefix="top/")
  else:
    archive = pack_tar(tmp_path / "tree", tmp_path / f"set.{kind}", prefix="top/",
                       mode="w:gz" if kind == "tar.gz" else "w")
  _check_tree(data.load(archive, cache_dir=cache_dir), written)


def test_jpeg_tree_relative_path(tmp_path, cache_dir, monkeypatch):
  write_tree(tmp_path / "tree", fmt="jpg", size=16)
  pack_tar(tmp_path / "tree", tmp_path / "jpegs.tgz")
  monkeypatch.chdir(tmp_path)
  ds = data.load("jpegs.tgz")
  assert ds.train_images.shape == (12, 16, 16, 3) and ds.test_images.shape == (6, 16, 16, 3)
  assert ds.name == "jpegs.tgz"


def test_cache_hit_skips_decoding(tmp_path, cache_dir, decode_counter):
  written = write_tree(tmp_path / "tree")
  archive = pack_tar(tmp_path / "tree", tmp_path / "set.tar.gz")
  first = data.load(archive, cache_dir=cache_dir)
  assert decode_counter["n"] == 18
  (cached,) = cache_dir.glob("*.npz")
  stamp = cached.stat().st_mtime_ns
  second = data.load(archive, cache_dir=cache_dir)
  assert decode_counter["n"] == 18, "second load decoded again"
  assert cached.stat().st_mtime_ns == stamp
  _check_tree(second, written)
  np.testing.assert_array_equal(first.train_images, second.train_images)
  assert not list(cache_dir.glob("*.tmp")), "temporary file left behind"


def test_changed_source_is_decoded_again(tmp_path, cache_dir, decode_counter):
  write_tree(tmp_path / "tree")
  archive = pack_tar(tmp_path / "tree", tmp_path / "set.tar.gz")
  data.load(archive, cache_dir=cache_dir)
  # A new tree with the same name, size or not, and a new mtime.
  written = write_tree(tmp_path / "tree2", seed=9)
  pack_tar(tmp_path / "tree2", archive)
  os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
  _check_tree(data.load(archive, cache_dir=cache_dir), written)
  assert decode_counter["n"] == 36


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_cache_is_rebuilt(tmp_path, cache_dir, decode_counter, damage, caplog):
  written = write_tree(tmp_path / "tree")
  data.load(tmp_path / "tree", cache_dir=cache_dir)
  (cached,) = cache_dir.glob("*.npz")
  raw = cached.read_bytes()
  if damage == "truncate":
    cached.write_bytes(raw[:len(raw) // 2])
  elif damage == "flip":
    # Inside the stored pixels: only the CRC check notices.
    i = raw.index(b"train_images.npy") + 300
    cached.write_bytes(raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:])
  else:
    cached.write_bytes(b"not a zip file at all")
  with caplog.at_level(logging.WARNING):
    ds = data.load(tmp_path / "tree", cache_dir=cache_dir)
  assert decode_counter["n"] == 36
  assert "unreadable cache" in caplog.text
  _check_tree(ds, written)
  assert cache.read(cached, cache.cache_key(cache.source_fingerprint(tmp_path / "tree"))) is not None


def _add_bad_image(root: pathlib.Path) -> pathlib.Path:
  bad = root / "train" / "cat" / "9.jpg"
  bad.write_bytes(encode(np.zeros((8, 8, 3), np.uint8), "jpg")[:40])
  return bad


def test_bad_image_policy_error(tmp_path, cache_dir):
  write_tree(tmp_path / "tree")
  _add_bad_image(tmp_path / "tree")
  with pytest.raises(data.DataError, match=r"train/cat/9\.jpg"):
    data.load(tmp_path / "tree")
  archive = pack_tar(tmp_path / "tree", tmp_path / "set.tar.gz", prefix="top/")
  with pytest.raises(data.DataError, match=r"top/train/cat/9\.jpg"):
    data.load(archive)


def test_bad_image_policy_skip(tmp_path, cache_dir, caplog):
  written = write_tree(tmp_path / "tree")
  _add_bad_image(tmp_path / "tree")
  (tmp_path / "tree" / "test" / "dog" / "7.png").write_bytes(b"\x89PNG garbage")
  with caplog.at_level(logging.WARNING):
    ds = data.load(tmp_path / "tree", on_bad_image="skip")
  assert "skipped 2 unreadable images" in caplog.text
  _check_tree(ds, written)
  # The cached result remembers the skipped files: strict loading still refuses them.
  with pytest.raises(data.DataError, match="unreadable image"):
    data.load(tmp_path / "tree")


def test_missing_and_malformed_trees(tmp_path, cache_dir):
  missing = tmp_path / "nowhere" / "set.tar.gz"
  with pytest.raises(data.DataError, match="does not exist") as e:
    data.load(missing)
  assert str(missing) in str(e.value)

  write_tree(tmp_path / "only_train", counts={"train": 2})
  archive = pack_tar(tmp_path / "only_train", tmp_path / "only_train.tar.gz")
  with pytest.raises(data.DataError, match=r"no test/<class>/<image> images"):
    data.load(archive)

  write_tree(tmp_path / "tree")
  whole = pack_tar(tmp_path / "tree", tmp_path / "whole.tar.gz").read_bytes()
  truncated = tmp_path / "truncated.tar.gz"
  truncated.write_bytes(whole[:len(whole) * 2 // 3])
  with pytest.raises(data.DataError, match="truncated"):
    data.load(truncated)

  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(data.DataError, match="not a"):
    data.load(tmp_path / "notes.txt")
  assert not list(cache_dir.glob("*.npz"))


def test_mixed_image_sizes_need_streaming(tmp_path, cache_dir):
  write_tree(tmp_path / "tree")
  (tmp_path / "tree" / "train" / "ant" / "5.png").write_bytes(encode(np.zeros((9, 9, 3), np.uint8)))
  with pytest.raises(data.DataError, match="streaming=True"):
    data.load(tmp_path / "tree")


# ---------------------------------------------------------------------------------------------------------------------
# TFDS.


def test_tfds_mock_cifar10():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=12):
    ds = data.load("cifar10", num_train_examples=10)
  assert ds.name == "cifar10" and ds.num_classes == 10 and len(ds.class_names) == 10
  assert ds.train_images.shape == (10, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (12, 32, 32, 3) and ds.test_labels.dtype == np.int32
  np.testing.assert_allclose(ds.mean, np.asarray([125.3, 123.0, 113.9]) / 255)
  np.testing.assert_allclose(ds.std, np.asarray([63.0, 62.1, 66.7]) / 255)


def test_tfds_mock_imagenet_streams():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=6):
    ds = data.load("imagenet2012", image_size=16)
    assert ds.streaming and ds.num_classes == 1000 and ds.image_size == 16
    assert ds.mean == data.IMAGENET_MEAN
    images, labels = data.get_batch(ds, "train", np.arange(4), seed=0, step=0)
    evals, _ = data.get_batch(ds, "test", np.arange(4))
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and evals.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(labels, ds.train_labels[:4])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  for builder in tfds_builders():
    builder(data_dir=str(root), file_format="array_record").download_and_prepare()
  return root


def test_tfds_array_record_in_memory(tfds_dir):
  ds = data.load("tas_jax_tiny_fixed", data_dir=tfds_dir)
  assert not ds.streaming and ds.class_names == ("left", "right") and ds.image_size == 8
  assert ds.train_images.shape == (6, 8, 8, 3) and ds.test_images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3])
  np.testing.assert_allclose(ds.mean, ds.train_images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)


def test_tfds_array_record_streaming(tfds_dir):
  ds = data.load("tas_jax_tiny_large", data_dir=tfds_dir, image_size=24, num_train_examples=4)
  assert ds.streaming and ds.image_size == 24 and ds.num_examples("train") == 4
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [2, 2])
  base = ds.train_source.base
  np.testing.assert_array_equal(base.labels, [int(base.records[i]["label"]) for i in range(len(base))])
  images, labels = data.get_batch(ds, "train", np.arange(4), seed=0, step=3)
  evals, test_labels = data.get_batch(ds, "test", np.arange(4))
  assert images.shape == (4, 24, 24, 3) and evals.shape == (4, 24, 24, 3)
  np.testing.assert_array_equal(labels, ds.train_labels)
  np.testing.assert_array_equal(test_labels, ds.test_labels)
  # The centre crop of the shorter side resized to 27 (27x34), from the decoded 70x90 record.
  record = Image.fromarray(np.asarray(ds.test_source.records[1]["image"]))
  ref = record.resize((34, 27), Image.BILINEAR).crop((5, 2, 29, 26))
  np.testing.assert_array_equal(evals[1], np.asarray(ref))


def test_tfds_missing_dataset_message(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load("cifar10", data_dir=tmp_path)
  message = str(e.value)
  assert "\n" not in message
  assert str(tmp_path) in message and "cifar10" in message
  assert "download=True" in message and "not prepared" in message
  assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming (large images).


@pytest.fixture
def large_tree(tmp_path):
  written = write_tree(tmp_path / "large", size=80, counts={"train": 4, "test": 2}, fmt="png")
  return tmp_path / "large", written


def test_streaming_tree_batches(large_tree, cache_dir):
  root, written = large_tree
  ds = data.load(root, image_size=32)
  assert ds.streaming and ds.image_size == 32 and ds.resize_size == 37 and ds.train_images is None
  assert ds.mean == data.IMAGENET_MEAN and ds.class_names == tuple(sorted(CLASSES))
  np.testing.assert_array_equal(ds.train_labels, _labels(written["train"]))
  indices = np.asarray([5, 0, 11, 3])
  a, labels = data.get_batch(ds, "train", indices, seed=1, step=7)
  b, _ = data.get_batch(ds, "train", indices, seed=1, step=7, num_threads=1)
  c, _ = data.get_batch(ds, "train", indices, seed=1, step=8)
  assert a.shape == (4, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(labels, ds.train_labels[indices])
  # Per-process halves give the same examples as the whole batch.
  halves = [data.get_batch(ds, "train", data.process_slice(indices, p, 2), seed=1, step=7)[0] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), a)
  # Evaluation: resize the shorter side to 37, centre crop 32 (these images are square).
  evals, _ = data.get_batch(ds, "test", np.asarray([2]))
  ref = Image.fromarray(written["test"][2][1]).resize((37, 37), Image.BILINEAR).crop((2, 2, 34, 34))
  np.testing.assert_array_equal(evals[0], np.asarray(ref))
  assert not list(cache_dir.glob("*.npz")), "streamed datasets are not cached"


def test_streaming_random_resized_crop_matches_reference(large_tree, cache_dir):
  root, written = large_tree
  ds = data.load(root, image_size=24)
  out, _ = data.get_batch(ds, "train", np.asarray([6]), seed=3, step=2, flip=False)
  rng = np.random.default_rng([3, 2, 6])
  left, top, w, h = streaming.random_resized_crop_box(rng, 80, 80)
  ref = Image.fromarray(written["train"][6][1]).crop((left, top, left + w, top + h)).resize((24, 24), Image.BILINEAR)
  np.testing.assert_array_equal(out[0], np.asarray(ref))


def test_random_resized_crop_box_bounds():
  rng = np.random.default_rng(0)
  for width, height in [(80, 80), (300, 120), (50, 400)]:
    for _ in range(200):
      left, top, w, h = streaming.random_resized_crop_box(rng, width, height)
      assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
      assert w * h >= 0.08 * width * height * 0.9
      assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # An impossible aspect ratio falls back to a clamped centre crop.
  assert streaming.random_resized_crop_box(rng, 100, 10, scale=(1.0, 1.0)) == (43, 0, 13, 10)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_streaming_archives(large_tree, tmp_path, cache_dir, kind):
  root, written = large_tree
  if kind == "zip":
    archive = pack_zip(root, tmp_path / "large.zip", prefix="imgs/")
  else:
    archive = pack_tar(root, tmp_path / "large.tar", prefix="imgs/", mode="w")
  ds = data.load(archive, image_size=32, num_train_examples=6)
  assert ds.streaming and ds.num_examples("train") == 6 and np.bincount(ds.train_labels).tolist() == [2, 2, 2]
  direct = data.load(root, image_size=32, num_train_examples=6)
  for split in ("train", "test"):
    n = ds.num_examples(split)
    a, la = data.get_batch(ds, split, np.arange(n), seed=0, step=1)
    b, lb = data.get_batch(direct, split, np.arange(n), seed=0, step=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)


def test_streaming_compressed_tar_is_refused(large_tree, tmp_path, cache_dir):
  root, _ = large_tree
  archive = pack_tar(root, tmp_path / "large.tar.gz")
  with pytest.raises(data.DataError, match="repack it as .tar or .zip"):
    data.load(archive)


def test_streaming_bad_image(large_tree, cache_dir, caplog):
  root, _ = large_tree
  (root / "train" / "ant" / "0.png").write_bytes(b"broken")
  strict = data.load(root, image_size=16)
  with pytest.raises(data.DataError, match=r"train/ant/0\.png"):
    data.get_batch(strict, "train", np.asarray([0]))
  lenient = data.load(root, image_size=16, on_bad_image="skip")
  with caplog.at_level(logging.WARNING):
    images, labels = data.get_batch(lenient, "train", np.asarray([0, 1]), num_threads=1)
  assert images.shape == (2, 16, 16, 3) and "replaced by the next one" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Search split, batching and prefetching.


def test_search_split_properties():
  labels = np.random.default_rng(0).integers(0, 7, 1001)
  train, valid = data.search_split(labels, seed=111)
  assert np.all(np.diff(train) > 0) and np.all(np.diff(valid) > 0)
  assert np.intersect1d(train, valid).size == 0
  np.testing.assert_array_equal(np.union1d(train, valid), np.arange(1001))
  for c in range(7):
    n = int((labels == c).sum())
    assert (labels[train] == c).sum() == n // 2 and (labels[valid] == c).sum() == n - n // 2
  again = data.search_split(labels, seed=111)
  np.testing.assert_array_equal(train, again[0])
  assert not np.array_equal(train, data.search_split(labels, seed=112)[0])


def test_batches_deterministic_and_cover_each_epoch():
  batches = data.Batches(103, 10, seed=5)
  assert batches.steps_per_epoch == 10
  epoch0 = np.concatenate([batches.indices(s) for s in range(10)])
  assert len(np.unique(epoch0)) == 100 and epoch0.min() >= 0 and epoch0.max() < 103
  np.testing.assert_array_equal(epoch0, np.random.default_rng([5, 0]).permutation(103)[:100])
  epoch1 = np.concatenate([batches.indices(s) for s in range(10, 20)])
  assert not np.array_equal(epoch0, epoch1)
  # A fresh object (a resumed run) gives the same batch for the same step, in any order of asking.
  resumed = data.Batches(103, 10, seed=5)
  for step in (17, 3, 250, 0):
    np.testing.assert_array_equal(resumed.indices(step), batches.indices(step))
  assert not np.array_equal(data.Batches(103, 10, seed=6).indices(0), batches.indices(0))
  ordered = data.Batches(25, 10, seed=0, shuffle=False)
  np.testing.assert_array_equal(ordered.indices(3), np.arange(10, 20))
  with pytest.raises(ValueError):
    data.Batches(5, 10, seed=0)
  with pytest.raises(ValueError):
    batches.indices(-1)


def test_process_slice():
  batch = data.Batches(64, 16, seed=0).indices(3)
  for count in (1, 2, 4, 8):
    parts = [data.process_slice(batch, p, count) for p in range(count)]
    assert all(len(p) == 16 // count for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), batch)
  with pytest.raises(ValueError, match="does not split evenly"):
    data.process_slice(batch, 0, 3)
  with pytest.raises(ValueError):
    data.process_slice(batch, 4, 4)


def test_get_batch_in_memory():
  ds = data.load("synthetic", synthetic_train=50, synthetic_test=10)
  idx = np.asarray([7, 2, 7 + 20])
  images, labels = data.get_batch(ds, "train", idx)
  np.testing.assert_array_equal(images, ds.train_images[idx])
  np.testing.assert_array_equal(labels, ds.train_labels[idx])
  assert labels.dtype == np.int32
  with pytest.raises(ValueError, match="split"):
    data.get_batch(ds, "valid", idx)


def test_prefetcher_order_errors_and_close():
  calls = []

  def fn(step):
    calls.append(threading.current_thread().name)
    return step * 10

  with data.Prefetcher(fn, start_step=5, depth=2) as it:
    assert [next(it) for _ in range(4)] == [50, 60, 70, 80]
    assert it.step == 9
  assert all(name != threading.current_thread().name for name in calls)
  assert list(data.Prefetcher(fn, start_step=0, end_step=3)) == [0, 10, 20]

  def failing(step):
    if step == 2:
      raise RuntimeError("boom at 2")
    return step

  it = data.Prefetcher(failing, start_step=0)
  assert next(it) == 0 and next(it) == 1
  with pytest.raises(RuntimeError, match="boom at 2"):
    next(it)
  it.close()


# ---------------------------------------------------------------------------------------------------------------------
# On-device augmentation.


def _numpy_crop_flip(images, offsets, flips, pad):
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = images.shape[1:3]
  out = np.stack([padded[i, r:r + h, c:c + w] for i, (r, c) in enumerate(offsets)])
  return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def _numpy_normalize(images, mean, std):
  return (images.astype(np.float64) / 255 - np.asarray(mean)) / np.asarray(std)


def test_augment_cifar_matches_numpy_reference():
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  key = jax.random.key(42)
  mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
  out = jax.jit(data.augment_cifar)(key, images, mean, std)
  assert out.shape == (16, 8, 8, 3) and out.dtype == jnp.float32
  offsets, flips = data.crop_flip_params(key, 16)
  offsets, flips = np.asarray(offsets), np.asarray(flips)
  assert offsets.min() >= 0 and offsets.max() <= 8 and flips.dtype == bool
  assert 0 < flips.sum() < 16 and len({tuple(o) for o in offsets}) > 4
  ref = _numpy_normalize(_numpy_crop_flip(images, offsets, flips, 4), mean, std)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # The centred, unflipped crop is the image itself.
  centred = data.apply_crop_flip(jnp.asarray(images), jnp.full((16, 2), 4, jnp.int32), jnp.zeros(16, bool))
  np.testing.assert_array_equal(np.asarray(centred), images)
  # Padding is zero pixels, normalised like any other pixel.
  corner = data.apply_crop_flip(jnp.asarray(images), jnp.zeros((16, 2), jnp.int32), jnp.zeros(16, bool))
  assert np.all(np.asarray(corner)[:, :4, :, :] == 0) and np.all(np.asarray(corner)[:, 4:, 4:] == images[:, :4, :4])


def test_normalize_and_flip_and_normalize():
  images = np.random.default_rng(1).integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  np.testing.assert_allclose(np.asarray(data.normalize(images, mean, std)), _numpy_normalize(images, mean, std),
                             rtol=1e-5, atol=1e-5)
  key = jax.random.key(3)
  flips = np.asarray(data.flip_params(key, 6))
  expected = _numpy_normalize(np.where(flips[:, None, None, None], images[:, :, ::-1], images), mean, std)
  np.testing.assert_allclose(np.asarray(jax.jit(data.flip_and_normalize)(key, images, mean, std)), expected,
                             rtol=1e-5, atol=1e-5)


def test_augmentation_does_not_depend_on_sharding():
  devices = jax.devices()
  if len(devices) < 2:
    pytest.skip("needs several devices")
  images = np.random.default_rng(2).integers(0, 256, (len(devices) * 2, 8, 8, 3), dtype=np.uint8)
  key = jax.random.key(7)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  sharded = jax.device_put(images, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  fn = jax.jit(data.augment_cifar)
  whole = np.asarray(fn(key, images, data.CIFAR10_MEAN, data.CIFAR10_STD))
  split = fn(key, sharded, data.CIFAR10_MEAN, data.CIFAR10_STD)
  assert len(split.sharding.device_set) == len(devices)
  np.testing.assert_array_equal(np.asarray(split), whole)


# ---------------------------------------------------------------------------------------------------------------------
# The real CIFAR-10 archive beside the checkout.


@pytest.mark.slow
def test_real_cifar10_archive(tmp_path):
  if not CIFAR_ARCHIVE.exists():
    pytest.skip("the shared CIFAR-10 archive is not beside this checkout")
  ds = data.load(CIFAR_ARCHIVE, num_train_examples=1000, cache_dir=tmp_path)
  assert ds.num_classes == 10 and ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
  assert ds.train_images.shape == (1000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 100))
  np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
  np.testing.assert_allclose(ds.mean, (0.4913, 0.4821, 0.4465), atol=2e-4)
  np.testing.assert_allclose(ds.train_images.reshape(-1, 3).mean(0) / 255, (0.49, 0.48, 0.45), atol=0.02)


# ---------------------------------------------------------------------------------------------------------------------
# TAS's ImageNet colour augmentation against a NumPy reference of its formulas.

_GREY = np.array([0.299, 0.587, 0.114])
_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def _numpy_hue(img, shift):
  out = np.empty_like(img)
  for idx in np.ndindex(img.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*img[idx])
    out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


def _numpy_jitter_one(img, op, f):
  """One image, one operation, written from torchvision's ColorJitter definitions."""
  if op == 0:
    out = img * f
  elif op == 1:
    out = f * img + (1 - f) * (img @ _GREY).mean()
  elif op == 2:
    out = f * img + (1 - f) * (img @ _GREY)[..., None]
  else:
    return _numpy_hue(img, f)
  return np.clip(out, 0, 1)


def _numpy_imagenet(images, factors, order, alpha, flips, mean, std):
  out = []
  for b, img in enumerate(images.astype(np.float64) / 255):
    for op in order[b]:
      img = _numpy_jitter_one(img, op, factors[b, op])
    img = np.clip(img + _EIGVEC @ (alpha[b] * _EIGVAL), 0, 1)
    out.append(img[:, ::-1] if flips[b] else img)
  return (np.stack(out) - np.asarray(mean)) / np.asarray(std)


def test_color_params_ranges_and_orders():
  """Catches factors drawn outside torchvision's ranges, orders that are not permutations or never vary, and a
  lighting strength other than alphastd 0.1."""
  factors, order, alpha = (np.asarray(a) for a in data.color_params(jax.random.key(0), 4096))
  assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4
  assert factors[:, 3].min() >= -0.2 and factors[:, 3].max() <= 0.2 and abs(factors[:, 3].mean()) < 0.01
  assert (np.sort(order, axis=1) == np.arange(4)).all()
  assert len({tuple(o) for o in order}) == 24  # every one of the 4! orders occurs
  assert np.bincount(order[:, 0], minlength=4).min() > 900  # each op comes first about a quarter of the time
  assert abs(alpha.std() - 0.1) < 0.005 and abs(alpha.mean()) < 0.005


def test_hue_round_trip_and_shift_match_colorsys():
  """Catches a wrong RGB<->HSV conversion (sector table, grey pixels, hue wrap-around) against Python's colorsys."""
  from tas_jax.data import augment
  rng = np.random.default_rng(5)
  x = rng.random((3, 6, 6, 3)).astype(np.float32)
  x[0, 0, 0] = (0.5, 0.5, 0.5)  # grey: no hue
  x[0, 0, 1] = (0.0, 0.0, 0.0)
  np.testing.assert_allclose(np.asarray(augment.hsv_to_rgb(augment.rgb_to_hsv(jnp.asarray(x)))), x, atol=1e-6)
  shifts = np.array([0.2, -0.2, 0.93], np.float32)
  out = np.asarray(jax.jit(augment.adjust_hue)(jnp.asarray(x), jnp.asarray(shifts)))
  ref = np.stack([_numpy_hue(x[b].astype(np.float64), float(shifts[b])) for b in range(3)])
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_augment_imagenet_matches_numpy_reference():
  """Catches a colour operation, its order, the lighting formula (eigvec @ (alpha * eigval) on [0, 1] pixels), the
  clipping, the flip or the normalisation drifting from the NumPy reference written from the formulas."""
  images = np.random.default_rng(3).integers(0, 256, (12, 5, 6, 3), dtype=np.uint8)
  key = jax.random.key(11)
  mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
  out = jax.jit(data.augment_imagenet)(key, images, mean, std)
  assert out.shape == images.shape and out.dtype == jnp.float32
  factors, order, alpha, flips = (np.asarray(a) for a in data.imagenet_params(key, 12)[:4])
  assert 0 < flips.sum() < 12 and len({tuple(o) for o in order}) > 3
  ref = _numpy_imagenet(images, factors.astype(np.float64), order, alpha.astype(np.float64), flips, mean, std)
  np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5)
  # identity factors, zero lighting and no flip leave the image as it was
  ident = data.apply_lighting(data.apply_color_jitter(jnp.asarray(images / 255, jnp.float32),
                                                      jnp.asarray([[1, 1, 1, 0]] * 12, jnp.float32),
                                                      jnp.tile(jnp.arange(4), (12, 1))), jnp.zeros((12, 3)))
  np.testing.assert_allclose(np.asarray(ident), images / 255, atol=2e-6)
