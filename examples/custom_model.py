"""Search a network of your own with TAS: declare its widths and depths, search at half its MACs, export it.

Run from the repository root: ``.venv/bin/python examples/custom_model.py`` (about a minute and a half on two CPU cores).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tas_jax.core import macs
from tas_jax.data import normalize
from tas_jax.data.synthetic import make_synthetic
from tas_jax.nets import searchable as S
from tas_jax.steps.searchable import Search


class Residual(nnx.Module):
  """conv-bn-relu, conv-bn, plus the input: both convs write into the stream's width group."""

  def __init__(self, stream: S.Width, *, rngs):
    hidden = S.Width(stream.nominal, rngs=rngs)  # the inner width is free
    self.a = S.Conv(stream, hidden, 3, rngs=rngs)
    self.b = S.Conv(hidden, stream, 3, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(x + self.b(jax.nn.relu(self.a(x))))


class MyNet(nnx.Module):

  def __init__(self, *, rngs):
    stem, wide = S.Width(16, rngs=rngs), S.Width(32, rngs=rngs)
    self.stem = S.Conv(3, stem, 3, rngs=rngs)
    self.stage1 = S.Stack([Residual(stem, rngs=rngs) for _ in range(3)], rngs=rngs)  # keeps 1, 2 or 3 blocks
    self.down = S.Conv(stem, wide, 3, stride=2, rngs=rngs)
    self.stage2 = S.Stack([Residual(wide, rngs=rngs) for _ in range(3)], rngs=rngs)
    self.head = S.Dense(wide, 10, rngs=rngs)

  def __call__(self, x):
    x = self.stage1(jax.nn.relu(self.stem(x)))
    x = self.stage2(jax.nn.relu(self.down(x)))
    return self.head(x.mean(axis=(1, 2)))


def main():
  data = make_synthetic(seed=0, num_train=2048, num_test=512)
  prep = lambda images: normalize(images, data.mean, data.std)
  net = MyNet(rngs=nnx.Rngs(0))
  search = Search.create(net, jnp.zeros((1, 32, 32, 3)), target_ratio=0.5)
  state = search.init(net)
  step = jax.jit(search.step)
  rng = np.random.default_rng(0)
  half = len(data.train_labels) // 2  # weights learn on one half, the architecture on the other
  for i in range(150):
    t, v = rng.integers(0, half, 64), rng.integers(half, 2 * half, 64)
    tau = 5.0 - 4.9 * i / 149  # the Gumbel temperature falls from 5 to 0.1
    state, m = step(state, (prep(data.train_images[t]), data.train_labels[t]),
                    (prep(data.train_images[v]), data.train_labels[v]), jax.random.key(i), tau)
    if i % 50 == 49:
      print(f"step {i + 1}: loss {float(m['weight_loss']):.3f}, expected MACs {float(m['expected_ratio']):.2f} "
            f"and argmax {float(m['discrete_ratio']):.2f} of the full network")

  small = search.export(state)  # the argmax widths and depths, fitted into the cost band
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  print("argmax widths and depths:", S.describe(search.model(state)))
  full, pruned = search.max_cost, macs.count(small, image)
  print(f"MACs {pruned:,} of {full:,} ({pruned / full:.2f}), parameters {S.num_params(small):,} "
        f"of {S.num_params(net):,}")
  logits = jax.jit(lambda x: small(x))(prep(data.test_images))
  print(f"exported network, test accuracy after the search: {float((logits.argmax(-1) == data.test_labels).mean()):.3f}"
        " (chance 0.100)")


if __name__ == "__main__":
  main()
