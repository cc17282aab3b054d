"""The README's Python snippets and commands, run as a user would: from outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.pop("XLA_FLAGS", None)
  return env


def python_snippets() -> list[str]:
  text = open(README).read()
  return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_library_snippets_run_outside_the_repository(tmp_path):
  """Catches a README example that names a module, function or argument the package no longer has."""
  snippets = python_snippets()
  assert len(snippets) >= 2, "the README's Python examples are gone"
  # The trained run the loading example reads: a small network saved the way a training run saves it.
  from tas_jax.core import shape_files
  from tas_jax.nets import resnet
  from tas_jax.runtime import models
  from flax import nnx
  net = resnet.build(shape_files.preset("resnet8"), seed=0)
  models.save_model(str(tmp_path / "runs" / "kd-r20" / "model"), net.shape, nnx.state(net, nnx.Param),
                    nnx.state(net, nnx.BatchStat))
  for code in snippets:
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if "tas-c10-resnet20" in code:
      assert "Cost(macs=22444482, params=228130)" in out.stdout


def console_scripts() -> dict[str, str]:
  text = open(os.path.join(ROOT, "pyproject.toml")).read()
  section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
  return dict(re.findall(r'^(\S+) = "([\w.]+):\w+"', section, re.M))


@pytest.mark.parametrize("module", sorted(set(console_scripts().values())))
def test_every_command_answers_help(module, tmp_path):
  """Catches a console script whose module is missing or fails on import, and a command without --help."""
  out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "python -m " + module in out.stdout + out.stderr  # the help shows how to run it


def test_readme_names_every_console_script():
  """Catches a command added to the package but not to the README's table (or the reverse)."""
  text = open(README).read()
  table = set(re.findall(r"`(tas-[a-z-]+)`", text))
  assert table == set(console_scripts())
