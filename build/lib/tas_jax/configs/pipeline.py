"""Pipeline configurations: base training, search, distillation (and the baselines) in one command.

  python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:demo --workdir runs/demo
  python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:cifar10-resnet56 --workdir runs/c10-r56
  python -m tas_jax.cli.pipeline --config tas_jax/configs/pipeline.py:demo \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --workdir runs/demo-cifar

Presets:
  demo              ResNet-14 on 2,500 examples of the synthetic task: 5 epochs
                    of base training and of distillation, a 10-epoch search
                    (official preset, architecture lr 0.1, cost weight 10); the whole pipeline
                    takes about 8 minutes on two CPU cores, compilation included.
  cifar10-resnet20  the paper's CIFAR-10 ResNet-20 run: official recipes (base and
  cifar10-resnet56  KD: 300 epochs; search: 600 epochs), target FLOPs ratio of the
  cifar100-resnet56 official scripts (0.5 for ResNet-20, 0.47 for ResNet-56).

The stage configurations are nested and built by the stages' own config files,
so every key of theirs can be overridden here:

  config.base    tas_jax/configs/train.py (mode base): the unpruned teacher
  config.search  tas_jax/configs/search.py: the TAS search
  config.kd      tas_jax/configs/train.py (mode kd): the searched shape,
                 distilled from the base run
  config.baselines  with ``config.protocol=True``, the Rethinking baselines
                 around the searched shape (tas_jax.programs.protocol): ``variants``
                 (scratch-e, scratch-b, finetune; kd too for TAS-KD over
                 seeds), ``seeds``, ``recipe`` ("" = the kd stage's recipe and
                 training keys, so that the comparison is like for like),
                 ``overrides`` (KEY=VALUE training keys for every run),
                 ``latency_batch_sizes``, ``latency_runs``

e.g. ``--config.search.epochs=10 --config.kd.kd_alpha=0.5``. The shared keys
below are copied into every stage that has them, replacing the stage's value:
``dataset``, ``data_dir``, ``download``, ``num_train_examples`` (0 = the whole
training set), ``model``, ``seed`` and ``target_flops_ratio`` (and
``on_bad_image`` where the command line adds it). The baselines take the data
keys; their seeds are their own (0 .. seeds-1). The stages' wiring (the KD
student's shape is the search's ``shape.json``, its teacher the base run, the
baselines fine-tune the base run's weights) is filled in by tas_jax.programs.pipeline
and cannot be overridden here.
"""

from __future__ import annotations

import ml_collections

from tas_jax.configs import search as search_configs
from tas_jax.configs import train as train_configs

PRESETS = {
    # name: (model, dataset, training recipe)
    "demo": ("resnet14", "synthetic", "official"),
    "cifar10-resnet20": ("resnet20", "cifar10", "official"),
    "cifar10-resnet56": ("resnet56", "cifar10", "official"),
    "cifar100-resnet56": ("resnet56", "cifar100", "official"),
}


def _baselines_config() -> ml_collections.ConfigDict:
  """The Rethinking baselines (tas_jax.programs.protocol) trained around the searched shape."""
  b = ml_collections.ConfigDict()
  b.variants = ("scratch-e", "scratch-b", "finetune")  # add "kd" for TAS-KD over several seeds
  b.seeds = 3  # seeds 0 .. seeds-1 per variant
  b.recipe = ""  # "" = the kd stage's recipe and training keys; else a recipe of tas_jax/configs/train.py
  b.overrides = ()  # more KEY=VALUE training keys for every baseline run, e.g. ("finetune_epochs=20",)
  b.latency_batch_sizes = (1, 256)  # batch sizes of the latency measurement; () = none
  b.latency_runs = 10
  return b


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  """The pipeline config of a preset (see the module docstring)."""
  name = arg or "demo"
  if name not in PRESETS:
    raise ValueError(f"unknown pipeline preset {name!r}; use one of {', '.join(PRESETS)}")
  model, dataset, recipe = PRESETS[name]
  c = ml_collections.ConfigDict()
  c.preset = name
  c.model = model
  c.dataset = dataset
  c.data_dir = ""
  c.download = False
  c.num_train_examples = 0
  c.seed = 0
  c.target_flops_ratio = search_configs.TARGETS.get(model, 0.5)
  c.protocol = False  # also run the Rethinking baselines into DIR/protocol
  c.report = True  # write DIR/report.md when the stages are done

  c.base = train_configs.get_config(f"{model},{recipe}")
  c.base.mode = "base"
  c.search = search_configs.get_config(model)
  c.kd = train_configs.get_config(f"{model},{recipe}")
  c.kd.mode = "kd"
  c.baselines = _baselines_config()

  if name == "demo":
    _demo(c)
  # The stages run with the shared keys (tas_jax.programs.pipeline applies them); shown here too, for consistency.
  for stage in (c.base, c.search, c.kd):
    for key in ("dataset", "num_train_examples", "model", "seed", "target_flops_ratio"):
      if key in stage:
        stage[key] = c[key]
  return c


def _demo(c: ml_collections.ConfigDict) -> None:
  """Sized so that the three stages finish in a few minutes on two CPU cores, compilation included."""
  c.num_train_examples = 2500
  for stage in (c.base, c.kd):
    stage.epochs = 5
    stage.warmup_epochs = 0
    stage.batch_size = 64
    stage.eval_every_epochs = 1  # test accuracy after every epoch, for the training curves
    stage.log_every_steps = 5
    stage.checkpoint_every_steps = 0
  # 190 search iterations instead of the official ~59,000 (600 epochs of 98): an architecture step 100 times
  # the official 1e-3 lets the width and depth distributions move visibly within them, and a cost weight of
  # 10 (official 2) lets the cost loss outweigh the noisy architecture gradient of a supernet that has
  # hardly trained yet. The official preset otherwise: the last epoch's raw argmax is the shape distilled.
  c.search.epochs = 10
  c.search.arch_lr = 0.1
  c.search.cost_weight = 10.0
  c.search.batch_size = 64
  c.search.eval_examples = 500
  c.search.log_every_steps = 2
  c.search.checkpoint_every_steps = 0
  c.baselines.seeds = 1
  c.baselines.overrides = ("finetune_epochs=2", "finetune_lr=0.01")
  c.baselines.latency_batch_sizes = (1, 64)
