"""Study configurations: a searched shape against uniform, random and L1 shapes at the same MACs.

  python -m tas_jax.cli.study --config tas_jax/configs/study.py:cpu \\
      --config.dataset=../shared/datasets/cifar10-jpeg.tar.gz --workdir runs/study-r20
  python -m tas_jax.cli.study --config tas_jax/configs/study.py:gpu --workdir runs/study-r20-gpu
  python -m tas_jax.cli.study --config tas_jax/configs/study.py:smoke --workdir /tmp/study-smoke

Presets:
  cpu    ResNet-20 at 0.5 of the MACs on 8,000 CIFAR-10 images: teacher 10
         epochs, one search of 3 epochs (the exact preset, architecture lr
         0.05), then the searched, uniform and one random shape, 2 epochs each,
         2 seeds, scratch and KD (no paper shape, no L1: add them with
         --config.paper_shape=tas-c10-resnet20 --config.l1=True); about 1.5
         hours on two CPU cores. A check of the machinery: 124 steps per shape
         cannot separate the methods; the gpu preset is the study.
  gpu    ResNet-20 at 0.5 on the whole CIFAR-10: teacher 30 epochs, 2 searches
         of 60 epochs, 30 epochs per shape, 2 seeds, 2 random draws.
  smoke  ResNet-8 on 64 synthetic examples, one epoch and one seed everywhere:
         checks the machinery (8 tiny training runs, no latency) in about
         two minutes on two busy cores.

Keys (every one can be set with --config.KEY=VALUE; lists are comma-separated
strings, override lists semicolon-separated ``KEY=VALUE;KEY=VALUE``):
  model, num_classes          the base network (a preset) and its classes
  dataset, data_dir, num_train_examples
                              as for the other programs (0 = all examples)
  target_flops_ratio, tolerance
                              every compared shape lies in target ± tolerance
                              of the unpruned MACs
  recipe, batch_size          training recipe and batch size of the teacher
                              and every shape (tas_jax/configs/train.py)
  teacher_epochs              the unpruned teacher (KD and L1 source)
  search_epochs, search_seeds, search_batch_size, search_preset
                              TAS searches (tas_jax/configs/search.py;
                              preset official, paper or exact)
  paper_shape                 the paper's searched shape, a preset ("" = none)
  random_draws, random_sampler
                              random shapes of the search space
  l1                          include L1 filter pruning of the teacher
  epochs, seeds, variants     per shape: epochs, seeds, and scratch and/or kd
  train_overrides, search_overrides
                              more KEY=VALUE keys of the training and search
                              configs, e.g. "eval_every_epochs=0;lr=0.05"
  latency_batch_sizes, latency_runs
                              measured latency per shape ("" = none)
"""

import ml_collections

PRESETS = ("cpu", "gpu", "smoke")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
  name = arg or "cpu"
  if name not in PRESETS:
    raise ValueError(f"unknown study preset {name!r}; use one of {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.preset = name
  c.model = "resnet20"
  c.num_classes = 10
  c.dataset = "cifar10"
  c.data_dir = ""
  c.num_train_examples = 0
  c.target_flops_ratio = 0.5
  c.tolerance = 0.05
  c.recipe = "official"
  c.batch_size = 128
  c.teacher_epochs = 10
  c.search_epochs = 10
  c.search_seeds = 1
  c.search_batch_size = 64
  c.search_preset = "official"  # official, paper or exact (tas_jax/configs/search.py)
  c.paper_shape = "tas-c10-resnet20"
  c.random_draws = 1
  c.random_sampler = "rejection"
  c.l1 = True
  c.epochs = 10
  c.seeds = 2
  c.variants = "scratch,kd"
  c.train_overrides = ""
  c.search_overrides = ""
  c.latency_batch_sizes = "1,64"
  c.latency_runs = 10
  if name == "cpu":
    # Sized for about 1.5 hours on two CPU cores shared with other work (50-70 training images/s): every
    # shape run also compiles its step and evaluates the 10,000 test images, about a minute each.
    c.num_train_examples = 8000
    c.teacher_epochs = 10
    c.search_epochs = 3
    c.epochs = 2
    # The core question only (searched vs uniform vs random): each extra shape costs ~17 minutes here.
    c.paper_shape = ""
    c.l1 = False
    c.train_overrides = "eval_every_epochs=0;log_every_steps=20;eval_batch_size=500"
    # 186 search iterations instead of the official 58,800: the architecture step is scaled up (the official
    # 1e-3 barely moves the logits in so few steps), and the exact preset moves a final argmax just outside
    # the band into it, so that the searched shape can be compared inside the band.
    c.search_preset = "exact"
    c.search_overrides = "eval_examples=1000;log_every_steps=10;arch_lr=0.05"
  elif name == "gpu":
    c.batch_size = 256
    c.teacher_epochs = 30
    c.search_epochs = 60
    c.search_seeds = 2
    c.search_batch_size = 256
    c.epochs = 30
    c.random_draws = 2
    c.latency_batch_sizes = "1,256"
  elif name == "smoke":
    c.model = "resnet8"
    c.dataset = "synthetic"
    c.num_train_examples = 64
    c.batch_size = 16
    c.teacher_epochs = 1
    c.search_epochs = 1
    c.search_batch_size = 16
    c.paper_shape = ""
    c.epochs = 1
    c.seeds = 1
    c.train_overrides = "eval_batch_size=256;log_every_steps=1"
    c.search_overrides = "eval_examples=32;log_every_steps=1"
    c.latency_batch_sizes = ""  # timing a network compiles it: half a minute per shape on a busy CPU
    c.latency_runs = 2
  return c
