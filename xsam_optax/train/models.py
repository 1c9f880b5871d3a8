"""Small Flax Linen models for the training CLI.

Both models take channels-last inputs of any spatial rank (``(N, L, C)`` for
MNIST-1D, ``(N, H, W, C)`` for digits) and a ``train`` flag that switches
BatchNorm between batch statistics (``train=True``) and running statistics.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = make_model("cnn", num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 40, 1)))
  >>> sorted(variables)
  ['batch_stats', 'params']
  >>> model.apply(variables, jnp.zeros((2, 40, 1))).shape
  (2, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

MODELS = ("cnn", "mlp")

# PyTorch's BatchNorm momentum 0.1 is Flax's 0.9 (weight of the old value).
BATCHNORM_MOMENTUM = 0.9


class CNN(nn.Module):
  """Conv -> BatchNorm -> ReLU blocks, stride 2 after the first, then a linear head.

  Attributes:
    num_classes: number of output logits.
    features: channels of each conv block.
    kernel_size: kernel extent along every spatial axis.
    use_batchnorm: BatchNorm after each conv (conv biases are then dropped).
  """

  num_classes: int
  features: Sequence[int] = (32, 32, 32)
  kernel_size: int = 3
  use_batchnorm: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    spatial = x.ndim - 2
    for i, width in enumerate(self.features):
      x = nn.Conv(
          width,
          kernel_size=(self.kernel_size,) * spatial,
          strides=(1 if i == 0 else 2,) * spatial,
          use_bias=not self.use_batchnorm,
      )(x)
      if self.use_batchnorm:
        x = nn.BatchNorm(use_running_average=not train, momentum=BATCHNORM_MOMENTUM)(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """Flatten, then ReLU hidden layers (no BatchNorm), then a linear head.

  Attributes:
    num_classes: number of output logits.
    hidden: width of each hidden layer.
  """

  num_classes: int
  hidden: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No train/eval difference; accepted for a uniform interface.
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def make_model(name: str, *, num_classes: int) -> nn.Module:
  """Builds a model by name (``"cnn"`` with BatchNorm, or ``"mlp"``).

  Example:
    >>> make_model("mlp", num_classes=3).num_classes
    3
  """
  if name == "cnn":
    return CNN(num_classes=num_classes)
  if name == "mlp":
    return MLP(num_classes=num_classes)
  raise ValueError(f"model must be one of {MODELS}, got {name!r}")
