"""Training losses: cross-entropy with optional label smoothing, and TAS's knowledge distillation (METHOD.md §6.3).

Logits are cast to float32 before any softmax, so a bfloat16 network gets a
float32 loss. Every loss is a mean over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Mean cross-entropy of integer ``labels`` under ``logits`` ``[B, K]``.

    CE = -1/B sum_b sum_k q_bk log softmax(z_b)_k,
    q_b = (1 - eps) onehot(y_b) + eps / K

  as ``torch.nn.CrossEntropyLoss(label_smoothing=eps)``; eps = 0 is the plain
  cross-entropy, and the ImageNet "Smooth" recipe uses eps = 0.1 (METHOD.md §6.3).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if label_smoothing:
    eps = jnp.float32(label_smoothing)
    nll = (1.0 - eps) * nll - eps * logp.mean(axis=-1)
  return nll.mean()


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 4.0) -> jax.Array:
  """Batch-mean KL(softmax(z_t / T) || softmax(z_s / T)), PyTorch's ``kl_div(..., reduction="batchmean")``.

    KL = 1/B sum_b sum_k p_bk (log p_bk - log s_bk),
    p = softmax(z_t / T), s = softmax(z_s / T)

  No gradient flows into the teacher's logits.
  """
  t = jnp.float32(temperature)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  return (jnp.exp(log_p) * (log_p - log_s)).sum(axis=-1).mean()


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: float = 0.9,
            temperature: float = 4.0, label_smoothing: float = 0.0) -> jax.Array:
  """TAS's distillation loss (``simple_KD_main.loss_KD_fn``, METHOD.md §6.3), Hinton's KD:

    L = (1 - a) CE(z_s, y) + a T^2 KL(softmax(z_t / T) || softmax(z_s / T))

  with the batch-mean KL of :func:`kl_divergence`, a = 0.9 and T = 4 as the
  official scripts pass. The T^2 factor keeps the soft term's gradient on the
  scale of the hard term's whatever T is. The paper's Eq. 9 swaps student and
  teacher; the code (and this function) does not. ``label_smoothing`` applies
  to the hard term only.
  """
  ce = cross_entropy(student_logits, labels, label_smoothing)
  kl = kl_divergence(student_logits, teacher_logits, temperature)
  a = jnp.float32(alpha)
  return (1.0 - a) * ce + a * jnp.float32(temperature) ** 2 * kl


def accuracy(logits, labels):
  """Top-1 accuracy of a batch (the fraction of rows whose largest logit is the label)."""
  return (jnp.argmax(logits, -1) == labels).mean()
