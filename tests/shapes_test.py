import json
import subprocess
import sys

import pytest

from conftest import ROOT
from tas_jax.cli import flops as flops_cli
from tas_jax.cli import import_shapes
from tas_jax.core import cost, shapes
from tas_jax.core import space as space_lib
from tas_jax.core import shape_files

UNPRUNED_MACS = {"resnet20": 40_813_194, "resnet32": 69_124_746, "resnet56": 125_747_850,
                 "resnet110": 253_149_834, "resnet164": 247_646_730, "imagenet-resnet18": 1_814_074_344,
                 "imagenet-resnet34": 3_663_762_408, "imagenet-resnet50": 4_089_185_256}


@pytest.mark.parametrize("name,macs", sorted(UNPRUNED_MACS.items()))
def test_unpruned_macs(name, macs):
  assert cost.count(shape_files.preset(name)).macs == macs


def test_width_choices_match_spec_table():
  assert space_lib.width_choices(16) == (4, 6, 8, 9, 11, 12, 14, 16)
  assert space_lib.width_choices(32) == (9, 12, 16, 19, 22, 25, 28, 32)
  assert space_lib.width_choices(64) == (19, 25, 32, 38, 44, 51, 57, 64)
  assert space_lib.width_choices(128) == (38, 51, 64, 76, 89, 102, 115, 128)
  assert space_lib.width_choices(256) == (76, 102, 128, 153, 179, 204, 230, 256)
  for n in range(1, 300):  # the exact-decimal floor against a rational reference
    ref = sorted({(n * k) // 10 for k in range(3, 11)} - {0})
    assert list(space_lib.width_choices(n)) == ref
  assert all(c % 8 == 0 for c in space_lib.width_choices(64, multiple=8))


def test_depth_choices_match_spec_table():
  dc = lambda d: space_lib.depth_choices("cifar", shapes.cifar_resnet(d).layers)[0]
  assert dc(20) == (1, 2, 3) and dc(32) == (1, 3, 5) and dc(56) == (1, 3, 5, 7, 9)
  assert dc(110) == (1, 3, 5, 7, 9, 11, 13, 15, 17, 18) and dc(164) == dc(110)
  assert space_lib.depth_choices("imagenet", (2, 2, 2, 2)) == ((1, 2),) * 4
  assert space_lib.depth_choices("imagenet", (3, 4, 6, 3)) == ((1, 2, 3), (1, 2, 4), (2, 4, 6), (1, 2, 3))


def test_families():
  assert shapes.cifar_resnet(164).block == "bottleneck" and shapes.cifar_resnet(164).layers == (18, 18, 18)
  assert shapes.cifar_resnet(56).layers == (9, 9, 9) and len(shapes.cifar_resnet(56).widths) == 55
  assert len(shapes.cifar_resnet(164).widths) == 163
  assert shape_files.preset("resnet20", num_classes=100).num_classes == 100
  assert shape_files.preset("imagenet-resnet50").num_classes == 1000


def test_json_roundtrip(tmp_path):
  s = shape_files.preset("tas-c100-resnet56")
  p = tmp_path / "s.json"
  shape_files.save(s, str(p))
  assert shape_files.load(str(p)) == s
  assert json.loads(p.read_text())["format"] == shapes.FORMAT


def test_presets_equal_a_fresh_import(official_shapes_dir, tmp_path):
  import_shapes.main([str(official_shapes_dir), "--out", str(tmp_path)])
  files = sorted(tmp_path.glob("*.json"))
  assert len(files) == 12
  for f in files:
    assert shape_files.load(str(f)) == shape_files.preset(f.stem)


def test_official_configs_import_and_count(official_shapes_dir):
  for f in sorted(official_shapes_dir.glob("*.config")):
    s = shape_files.load_official(str(f))
    d = json.loads(f.read_text())
    assert s.widths == tuple(int(v) for v in d["xchannels"][1][1:])
    c = cost.count(s).macs
    est = float(d["estimated_FLOP"][1]) * 1e6
    if s.arch == "cifar" and s.blocks == s.layers:
      # No truncation: the official estimate is exact up to the classifier bias it leaves out.
      assert c - s.num_classes == pytest.approx(est, rel=1e-4)  # some estimates are rounded
    assert 0.3 < c / cost.count(shapes.full_shape(s)).macs < 0.8


@pytest.mark.parametrize("change,message", [
    (dict(widths=(16,) * 18), "19 widths"),
    (dict(blocks=(3, 4, 3)), "keeps 4 blocks"),
    (dict(blocks=(0, 3, 3)), "keeps 0 blocks"),
    (dict(widths=(17,) + shape_files.preset("resnet20").widths[1:]), "width #0 is 17"),
    (dict(widths=(0,) + shape_files.preset("resnet20").widths[1:]), "width #0 is 0"),
    (dict(arch="mobilenet"), "unknown arch"),
])
def test_inconsistent_shapes_are_rejected(change, message):
  with pytest.raises(shapes.ShapeError, match=message):
    shape_files.preset("resnet20").replace(**change)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "tas_jax.cli.flops", *args], cwd=ROOT, capture_output=True, text=True)


def test_flops_cli_json_and_errors(tmp_path):
  r = _cli("resnet56", "tas-c10-resnet20", "--json")
  assert r.returncode == 0, r.stderr
  recs = [json.loads(l) for l in r.stdout.splitlines()]
  assert recs[0]["macs"] == 125_747_850 and recs[1]["macs"] == cost.count(shape_files.preset("tas-c10-resnet20")).macs
  bad = tmp_path / "bad.json"
  bad.write_text('{"format": "tas_jax.shape/1", "arch": "cifar", "block": "basic", "layers": [3,3,3], '
                 '"widths": [16], "blocks": [3,3,3]}')
  garbage = tmp_path / "garbage.json"
  garbage.write_text("{not json")
  for args, needle in [(("nope",), "unknown preset"), ((str(bad),), "19 widths"),
                       ((str(tmp_path / "missing.json"),), "not found"), ((str(garbage),), "not valid JSON")]:
    r = _cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_flops_table_lists_every_preset(capsys):
  assert flops_cli.main(["--presets"]) == 0
  out = capsys.readouterr().out
  for name in shape_files.preset_names():
    assert name in out
