"""Run TAS's architecture search; rerunning the same command resumes.

  python -m tas_jax.cli.search --config tas_jax/configs/search.py:resnet20 \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --config.target_flops_ratio=0.5 \\
      --config.epochs=2 --config.num_train_examples=4000 --config.batch_size=64 --workdir runs/search

Writes DIR/shape.json (the final argmax shape), DIR/shapes/epoch_NNN.json,
DIR/metrics.jsonl, DIR/arch_probs.jsonl, DIR/result.json, TensorBoard events
in DIR/tb and checkpoints in DIR/checkpoints. For several hosts (GPU nodes, TPU
pods) run the same command on every host; see the README.
"""

from tas_jax.cli import common
from tas_jax.programs import search


def main(config, workdir):
  result = search.run(config, workdir, common.distributed(), command=common.command())
  if not result.get("finished"):
    return
  for r in result.get("targets", []):
    print(f"target {r['target']:g}: {workdir}/{r['shape_file']}  MACs {r['macs']:,}  cost ratio {r['cost_ratio']:.3f} "
          f"({'inside' if r['in_band'] else 'OUTSIDE'} [{r['band_ratio'][0]:.3f}, {r['band_ratio'][1]:.3f}])")
  if "targets" in result:
    print(f"{len(result['targets'])} targets in {result['wall_s']:.0f} s")
    return
  if "measured_latency_ms" in result:
    print(f"latency: predicted {result['predicted_latency_ms']:.3f} ms, measured {result['measured_latency_ms']:.3f} ms "
          f"({100 * result['latency_error']:+.1f}%)")
  print(f"searched shape: {workdir}/shape.json  MACs {result['macs']:,}  ratio {result['cost_ratio']:.3f} "
        f"(target band [{result['band_ratio'][0]:.3f}, {result['band_ratio'][1]:.3f}], "
        f"{'inside' if result['in_band'] else 'OUTSIDE'})  {result['wall_s']:.0f} s")


def run():
  """The console script's entry point."""
  common.launch(main)


if __name__ == "__main__":
  run()
