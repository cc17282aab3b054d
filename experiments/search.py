"""Run TAS's architecture search; rerunning the same command resumes.

  python -m experiments.search --config experiments/configs/search.py:resnet20 \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --config.target_flops_ratio=0.5 \\
      --config.epochs=2 --config.num_train_examples=4000 --config.batch_size=64 --workdir runs/search

Writes DIR/shape.json (the final argmax shape), DIR/shapes/epoch_NNN.json,
DIR/metrics.jsonl, DIR/arch_probs.jsonl, DIR/result.json, TensorBoard events
in DIR/tb and checkpoints in DIR/checkpoints. For several hosts (GPU nodes, TPU
pods) run the same command on every host; see the README.
"""

from experiments import common
from tas_jax import search


def main(config, workdir):
  result = search.run(config, workdir, common.distributed())
  print(f"searched shape: {workdir}/shape.json  MACs {result['macs']:,}  ratio {result['flops_ratio']:.3f} "
        f"(target band [{result['band_ratio'][0]:.3f}, {result['band_ratio'][1]:.3f}], "
        f"{'inside' if result['in_band'] else 'OUTSIDE'})  {result['wall_s']:.0f} s")


if __name__ == "__main__":
  common.launch(main)
