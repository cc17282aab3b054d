"""Time the published TAS implementation (PyPI ``xautodl`` 1.0.0, torch) on this machine; print one JSON line.

Runs in the parity environment (``make .venv-parity/.installed``); nothing
here imports tas_jax or jax. For each depth it times, at one batch size on the
CPU with the given number of torch threads:

* ``search_iter_s``: one iteration of the official search loop body
  (``search_train_v2``): the weight step (search forward of a training batch,
  cross-entropy, backward, SGD with Nesterov momentum and weight decay) and
  the architecture step (search forward of a validation batch, the discrete
  cost of the argmax genotype, cross-entropy plus the cost loss, backward,
  Adam), with tau at its cosine value;
* ``train_step_s``: one plain training step of the official unpruned
  ``CifarResNet`` (forward, cross-entropy, backward, SGD).

Each is warmed up, then the median of ``--steps`` timed calls is reported.
tools/official_speed.py calls this and times tas_jax beside it.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from make_fixtures import X, build  # noqa: E402  (the official modules, imported without their data code)

NUM_CLASSES = 10


def _median_time(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def cost_loss(expected, current, need, tolerance):
  """The official cost loss: -log E below the band, log E above the target, nothing inside."""
  expected = torch.mean(expected)
  if current < need - tolerance:
    return -torch.log(expected)
  if current > need:
    return torch.log(expected)
  return None


def search_iteration(depth: int, batch: int, steps: int, warmup: int) -> float:
  net = build(depth)
  net.train()
  # The official optimisers: SGD (lr 0.1, momentum 0.9, Nesterov, wd 5e-4) on the weights, Adam (lr 1e-3,
  # betas (0.5, 0.999), wd 1e-3) on the architecture.
  w_opt = torch.optim.SGD(net.base_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
  a_opt = torch.optim.Adam(net.arch_parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-3)
  net.set_tau(10.0, 0.1, 0.3)
  full = net.get_flop("genotype", None, None)
  need, tolerance, weight = 0.5 * full, 0.05 * full, 2.0
  gen = torch.Generator().manual_seed(0)
  xs = [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(2)]
  ys = [torch.randint(0, NUM_CLASSES, (batch,), generator=gen) for _ in range(2)]

  def step():
    w_opt.zero_grad()
    logits, _ = net(xs[0])
    F.cross_entropy(logits, ys[0]).backward()
    w_opt.step()
    a_opt.zero_grad()
    logits, expected = net(xs[1])
    current = net.get_flop("genotype", None, None)
    loss = F.cross_entropy(logits, ys[1])
    extra = cost_loss(expected, current, need, tolerance)
    if extra is not None:
      loss = loss + weight * extra
    loss.backward()
    a_opt.step()

  return _median_time(step, steps, warmup)


def train_step(depth: int, batch: int, steps: int, warmup: int) -> float:
  from xautodl.models.CifarResNet import CifarResNet  # pylint: disable=g-import-not-at-top
  net = CifarResNet("ResNetBasicblock", depth, NUM_CLASSES, False)
  net.train()
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
  gen = torch.Generator().manual_seed(1)
  x, y = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (batch,), generator=gen)

  def step():
    opt.zero_grad()
    _, logits = net(x)
    F.cross_entropy(logits, y).backward()
    opt.step()

  return _median_time(step, steps, warmup)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--depths", default="20,56")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  rows = []
  for depth in (int(d) for d in args.depths.split(",")):
    rows.append({"model": f"resnet{depth}", "batch_size": args.batch_size, "torch": torch.__version__,
                 "threads": torch.get_num_threads(),
                 "search_iter_s": search_iteration(depth, args.batch_size, args.steps, args.warmup),
                 "train_step_s": train_step(depth, args.batch_size, args.steps, args.warmup)})
  print(json.dumps(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
