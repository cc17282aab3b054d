"""Reference numbers from the published TAS implementation (PyPI ``xautodl`` 1.0.0) for tests/parity_test.py.

Run through ``make parity-fixtures``, which builds a separate virtual
environment with torch and xautodl: the project itself never depends on torch,
and nothing here imports tas_jax or jax. Only numbers leave this script; the
tests compare tas_jax's official mode against them.

What is written to ``--out`` (all .npz, a few MB in all):

* ``resnet20.npz``, ``resnet56.npz``: the official search network
  (``SearchShapeCifarResNet``) with random weights, batch-norm statistics and
  N(0, 1) architecture logits; one forced sample (Gumbel noise and drawn
  indices fixed by this script, since the official sampler draws from torch's
  global generator and a multinomial on top); for 4 random images, the
  eval-mode logits (running statistics), then the train-mode logits, loss,
  updated running statistics and the gradients of the loss with respect to
  the width and depth logits.
* ``costs.npz``: expected cost E, discrete cost F and argmax genotype
  (xchannels, xblocks) for several random logits of ResNet-20, -56 and -164.
* ``kd.npz``: the distillation loss (alpha 0.9, T 4) and its gradient.
* ``schedules.npz``: the cosine Gumbel temperature and the cosine learning
  rate with warmup, as the official code computes them.

Weights and input statistics are rounded to float16 before anything runs, so
they are stored in half precision without changing a single computed number.
"""

import argparse
import contextlib
import os
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F

SEED = 0
BATCH = 4
NUM_CLASSES = 10
TAU = 2.0  # soft enough that both drawn widths carry weight
COST_SETTINGS = 4  # random logit settings per network for E and F


def import_xautodl():
  """The xautodl modules the numbers come from.

  Shim: ``xautodl/procedures/__init__.py`` imports the dataset and benchmark
  code, which needs torchvision and Pillow; the learning-rate scheduler and the
  distillation loss need neither. An empty package object stands in for it so
  that only ``optimizers`` and ``simple_KD_main`` are loaded.
  """
  import xautodl
  if "xautodl.procedures" not in sys.modules:
    pkg = types.ModuleType("xautodl.procedures")
    pkg.__path__ = [os.path.join(os.path.dirname(xautodl.__file__), "procedures")]
    sys.modules["xautodl.procedures"] = pkg
  from xautodl.models import SharedUtils
  from xautodl.models.shape_searchs import SearchCifarResNet
  from xautodl.procedures import optimizers, simple_KD_main
  return types.SimpleNamespace(search=SearchCifarResNet, shared=SharedUtils, optimizers=optimizers,
                               kd=simple_KD_main)


X = import_xautodl()


def build(depth: int):
  """The official search network of a CIFAR ResNet, its conv geometry recorded by a basic-mode forward.

  The official driver measures the network once in basic mode before the
  search; the costs read the resolutions that forward records. It runs in eval
  mode so that no batch-norm statistic moves.
  """
  block = "ResNetBottleneck" if depth == 164 else "ResNetBasicblock"
  net = X.search.SearchShapeCifarResNet(block, depth, NUM_CLASSES)
  net.eval()
  with torch.no_grad():
    net(torch.zeros(1, 3, 32, 32))
  net.apply(X.shared.change_key("search_mode", "search"))
  return net


def half_exact(t: torch.Tensor) -> torch.Tensor:
  return t.half().float()


def randomize(net, gen):
  """Random weights, affine parameters, running statistics and N(0, 1) arch logits (float16-exact).

  Off the default initialisation every candidate batch norm differs and the
  argmax widths and depths are not all ties; a classifier on the scale of its
  inputs makes the logits O(1), so an absolute tolerance on them means something.
  """
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("attentions"):
        p.copy_(torch.randn(p.shape, generator=gen))
      elif name.startswith("classifier.weight"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      elif name.startswith("classifier.bias") or name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif p.dim() == 1:  # batch-norm scale
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      p.copy_(half_exact(p))
    for name, b in net.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(half_exact(0.2 * torch.randn(b.shape, generator=gen)))
      elif name.endswith("running_var"):
        b.copy_(half_exact(0.5 + torch.rand(b.shape, generator=gen)))


def gumbel(shape, gen) -> torch.Tensor:
  """Standard Gumbel noise drawn as the official sampler draws it: -log of an Exponential(1)."""
  e = torch.empty(shape).exponential_(generator=gen)
  return -e.log()


@contextlib.contextmanager
def forced_sampling(width_noise, width_index, depth_noise):
  """Replace the official Gumbel sampler by one that uses the given noise and drawn indices.

  Everything downstream of the noise stays the official formula: z =
  (log_softmax(alpha) + g) / tau; the width weights are softmax(z[I]) over the
  two drawn indices, the depth weights the full softmax(z). The official
  sampler is called with ``just_prob=True`` for depth.
  """
  original = X.search.select2withP

  def select(logits, tau, just_prob=False, num=2, eps=1e-7):
    g = depth_noise if just_prob else width_noise
    assert g.shape == logits.shape, (g.shape, logits.shape)
    z = (logits.log_softmax(dim=1) + g) / tau
    if just_prob:
      return F.softmax(z, dim=1)
    return width_index, F.softmax(torch.gather(z, 1, width_index), dim=1)

  X.search.select2withP = select
  try:
    yield
  finally:
    X.search.select2withP = original


def draw_indices(width_logits, noise, gen) -> torch.Tensor:
  """Two distinct candidates per conv, drawn as the official sampler does (multinomial over p̂ + 1e-7)."""
  probs = F.softmax((width_logits.log_softmax(dim=1) + noise) / TAU, dim=1)
  return torch.multinomial(probs + 1e-7, 2, replacement=False, generator=gen)


def bn_stats(net) -> dict:
  return {f"stat/{k}": v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()
          if k.endswith("running_mean") or k.endswith("running_var")}


def forward_fixture(depth: int, gen) -> dict:
  net = build(depth)
  randomize(net, gen)
  out = {}
  for k, v in net.state_dict().items():
    if k.endswith("num_batches_tracked") or k.endswith("choices_tensor"):
      continue
    kind = "arch" if k.endswith("attentions") else "param"
    out[f"{kind}/{k}"] = v.detach().numpy().astype(np.float16)
  # Unit variance: pixel noise plus a colour per image, so that pooled features (and logits) differ between images.
  colour = torch.randn(BATCH, 3, 1, 1, generator=gen)
  images = half_exact(0.6 * torch.randn(BATCH, 3, 32, 32, generator=gen) + 0.8 * colour)
  labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
  wl, dl = net.width_attentions.detach(), net.depth_attentions.detach()
  width_noise, depth_noise = gumbel(wl.shape, gen), gumbel(dl.shape, gen)
  width_index = draw_indices(wl, width_noise, gen)
  out.update(images=images.numpy().astype(np.float16), labels=labels.numpy().astype(np.int32), tau=np.float32(TAU),
             width_noise=width_noise.numpy(), width_index=width_index.numpy().astype(np.int32),
             depth_noise=depth_noise.numpy())
  net.tau = TAU
  with forced_sampling(width_noise, width_index, depth_noise):
    net.eval()  # running statistics, which stay as they are
    with torch.no_grad():
      logits, expected = net(images)
    out.update(eval_logits=logits.numpy(), expected_cost=np.float64(expected.item()))
    net.train()  # batch statistics; the drawn candidates' running statistics move
    net.zero_grad()
    logits, _ = net(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
  out.update(train_logits=logits.detach().numpy(), loss=np.float32(loss.item()),
             width_grad=net.width_attentions.grad.numpy().copy(), depth_grad=net.depth_attentions.grad.numpy().copy())
  out.update(bn_stats(net))
  return out


def cost_fixture(gen) -> dict:
  """E (from the search forward) and F and the genotype (from ``get_flop("genotype")``), in official MFLOPs."""
  out = {}
  for depth in (20, 56, 164):
    net = build(depth)
    net.tau = 1.0
    wls, dls, es, fs, xch, xbl = [], [], [], [], [], []
    for i in range(COST_SETTINGS):
      scale = 1.0 + 2.0 * i  # from nearly flat to peaked distributions
      with torch.no_grad():
        net.width_attentions.copy_(scale * torch.randn(net.width_attentions.shape, generator=gen))
        net.depth_attentions.copy_(scale * torch.randn(net.depth_attentions.shape, generator=gen))
        _, expected = net(torch.zeros(1, 3, 32, 32))  # E does not depend on the (official, random) sample
      flop, config = net.get_flop("genotype", {}, None)
      wls.append(net.width_attentions.detach().numpy().copy())
      dls.append(net.depth_attentions.detach().numpy().copy())
      es.append(expected.item())
      fs.append(flop)
      xch.append(config["xchannels"])
      xbl.append(config["xblocks"])
    p = f"resnet{depth}/"
    out.update({p + "width_logits": np.stack(wls), p + "depth_logits": np.stack(dls),
                p + "expected": np.array(es, np.float64), p + "discrete": np.array(fs, np.float64),
                p + "xchannels": np.array(xch, np.int32), p + "xblocks": np.array(xbl, np.int32)})
  return out


def kd_fixture(gen) -> dict:
  """loss_KD_fn with the scripts' alpha 0.9 and T 4, and its gradient with respect to the student logits."""
  out = {}
  for i, (batch, classes, scale) in enumerate([(8, 10, 1.0), (16, 100, 3.0), (5, 10, 8.0)]):
    student = (scale * torch.randn(batch, classes, generator=gen)).requires_grad_(True)
    teacher = scale * torch.randn(batch, classes, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    loss = X.kd.loss_KD_fn(torch.nn.CrossEntropyLoss(), student, teacher, None, None, labels, 0.9, 4.0)
    loss.backward()
    out.update({f"case{i}/student": student.detach().numpy(), f"case{i}/teacher": teacher.numpy(),
                f"case{i}/labels": labels.numpy().astype(np.int32), f"case{i}/loss": np.float32(loss.item()),
                f"case{i}/grad": student.grad.numpy()})
  out.update(alpha=np.float32(0.9), temperature=np.float32(4.0))
  return out


LR_SETTINGS = [  # (epochs, warmup, steps per epoch, base lr): the official E300-W5 recipe and small ones
    (300, 5, 2, 0.1),
    (10, 3, 4, 0.1),
    (12, 0, 3, 0.05),
]
TAU_TOTALS = (600, 305, 10)


def schedule_fixture() -> dict:
  """Per-epoch tau (set_tau with ratio epoch / total) and the per-step learning rate of CosineAnnealingLR."""
  out = {}
  net = X.search.SearchShapeCifarResNet("ResNetBasicblock", 20, NUM_CLASSES)
  for total in TAU_TOTALS:
    taus = []
    for epoch in range(total):
      net.set_tau(5.0, 0.1, epoch / total)
      taus.append(net.tau)
    out[f"tau/{total}"] = np.array(taus, np.float64)
  for epochs, warmup, steps, base in LR_SETTINGS:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base, momentum=0.9, nesterov=True)
    scheduler = X.optimizers.CosineAnnealingLR(optimizer, warmup, epochs, epochs, 0.0)
    lrs = []
    for epoch in range(epochs + warmup):  # the official loop runs epochs + warmup epochs
      scheduler.update(epoch, 0.0)
      for i in range(steps):
        scheduler.update(None, 1.0 * i / steps)
        lrs.append(optimizer.param_groups[0]["lr"])
    out[f"lr/{epochs}-{warmup}-{steps}-{base}"] = np.array(lrs, np.float64)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join("tests", "fixtures", "parity"))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  torch.manual_seed(SEED)
  torch.set_num_threads(min(2, torch.get_num_threads()))
  gen = torch.Generator().manual_seed(SEED)
  files = {f"resnet{d}.npz": (lambda d=d: forward_fixture(d, gen)) for d in (20, 56)}
  files.update({"costs.npz": lambda: cost_fixture(gen), "kd.npz": lambda: kd_fixture(gen),
                "schedules.npz": schedule_fixture})
  for name, make in files.items():
    path = os.path.join(args.out, name)
    np.savez_compressed(path, **make())
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")


if __name__ == "__main__":
  main()
