"""CIFAR-style ResNet-18, the model of the GPU anchors in XSAM.md."""

from __future__ import annotations

import functools


def resnet18(num_classes: int = 10):
  """CIFAR-style ResNet-18: 3x3 stem, no max-pool, BasicBlocks 2-2-2-2."""
  import flax.linen as nn
  import jax.numpy as jnp

  norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  pad = ((1, 1), (1, 1))

  class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train):
      y = nn.Conv(self.features, (3, 3), self.strides, padding=pad,
                  use_bias=False)(x)
      y = nn.relu(norm(use_running_average=not train)(y))
      y = nn.Conv(self.features, (3, 3), padding=pad, use_bias=False)(y)
      y = norm(use_running_average=not train)(y)
      if self.strides != 1 or x.shape[-1] != self.features:
        x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
        x = norm(use_running_average=not train)(x)
      return nn.relu(x + y)

  class ResNet18(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(64, (3, 3), padding=pad, use_bias=False)(x)
      x = nn.relu(norm(use_running_average=not train)(x))
      for stage, features in enumerate((64, 128, 256, 512)):
        for block in range(2):
          strides = 2 if stage > 0 and block == 0 else 1
          x = BasicBlock(features, strides)(x, train)
      x = jnp.mean(x, axis=(1, 2))
      return nn.Dense(self.num_classes)(x)

  return ResNet18(num_classes)
