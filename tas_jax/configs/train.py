"""Training configurations: the TAS teacher and student (METHOD.md §6) and the Rethinking baselines.

  # step 1: the unpruned teacher
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet56 --config.mode=base \\
      --workdir runs/r56-base
  # step 3: the searched shape distilled from it (TAS's KDT), and without KD (NMT)
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet56 --config.mode=kd \\
      --config.shape=runs/search-r56/shape.json --config.teacher=runs/r56-base --workdir runs/r56-kd
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet56 --config.mode=scratch \\
      --config.shape=runs/search-r56/shape.json --workdir runs/r56-scratch
  # Rethinking: Scratch-E, Scratch-B (FLOP-matched epochs) and fine-tuning inherited weights
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet56,rethinking --config.mode=scratch \\
      --config.shape=tas-c10-resnet56 --config.budget=flops --workdir runs/r56-scratch-b
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:resnet56,rethinking --config.mode=finetune \\
      --config.shape=tas-c10-resnet56 --config.init_from=runs/r56-base --workdir runs/r56-finetune
  # a quick check on synthetic data
  python -m tas_jax.cli.train --config tas_jax/configs/train.py:smoke --config.mode=base --workdir /tmp/smoke

The argument is PRESET[,RECIPE]. PRESET is a model preset (resnet20/32/56/110/164,
imagenet-resnet18/50, or any resnetN), the unpruned network of ``base`` mode and
the family of the shapes trained in the other modes; ``smoke`` alone means
``resnet20,smoke``. RECIPE is one of:

  official   (default for CIFAR presets) TAS's CIFAR-E300-W5-L1-COS (METHOD.md §6.3):
             SGD Nesterov, lr 0.1, momentum 0.9, weight decay 5e-4, batch 256,
             5 linear warmup epochs then cosine to 0, 300 epochs in all. The
             cosine anneals every step; the official code changes the lr once
             per epoch and runs 5 more epochs at lr 0 after the cosine (a
             quirk): ``--config.lr_per_epoch=True --config.official_tail=True``
             reproduces both.
  rethinking Rethinking's CIFAR protocol (METHOD.md §7.2): SGD momentum
             0.9 without Nesterov, lr 0.1, weight decay 1e-4, batch 64, 160
             epochs, lr x0.1 at epochs 80 and 120; fine-tuning 40 epochs at a
             constant lr of 0.001; Scratch-B uncapped (``scratch_b_rule``
             ``cifar``). Asked for an imagenet-* preset it gives
             rethinking-imagenet, never the CIFAR schedule.
  rethinking-imagenet
             Rethinking's ImageNet protocol (imagenet-* presets only): SGD
             momentum 0.9 without Nesterov, lr 0.1, weight decay 1e-4, batch
             256, 90 epochs, lr x0.1 at epochs 30 and 60; fine-tuning 20 epochs
             at a constant lr of 0.001; random resized crop and flip only
             (``color_augment="off"``), as its scripts; Scratch-B by
             ``scratch_b_rule="imagenet"``: ratio = MACs(unpruned) / MACs(pruned),
             180 epochs with the lr x0.1 every 60 when ratio >= 2, else
             int(90 * ratio) epochs with the lr x0.1 every epochs // 3.
  imagenet   (default for imagenet-* presets) the ImageNet-E120-Cos configs:
             SGD Nesterov, lr 0.1, weight decay 1e-4, batch 256, 5 warmup
             epochs, cosine, 120 epochs; ``--config.label_smoothing=0.1``
             gives the "Smooth" variant. Streamed (ImageNet) datasets get
             TAS's colour jitter and PCA lighting (``color_augment="auto"``,
             see tas_jax.data.augment).
  smoke      tiny and fast: synthetic data, 2 epochs of 512 examples.

Short runs shrink the warmup to min(warmup_epochs, epochs // 10) epochs (see
tas_jax.programs.train). Every key can be overridden with --config.KEY=VALUE.
"""

import ml_collections

RECIPES = ("official", "rethinking", "rethinking-imagenet", "imagenet", "smoke")
MODES = ("base", "scratch", "kd", "finetune")


def _recipe(name: str, asked: str | None) -> str:
  """The recipe of preset ``name``: Rethinking's protocols differ between CIFAR and ImageNet, so follow the family."""
  imagenet = name.startswith("imagenet")
  if asked is None:
    return "smoke" if name == "smoke" else "imagenet" if imagenet else "official"
  if asked not in RECIPES:
    raise ValueError(f"unknown recipe {asked!r}; use one of {', '.join(RECIPES)}")
  if asked == "rethinking" and imagenet:
    return "rethinking-imagenet"
  if asked == "rethinking-imagenet" and not imagenet:
    raise ValueError(f"recipe rethinking-imagenet is for imagenet-* presets; {name} takes rethinking")
  return asked


def get_config(arg: str = "resnet56") -> ml_collections.ConfigDict:
  parts = (arg or "resnet56").split(",")
  name = parts[0]
  imagenet = name.startswith("imagenet")
  recipe = _recipe(name, parts[1] if len(parts) > 1 else None)
  c = ml_collections.ConfigDict()
  c.recipe = recipe
  c.mode = "base"  # base | scratch | kd | finetune
  c.model = "resnet20" if name == "smoke" else name
  c.shape = ""  # preset, shape JSON or official .config; the trained shape of scratch, kd and finetune
  c.teacher = ""  # kd: a finished base run directory
  c.init_from = ""  # finetune: a finished training run or search run directory
  c.budget = "epochs"  # scratch and kd: epochs (Scratch-E) | flops (Scratch-B: epochs x MACs ratio)
  c.scratch_b_rule = "cifar"  # budget flops: cifar (uncapped) | imagenet (at most 2x, lr steps at thirds)
  c.kd_alpha = 0.9
  c.kd_temperature = 4.0
  c.dataset = "synthetic" if recipe == "smoke" else ("imagenet2012" if imagenet else "cifar10")
  c.data_dir = ""
  c.download = False
  c.num_train_examples = 0  # 0 = the whole training set
  c.data_seed = 0  # seed of the num_train_examples subset
  c.val_examples = 0  # > 0: hold out this many training examples as a validation split
  c.epochs = 300
  c.warmup_epochs = 5
  c.official_tail = False  # True: warmup_epochs more epochs at lr 0 after the cosine, as the official code
  c.lr_per_epoch = False  # True: the official per-epoch cosine staircase; False: anneal every step
  c.batch_size = 256
  c.eval_batch_size = 0  # 0 = batch_size
  c.lr = 0.1
  c.lr_schedule = "cosine"  # cosine | multistep | constant
  c.milestones = ()
  c.gamma = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.label_smoothing = 0.0
  c.color_augment = "auto"  # auto (on for streamed, ImageNet, datasets) | on | off: colour jitter + PCA lighting
  c.finetune_epochs = 40
  c.finetune_lr = 0.001
  c.finetune_lr_schedule = "constant"
  c.finetune_milestones = ()
  c.dtype = "float32"  # float32 | bfloat16 (bfloat16 compute, float32 parameters)
  c.seed = 0
  c.eval_every_epochs = 10  # test accuracy for monitoring every N epochs (0 = at the end only)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.num_devices = 0  # 0 = every device of every process
  c.stop_after_steps = 0  # > 0: checkpoint and stop after this many steps (to fit a time slot)
  c.allow_foreign_teacher = False  # True: accept a teacher or init_from run whose data differs from this run's
  c.reevaluate = False  # True on a finished run: evaluate its final state again into reevaluation.json
  if recipe == "rethinking":
    c.epochs, c.warmup_epochs, c.batch_size = 160, 0, 64
    c.lr_schedule, c.milestones = "multistep", (80, 120)
    c.nesterov, c.weight_decay = False, 1e-4
  elif recipe == "rethinking-imagenet":
    c.epochs, c.warmup_epochs, c.weight_decay = 90, 0, 1e-4
    c.lr_schedule, c.milestones = "multistep", (30, 60)
    c.nesterov, c.scratch_b_rule, c.color_augment = False, "imagenet", "off"
    c.finetune_epochs = 20
    c.eval_every_epochs = 5
  elif recipe == "imagenet":
    c.epochs, c.weight_decay = 120, 1e-4
    c.eval_every_epochs = 5
  elif recipe == "smoke":
    c.epochs, c.warmup_epochs, c.batch_size = 2, 0, 32
    c.num_train_examples = 512
    c.eval_every_epochs = 0
    c.log_every_steps = 4
    c.checkpoint_every_steps = 0
    c.finetune_epochs = 1
  return c
