"""A small Vision Transformer for CIFAR, searchable: every block's MLP width and the number of blocks.

Patches of ``patch x patch`` pixels are embedded by a strided conv, a learned
position embedding is added, pre-norm blocks (multi-head self-attention, then
a two-layer GELU MLP, each with a residual add) follow, and the mean token
feeds a linear classifier. The residual width ``dim`` and the heads are
fixed; the hidden width of every block's MLP is its own width group and the
blocks form one depth group. Attention costs its four projections plus Q K^T
and A V, ``tokens^2 * dim`` multiply-accumulates each per image (see
:mod:`tas_jax.core.macs`). Its blocks are not scanned: on the CPU the scanned
step ran 1.6 times slower (0.69 s against 0.44 s per iteration, batch 64)
for a compile time of 8 s unrolled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tas_jax.nets import searchable as S


class Attention(nnx.Module):

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    self.heads = heads
    self.q, self.k, self.v, self.out = (S.Dense(dim, dim, rngs=rngs) for _ in range(4))

  def __call__(self, x):
    b, n, d = x.shape
    split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads).astype(x.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    S.record(2 * n * n, d)  # the two token-by-token products
    return self.out(y.reshape(b, n, d))


class Block(nnx.Module):

  def __init__(self, dim: int, heads: int, mlp: int, *, search: bool, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = Attention(dim, heads, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    hidden = S.Width(mlp, search=search, rngs=rngs)
    self.fc1 = S.Dense(dim, hidden, rngs=rngs)
    self.fc2 = S.Dense(hidden, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
  """``ViT()``: 32 x 32 images, 4 x 4 patches, width 128, 6 blocks of 4 heads, MLP 256."""

  def __init__(self, *, image_size: int = 32, patch: int = 4, dim: int = 128, depth: int = 6, heads: int = 4,
               mlp: int = 256, num_classes: int = 10, in_channels: int = 3, search: bool = True, rngs: nnx.Rngs):
    if image_size % patch:
      raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    self.embed = S.Conv(in_channels, dim, patch, stride=patch, pad=0, norm=False, bias=True, rngs=rngs)
    tokens = (image_size // patch) ** 2
    self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, tokens, dim), jnp.float32))
    self.blocks = S.Stack([Block(dim, heads, mlp, search=search, rngs=rngs) for _ in range(depth)],
                          search=search, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = S.Dense(dim, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d) + self.position[...].astype(x.dtype)
    x = self.blocks(x)
    return self.head(self.norm(x).mean(axis=1))
