"""Parameter trees for the compile-time benchmark, with their losses.

A :class:`Structure` is a parameter tree, one tiny batch and a loss
``loss(params, batch) -> (value, aux)``; ``aux`` is what a training loss
returns beside its value (BatchNorm's updated statistics) and a gradient
function drops. What varies between structures is the tree: how many leaves
and what layers compute them. The widths and batches are small, since
compile time follows the structure, not the size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _resnet


@dataclasses.dataclass(frozen=True)
class Structure:
  name: str
  params: Any
  batch: dict[str, Any]
  loss: Callable[[Any, dict[str, Any]], tuple[jax.Array, Any]]
  description: str

  @property
  def num_leaves(self) -> int:
    return len(jax.tree.leaves(self.params))

  @property
  def num_params(self) -> int:
    return int(sum(leaf.size for leaf in jax.tree.leaves(self.params)))

  def grad_fn(self, batch: dict[str, Any]) -> Callable[[Any], Any]:
    """The gradient of the loss on ``batch``, its aux discarded."""
    grad = jax.grad(self.loss, has_aux=True)
    return lambda params: grad(params, batch)[0]


def synthetic(num_leaves: int, seed: int = 0) -> Structure:
  """``num_leaves`` float32 (4, 3) matrices, each applied to one (8, 4) input.

  Loss: the sum over leaves, in sorted key order, of
  ``sum(tanh(x @ W_i) ** 2)``.
  """
  rng = np.random.default_rng(seed)
  weights = rng.normal(scale=0.5, size=(num_leaves, 4, 3)).astype(np.float32)
  params = {f"w{i:05d}": jnp.asarray(w) for i, w in enumerate(weights)}
  x = jnp.asarray(rng.normal(size=(8, 4)).astype(np.float32))

  def loss(params, batch):
    terms = [jnp.sum(jnp.tanh(batch["x"] @ w) ** 2)
             for w in jax.tree.leaves(params)]  # dicts flatten in key order
    return sum(terms), None

  return Structure(f"synthetic {num_leaves}", params, {"x": x}, loss,
                   f"{num_leaves} leaves of f32[4, 3], loss "
                   "sum_i sum(tanh(x @ W_i)^2), x f32[8, 4]")


def resnet50(num_classes: int = 10, width: int = 64):
  """CIFAR-style ResNet-50: 3x3 stem, no max-pool, bottlenecks 3-4-6-3."""
  import flax.linen as nn

  norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)

  class Bottleneck(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train):
      bn = functools.partial(norm, use_running_average=not train)
      y = nn.relu(bn()(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
      y = nn.Conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)),
                  use_bias=False)(y)
      y = nn.relu(bn()(y))
      y = bn()(nn.Conv(4 * self.features, (1, 1), use_bias=False)(y))
      if self.strides != 1 or x.shape[-1] != 4 * self.features:
        x = nn.Conv(4 * self.features, (1, 1), self.strides, use_bias=False)(x)
        x = bn()(x)
      return nn.relu(x + y)

  class ResNet50(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
      x = nn.relu(norm(use_running_average=not train)(x))
      for stage, blocks in enumerate((3, 4, 6, 3)):
        for block in range(blocks):
          strides = 2 if stage > 0 and block == 0 else 1
          x = Bottleneck(width * 2**stage, strides)(x, train)
      return nn.Dense(num_classes)(jnp.mean(x, axis=(1, 2)))

  return ResNet50()


def transformer_encoder(num_layers: int = 12, d_model: int = 64,
                        num_heads: int = 4, mlp_dim: int = 128,
                        vocab_size: int = 32, num_classes: int = 10):
  """Pre-LayerNorm encoder, learned positions, mean-pooled classifier."""
  import flax.linen as nn

  class EncoderLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x + nn.MultiHeadDotProductAttention(num_heads=num_heads)(
          nn.LayerNorm()(x))
      y = nn.gelu(nn.Dense(mlp_dim)(nn.LayerNorm()(x)))
      return x + nn.Dense(d_model)(y)

  class Encoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(vocab_size, d_model)(tokens)
      x = x + self.param("position_embedding", nn.initializers.normal(0.02),
                         (tokens.shape[1], d_model))
      for _ in range(num_layers):
        x = EncoderLayer()(x)
      x = jnp.mean(nn.LayerNorm()(x), axis=1)
      return nn.Dense(num_classes)(x)

  return Encoder()


def _classifier(name, model, x, description, *, batchnorm, seed=0):
  """A Flax Linen classifier on ``x`` with random labels, cross-entropy loss.

  With BatchNorm the loss normalises with the batch's statistics
  (``mutable=["batch_stats"]``) and returns the updated ones as its aux.
  """
  labels = jax.random.randint(jax.random.key(seed + 1), (x.shape[0],), 0, 10)
  kwargs = {"train": False} if batchnorm else {}
  variables = jax.jit(functools.partial(model.init, **kwargs))(
      jax.random.key(seed), x)
  batch = {"x": x, "y": labels}
  if batchnorm:
    batch["batch_stats"] = variables["batch_stats"]

  def loss(params, batch):
    if batchnorm:
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch["batch_stats"]}, batch["x"],
          train=True, mutable=["batch_stats"])
    else:
      logits, updates = model.apply({"params": params}, batch["x"]), None
    value = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.mean(value), updates

  return Structure(name, variables["params"], batch, loss, description)


def images(batch_size: int = 2) -> jax.Array:
  return jax.random.normal(jax.random.key(2), (batch_size, 32, 32, 3))


def resnet18_structure() -> Structure:
  return _classifier("resnet18", _resnet.resnet18(), images(),
                     "CIFAR-style ResNet-18 (BatchNorm), batch 2 of 32x32x3",
                     batchnorm=True)


def resnet50_structure() -> Structure:
  return _classifier("resnet50", resnet50(), images(),
                     "CIFAR-style ResNet-50 (bottlenecks 3-4-6-3, BatchNorm), "
                     "batch 2 of 32x32x3", batchnorm=True)


def transformer_structure(num_layers: int = 12) -> Structure:
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 32)
  return _classifier(
      f"transformer {num_layers} layers", transformer_encoder(num_layers),
      tokens, f"{num_layers}-layer encoder, d_model 64, 4 heads, MLP 128, "
      "LayerNorm, learned positions; batch 2 of 8 tokens", batchnorm=False)
