"""Train a network: the unpruned teacher, a searched shape with or without KD, or a Rethinking baseline.

  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet20 --config.mode=base \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --workdir runs/r20-base
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet20 --config.mode=kd \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --config.shape=tas-c10-resnet20 \\
      --config.teacher=runs/r20-base --workdir runs/r20-kd

Modes, recipes and budgets: see tas_jax/configs/train.py and tas_jax.programs.train.
Writes DIR/result.json (test top-1/top-5 of the final epoch, MACs, params,
epochs, wall time, images/s), DIR/metrics.jsonl, TensorBoard events in DIR/tb,
checkpoints in DIR/checkpoints and the trained network in DIR/model
(tas_jax.runtime.models.load_model reads it). Rerunning the same command resumes. For
several hosts run the same command on every host; see the README.
"""

from tas_jax.cli import common
from tas_jax.programs import train


def main(config, workdir):
  result = train.run(config, workdir, common.distributed(), command=common.command())
  if not result["finished"]:
    print(f"stopped at step {result['step']}; rerun the same command to resume")
    return
  ips = result["train_images_per_s"]
  speed = f"{ips:.0f} img/s" if ips else "n/a img/s"
  print(f"{result['mode']} {result['shape_spec']}: test top-1 {result['test_top1']:.4f} top-5 "
        f"{result['test_top5']:.4f}  MACs {result['macs']:,} ({result['flops_ratio']:.3f})  params "
        f"{result['params']:,}  {result['epochs']} epochs  {result['wall_s']:.0f} s  {speed}  "
        f"model: {workdir}/model")


def run():
  """The console script's entry point."""
  common.launch(main)


if __name__ == "__main__":
  run()
