"""CIFAR-style ResNet-18, the model of the GPU anchors in XSAM.md."""

from __future__ import annotations

import functools

# The benchmarks' --smoke model: the same blocks, 2 stages of 1 block, 8 and 16
# channels (compiles in a fraction of the time).
SMOKE = dict(widths=(8, 16), blocks=1)


def resnet18(num_classes: int = 10, *, widths=(64, 128, 256, 512), blocks=2):
  """CIFAR-style ResNet-18: 3x3 stem, no max-pool, BasicBlocks 2-2-2-2.

  ``widths`` (one per stage) and ``blocks`` (per stage) shrink it for smoke runs.
  """
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
      x = nn.Conv(widths[0], (3, 3), padding=pad, use_bias=False)(x)
      x = nn.relu(norm(use_running_average=not train)(x))
      for stage, features in enumerate(widths):
        for block in range(blocks):
          strides = 2 if stage > 0 and block == 0 else 1
          x = BasicBlock(features, strides)(x, train)
      x = jnp.mean(x, axis=(1, 2))
      return nn.Dense(self.num_classes)(x)

  return ResNet18(num_classes)
