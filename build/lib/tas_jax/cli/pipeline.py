"""TAS from end to end: train the unpruned network, search, distil the searched shape, report.

  python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:demo --workdir runs/demo
  python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:cifar10-resnet56 \\
      --config.protocol=True --workdir runs/c10-r56
  python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:demo --workdir runs/demo --report_only

Stages (each its own run directory under --workdir): base/ (the unpruned
network), search/ (TAS's search; search/shape.json is the searched shape),
kd/ (that shape trained from scratch with knowledge distillation from base/)
and, with --config.protocol=True, protocol/ (the Rethinking baselines). A
finished stage is not run again; rerunning the same command resumes an
interrupted one from its checkpoint. At the end DIR/report.md is written with
its figures in DIR/figures (``python -m tas_jax.cli.report DIR`` rewrites it).
Presets and keys: see tas_jax/configs/pipeline.py.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags

from tas_jax.cli import common

_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "only (re)write DIR/report.md from the stages' outputs")

# The entry point and config file of each stage, for the commands that rerun one stage by itself.
_STAGE_SCRIPTS = {"base": ("tas_jax.cli.train", "tas_jax/configs/train.py"),
                  "search": ("tas_jax.cli.search", "tas_jax/configs/search.py"),
                  "kd": ("tas_jax.cli.train", "tas_jax/configs/train.py")}


def _config_arg(stage: str, c) -> str:
  """The PRESET[,VARIANT] argument of the stage's config file that its defaults come from."""
  if stage == "search":
    return f"{c.model},{c.get('cost_band', 'official')}"
  recipe = c.get("recipe")
  return f"{c.model},{recipe}" if recipe else c.model


def _defaults(stage: str, arg: str):
  if stage == "search":
    from tas_jax.configs import search as configs  # pylint: disable=g-import-not-at-top
  else:
    from tas_jax.configs import train as configs  # pylint: disable=g-import-not-at-top
  return configs.get_config(arg)


def _flag_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return shlex.quote(str(tuple(value)))
  return shlex.quote(str(value))


def _protocol_command(c, workdir: str) -> str:
  parts = ["python -m tas_jax.cli.protocol", f"--shape {shlex.quote(c.shape)}", f"--teacher {shlex.quote(c.teacher)}",
           f"--seeds {c.seeds}", f"--recipe {shlex.quote(c.recipe)}"]
  if c.inherit:
    parts.append(f"--inherit {shlex.quote(c.inherit)}")
  parts.append(f"--variants {','.join(c.variants)}")
  parts += [f"--set {shlex.quote(o)}" for o in c.overrides]
  parts += [f"--latency_batch_sizes={','.join(str(b) for b in c.latency_batch_sizes)}",
            f"--latency_runs {c.latency_runs}", f"--label {c.label}", f"--workdir {shlex.quote(workdir)}"]
  return " ".join(parts)


def stage_command(stage: str, c, workdir: str) -> str:
  """A command line that runs ``stage`` with configuration ``c`` by itself, as the pipeline does."""
  if stage == "protocol":
    return _protocol_command(c, workdir)
  module, config_file = _STAGE_SCRIPTS[stage]
  arg = _config_arg(stage, c)
  try:
    defaults = _defaults(stage, arg).to_dict()
  except (ImportError, ValueError):
    defaults = {}
  overrides = [f"--config.{k}={_flag_value(v)}" for k, v in sorted(c.to_dict().items())
               if k in defaults and defaults[k] != v and not isinstance(v, dict)]
  return " ".join([f"python -m {module}", f"--config {config_file}:{arg}", *overrides,
                   f"--workdir {shlex.quote(workdir)}"])


def main(config, workdir):
  from tas_jax.runtime import runs as runs  # pylint: disable=g-import-not-at-top
  from tas_jax.programs import pipeline
  from tas_jax.runtime import stages as pipeline_dir
  from tas_jax import report
  if _REPORT_ONLY.value:
    if not os.path.isdir(workdir):
      raise runs.RunError(f"{workdir} is not a pipeline directory (run the pipeline first)")
    print(f"report: {report.write_report(workdir)}")
    return
  command = "python -m tas_jax.cli.pipeline " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  stage_commands = {s: stage_command(s, pipeline.stage_config(config, workdir, s), pipeline_dir.stage_dir(workdir, s))
                    for s in pipeline_dir.enabled_stages(config)}

  def on_stage(stage, status):
    print(f"[pipeline] {stage}: {status} ({pipeline_dir.stage_dir(workdir, stage)})", flush=True)

  out = pipeline.run(config, workdir, common.distributed(), command=command, stage_commands=stage_commands,
                     on_stage=on_stage)
  if not out["finished"]:
    print("[pipeline] stopped early; rerun the same command to go on")
    return
  for stage, result in out["results"].items():
    if stage in ("base", "kd"):
      print(f"[pipeline] {stage}: test top-1 {result['test_top1']:.4f}  MACs {result['macs']:,}  "
            f"params {result['params']:,}")
    elif stage == "search":
      print(f"[pipeline] search: MACs {result['macs']:,} (ratio {result['flops_ratio']:.3f}, "
            f"{'inside' if result['in_band'] else 'outside'} the target band)")
    elif stage == "protocol":
      for name, v in result.get("variants", {}).items():
        if v.get("n"):
          print(f"[pipeline] protocol {name}: test top-1 {v['test_top1_mean']:.4f} ± {v['test_top1_std']:.4f} "
                f"over {v['n']} seed(s)")
  if out["report"]:
    print(f"report: {out['report']}")
    print(f"tensorboard: tensorboard --logdir {workdir}")


def run():
  """The console script's entry point."""
  common.launch(main)


if __name__ == "__main__":
  run()
