"""Search configurations (METHOD.md §4).

  python -m tas_jax.cli.search --config tas_jax/configs/search.py:resnet56 --workdir runs/search-r56
  python -m tas_jax.cli.search --config tas_jax/configs/search.py:resnet56,paper --workdir runs/r56-paper
  python -m tas_jax.cli.search --config tas_jax/configs/search.py:smoke --workdir /tmp/smoke

The argument is a model preset (resnet20/32/56/110/164, imagenet-resnet18/50) or
``smoke``, optionally followed by variants, e.g. ``resnet56,paper`` or ``resnet56,exact``:
  official (default): the official search exactly: cosine tau 5 -> 0.1, cost band
            [R - 0.05 MAX, R], 600 epochs (CIFARX), the official expected and discrete
            cost formulas, the last epoch's raw argmax is the shape to train (the
            best-in-band genotype is written beside it), validation images drawn with
            replacement, undrawn batch-norm candidates untouched by the optimiser, and
            running variances updated with the unbiased batch variance.
  paper:    linear tau 10 -> 0.1, cost band [(1 - 0.05) R, (1 + 0.05) R] (the paper's text).
  exact:    this project's improvements: expected and discrete costs count what the
            pruned network costs (projection shortcuts, truncated stages), and a final
            argmax outside the band is moved into it (fit_to_band).
Every key can be overridden with --config.KEY=VALUE.
"""

import ml_collections

# FLOP ratios the official scripts and documentation use per model (METHOD.md §3.4).
TARGETS = {"resnet20": 0.5, "resnet32": 0.5, "resnet56": 0.47, "resnet110": 0.57, "resnet164": 0.5,
           "imagenet-resnet18": 0.6, "imagenet-resnet50": 0.55}


def get_config(arg: str = "resnet56") -> ml_collections.ConfigDict:
  parts = (arg or "resnet56").split(",")
  name, variants = parts[0], set(parts[1:]) or {"official"}
  unknown = variants - {"official", "paper", "exact"}
  if unknown:
    raise ValueError(f"unknown variant {sorted(unknown)[0]!r}; use official, paper or exact")
  variant = "paper" if "paper" in variants else "official"
  c = ml_collections.ConfigDict()
  c.model = "resnet20" if name == "smoke" else name
  c.dataset = "synthetic" if name == "smoke" else ("imagenet2012" if name.startswith("imagenet") else "cifar10")
  c.data_dir = ""
  c.download = False
  c.num_train_examples = 0  # 0 = the whole training set
  c.mode = "shape"  # shape | width | depth
  c.target_flops_ratio = TARGETS.get(c.model, 0.5)
  c.epochs = 600
  c.warmup_epochs = 0
  c.batch_size = 256
  c.lr_schedule = "cosine"
  c.lr = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4 if name.startswith("imagenet") else 5e-4
  c.arch_lr = 1e-3
  c.arch_b1 = 0.5
  c.arch_b2 = 0.999
  c.arch_weight_decay = 1e-3
  c.arch_step_updates_bn = True
  c.freeze_undrawn_bn = True  # candidates not drawn keep their BN values and momentum (PyTorch: no gradient)
  c.unbiased_var = True  # running variance from the unbiased batch variance, as PyTorch
  c.valid_sampling = "replacement"  # replacement (official) | shuffle: how validation-half batches are drawn
  c.tau_schedule = "cosine" if variant == "official" else "linear"
  c.tau_max = 5.0 if variant == "official" else 10.0
  c.tau_min = 0.1
  c.cost_band = variant
  c.cost_tolerance = 0.05
  c.cost_weight = 2.0
  c.exact_cost = "exact" in variants  # official: the official E and F formulas
  c.num_sampled = 2
  c.block_relu = True
  c.shortcut_bn = True
  c.width_multiple = 1
  c.bn_groups = 0
  c.scan_blocks = True  # one scanned body for the identical blocks of a stage (compile time flat in depth)
  c.dtype = "float32"
  c.seed = 0
  c.split_seed = 0
  c.eval_examples = 0  # 0 = the whole validation half
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.num_devices = 0  # 0 = every device of every process
  c.stop_after_steps = 0  # > 0: checkpoint and stop after this many steps (to fit a time slot)
  c.cost = "macs"  # macs | latency (measured per-conv latency tables, see tas_jax.latency.table)
  c.latency_batch = 1  # batch size the latency is measured and targeted at
  c.target_latency_ms = 0.0  # > 0: absolute latency target (cost=latency); else target_flops_ratio of the unpruned
  c.targets = ""  # "0.3,0.5,0.7": one vectorised run, one shape per target ratio (shape_<ratio>.json)
  # exact: nudge a final argmax outside the cost band into it (tas_jax.core.derive.fit_to_band); official trains the
  # last epoch's raw argmax.
  c.fit_to_band = "exact" in variants
  if name.startswith("imagenet"):
    c.epochs, c.warmup_epochs = 120, 5
  if name == "smoke":
    c.epochs = 2
    c.batch_size = 32
    c.num_train_examples = 512
    c.eval_examples = 256
    c.log_every_steps = 4
    c.checkpoint_every_steps = 0
  return c
