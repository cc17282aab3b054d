"""The README's Python snippets and commands, run as a user would: from outside the repository."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
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
                    nnx.state(net, nnx.BatchStat),
                    inference={"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 32, "num_classes": 10,
                               "class_names": [str(i) for i in range(10)], "dataset": "synthetic"})
  # ... and its export, which the deployment example loads.
  from tas_jax.programs import export
  export.export_run(str(tmp_path / "runs" / "kd-r20"), str(tmp_path / "exported" / "kd-r20"))
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


# ----------------------------------------------------------------------------- the README's commands


# Commands whose configuration is a config file with --config.KEY=VALUE overrides.
CONFIG_FILE_PROGRAMS = ("tas_jax.cli.search", "tas_jax.cli.train", "tas_jax.cli.study", "tas_jax.cli.pipeline")


def readme_commands() -> list[list[str]]:
  """Every ``tas_jax.cli`` command of the README's bash blocks, as argument lists (placeholders ``...`` left out)."""
  text = open(README).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = re.sub(r"(^|\s)#.*$", "", line).strip()
      if "tas_jax.cli." not in line or "..." in line or line.startswith("gcloud"):
        continue
      words = shlex.split(line)
      commands.append(words[words.index("-m") + 1:])
  return commands


def _override_value(old, text: str):
  """An override's value as ml_collections parses it: by the type of the value it replaces."""
  if isinstance(old, bool):
    assert text in ("True", "False", "true", "false"), text
    return text.lower() == "true"
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    return type(old)(text)
  if isinstance(old, (tuple, list)):
    return tuple(ast.literal_eval(text))
  return text


def config_of(args: list[str]):
  """The ConfigDict a config-file command line names: the (packaged) file, its argument, then the overrides."""
  from tas_jax.cli import common
  spec = next(a.split("=", 1)[1] if "=" in a else args[args.index(a) + 1] for a in args
              if a == "--config" or a.startswith("--config="))
  path, _, arg = common.packaged_config(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location("readme_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for a in args:
    if a.startswith("--config."):
      key, _, value = a[len("--config."):].partition("=")
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      assert leaf in node, f"--config.{key}: the config has no such key"
      node[leaf] = _override_value(node[leaf], value)
  return config


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_is_accepted(args):
  """Catches a README command whose flags, config keys or values the program no longer accepts.

  Config-file programs resolve their whole configuration (every value checked,
  as at the program's door); the others parse their arguments; shape counting,
  which takes no time, runs for real.
  """
  from tas_jax.programs import pipeline, protocol, study
  from tas_jax.runtime import settings
  module = args[0]
  assert module in set(console_scripts().values()), f"{module} is not a console script"
  if module in CONFIG_FILE_PROGRAMS:
    config = config_of(args[1:])
    workdir = args[args.index("--workdir") + 1]
    if module == "tas_jax.cli.search":
      settings.SearchSettings.resolve(config)
    elif module == "tas_jax.cli.train":
      settings.TrainSettings.resolve(config)
    elif module == "tas_jax.cli.study":
      study.StudyConfig.from_mapping(config.to_dict())
    else:
      for stage in ("base", "search", "kd"):
        pipeline.stage_settings(config, workdir, stage)
    return
  cli = importlib.import_module(module)
  argv = protocol.config_flags_to_set(args[1:])
  if module == "tas_jax.cli.flops":
    if any(a.startswith("../shared") and not os.path.exists(os.path.join(ROOT, a)) for a in argv):
      pytest.skip("the shared reference shapes are not here")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
      assert cli.main(argv) == 0
    finally:
      os.chdir(cwd)
    return
  try:
    cli.make_parser().parse_args(argv)
  except SystemExit as e:
    raise AssertionError(f"{' '.join(args)}: refused by its parser (exit {e.code})") from None
