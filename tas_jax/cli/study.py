"""Does a searched shape beat uniform, random and L1 shapes at the same MACs, trained the same way?

  python -m tas_jax.cli.study --config tas_jax/configs/study.py:cpu \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --workdir runs/study-r20
  python -m tas_jax.cli.study --config tas_jax/configs/study.py:smoke --workdir /tmp/study-smoke

Trains the unpruned teacher (DIR/teacher), runs the TAS searches
(DIR/search/seed<k>), writes every compared shape to DIR/shapes/ (searched,
the paper's, uniform, random draws, L1 of the teacher; all inside one MACs
band, target ± tolerance) and trains each from scratch and with distillation,
N seeds each (DIR/train/<shape>/<variant>/seed<k>). Writes DIR/study.json,
DIR/study.md (table per shape and the significance tests) and DIR/study.png
after every round of seeds. Rerunning the same command skips finished runs
and resumes unfinished ones. Presets and keys: tas_jax/configs/study.py;
the method: tas_jax/study.py. Bad input: one line on stderr, exit 2.

The CPU study of this repository was run as (the persistent compilation
cache lets the second seed of a shape skip most of its compile time):

  JAX_COMPILATION_CACHE_DIR=runs/jax-cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1 \\
  nohup .venv/bin/python -m tas_jax.cli.study --config tas_jax/configs/study.py:cpu \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --workdir runs/study-r20 \\
      > runs/study-r20.log 2>&1 &
"""

from __future__ import annotations

import sys

from tas_jax.cli import common
from tas_jax.programs import study
from tas_jax.report import study as study_report


def main(config, workdir):
  try:
    cfg = study.StudyConfig.from_mapping(config.to_dict())
  except study.StudyError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(common.ERROR)

  def on_round(k, summary):
    print(f"[study] round {k}/{cfg.seeds} done: {workdir}/{study_report.MD_FILE}", flush=True)

  try:
    summary = study.run(cfg, workdir, on_round=on_round)
  except study.StudyError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(common.ERROR)
  print(study_report.markdown(summary), flush=True)


def run():
  """The console script's entry point."""
  common.launch(main)


if __name__ == "__main__":
  run()
