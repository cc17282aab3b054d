"""Exporting a trained network: the artefact works without tas_jax and gives the library's logits."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tas_jax.cli import export as export_cli
from tas_jax.configs import train as train_configs
from tas_jax.core import cost, shape_files
from tas_jax.programs import export, train
from tas_jax.runtime import models, runs
from tas_jax.runtime.settings import TrainSettings

# Runs in a fresh interpreter that must not see tas_jax: the artefact alone has to carry normalisation and weights.
CONSUMER = """
import sys, jax, numpy as np
with open(sys.argv[1], "rb") as f:
  model = jax.export.deserialize(bytearray(f.read()))
images = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(model.call(images)))
np.save(sys.argv[4], np.asarray(model.call(images[:3])))
assert not any(m.startswith("tas_jax") for m in sys.modules), "the consumer imported tas_jax"
"""


def tiny_config():
  c = train_configs.get_config("resnet8,smoke")
  c.mode = "base"
  c.batch_size = 16
  c.eval_batch_size = 200
  c.num_train_examples = 32
  c.epochs = 1
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  assert train.run(tiny_config(), workdir)["finished"]
  return workdir


def reference_logits(run_dir, images):
  """The library's network on the same raw images, normalised here from the formula with the dataset's statistics."""
  dataset = runs.load_data(TrainSettings.resolve(tiny_config()).data)
  mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
  _, model = models.load_model(run_dir)
  return np.asarray(model((images.astype(np.float32) / 255.0 - mean) / std)), dataset


def test_artefact_gives_the_library_logits_in_a_process_without_tas_jax(trained, tmp_path):
  """Catches an artefact that leaves out or misapplies the normalisation (missing /255, mean and std swapped or
  not applied), runs the network in training mode (batch statistics), carries other weights than the run's, or
  fixes the batch size (the consumer calls it with 8 and 3 images)."""
  out = str(tmp_path / "exported")
  card = export.export_run(trained, out)
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  consumer = tmp_path / "consumer.py"
  consumer.write_text(CONSUMER)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, str(consumer), os.path.join(out, export.ARTEFACTS["stablehlo"]),
                         str(tmp_path / "images.npy"), str(tmp_path / "logits.npy"), str(tmp_path / "three.npy")],
                        capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  want, dataset = reference_logits(trained, images)
  got = np.load(tmp_path / "logits.npy")
  assert got.shape == (8, card["output"]["logits"][1])
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.load(tmp_path / "three.npy"), want[:3], atol=1e-4, rtol=0)
  assert np.abs(want).max() > 1e-3  # logits of a network that is not dead, so the comparison means something

  # The card says what the artefact is: the shape, its counted MACs, the data's normalisation and classes,
  # and the accuracy its run measured.
  result = json.load(open(os.path.join(trained, "result.json")))
  shape = shape_files.from_dict(result["shape"])
  assert card["shape"] == result["shape"]
  assert (card["macs"], card["params"]) == (cost.count(shape).macs, cost.count(shape).params)
  np.testing.assert_allclose(card["normalisation"]["mean"], dataset.mean, rtol=1e-6)
  np.testing.assert_allclose(card["normalisation"]["std"], dataset.std, rtol=1e-6)
  assert card["class_names"] == list(dataset.class_names)
  assert card["accuracy"]["test_top1"] == result["test_top1"]
  assert card["input"]["shape"] == ["batch", 32, 32, 3] and card["input"]["dtype"] == "uint8"
  assert json.load(open(os.path.join(out, export.CARD))) == card


def test_export_command_and_its_bad_inputs(trained, tmp_path, capsys):
  """Catches a bad input that ends in a traceback or exit 0 instead of one line naming the problem, and an
  export that writes anything for a run it refuses."""
  out = str(tmp_path / "cli")
  assert export_cli.main([trained, "--out", out]) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith(os.path.join(out, export.ARTEFACTS["stablehlo"])) and "MACs" in line and len(line.splitlines()) == 1

  no_inference = tmp_path / "older"
  shutil.copytree(os.path.join(trained, models.MODEL_DIR), no_inference / models.MODEL_DIR)
  os.remove(no_inference / models.MODEL_DIR / models.INFERENCE_FILE)
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  (unfinished / "result.json").write_text('{"finished": false}')
  a_file = tmp_path / "file"
  a_file.write_text("x")
  cases = {
      "no such run directory": [str(tmp_path / "missing"), "--out", str(tmp_path / "o1")],
      "no trained model": [str(unfinished), "--out", str(tmp_path / "o2")],
      "inference.json": [str(no_inference), "--out", str(tmp_path / "o3")],
      "format 'tflite' is not supported": [trained, "--out", str(tmp_path / "o4"), "--format", "tflite"],
      "--out": [trained, "--out", str(a_file / "sub")],
  }
  for expected, argv in cases.items():
    assert export_cli.main(argv) == 2, expected
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, (expected, err)
  for name in ("o1", "o2", "o3", "o4"):
    assert not os.path.exists(tmp_path / name), name


def test_onnx_without_its_converter_is_one_line(trained, tmp_path, capsys, monkeypatch):
  """Catches a missing optional converter that ends in a traceback, or leaves a half-written export behind."""
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import fails as when it is not installed
  assert export_cli.main([trained, "--out", str(tmp_path / "o"), "--format", "stablehlo,onnx"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "jax2onnx" in err, err
  assert not os.path.exists(tmp_path / "o")


ONNX_CONSUMER = """
import sys, numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1])
images = np.load(sys.argv[2])
np.save(sys.argv[3], session.run(["logits"], {"images": images})[0])
np.save(sys.argv[4], session.run(["logits"], {"images": images[:3]})[0])
assert not any(m.startswith("tas_jax") for m in sys.modules), "the consumer imported tas_jax"
"""


def test_onnx_artefact_gives_the_library_logits_in_onnx_runtime(trained, tmp_path):
  """Catches an ONNX model that drops the normalisation, runs batch statistics, or fixes the batch size; runs
  where the optional converter and ONNX Runtime are installed."""
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  out = str(tmp_path / "exported")
  card = export.export_run(trained, out, "onnx")
  assert card["artefacts"] == {"onnx": "model.onnx"} and not os.path.exists(os.path.join(out, "model.jax_export"))
  images = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  np.save(tmp_path / "images.npy", images)
  consumer = tmp_path / "consumer.py"
  consumer.write_text(ONNX_CONSUMER)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, str(consumer), os.path.join(out, "model.onnx"), str(tmp_path / "images.npy"),
                         str(tmp_path / "logits.npy"), str(tmp_path / "three.npy")],
                        capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  want, _ = reference_logits(trained, images)
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.load(tmp_path / "three.npy"), want[:3], atol=1e-4, rtol=0)
