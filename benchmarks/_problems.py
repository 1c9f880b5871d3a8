"""The models and data the quality benchmark scores estimators on.

A :class:`Problem` is one model on one dataset with the training CLI's
protocol (``xsam_optax.train``): its training-mode loss (BatchNorm with batch
statistics, running statistics discarded, as in ``loop.make_grad_fn``), its
batch size, and its training set. Three problems:

* ``cnn-mnist1d``: the CLI's default, the CNN with BatchNorm on MNIST-1D;
* ``mlp-digits``: the CLI's MLP (no BatchNorm) on scikit-learn's 8x8 digits;
* ``strided-mnist1d``: a conv net of another shape than the CLI's, two
  strided 1-D convolutions (k5, stride 2, 16 and 32 channels) with BatchNorm
  and a linear head, on MNIST-1D;
* ``attention-mnist1d``: another family, a one-block pre-LayerNorm
  transformer (the signal cut into 10 tokens of 4, self-attention with 2
  heads, a GELU MLP, no BatchNorm, no ReLU), on MNIST-1D.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xsam_optax.train import data as data_lib
from xsam_optax.train import loop
from xsam_optax.train import models

PROBLEMS = {"cnn-mnist1d": ("mnist1d", "cnn"), "mlp-digits": ("digits", "mlp"),
            "strided-mnist1d": ("mnist1d", "strided"),
            "attention-mnist1d": ("mnist1d", "attention")}
BATCH_SIZE = 128


class StridedConvNet(nn.Module):
  """Two strided Conv(k5) -> BatchNorm -> ReLU blocks, flatten, Dense."""

  num_classes: int
  features: tuple[int, ...] = (16, 32)

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in self.features:
      x = nn.Conv(width, kernel_size=(5,), strides=(2,), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=models.BATCHNORM_MOMENTUM)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class AttentionNet(nn.Module):
  """Tokens of ``patch`` samples, one pre-LayerNorm transformer block, mean pool, Dense."""

  num_classes: int
  patch: int = 4
  width: int = 32
  heads: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No BatchNorm: the same function in training and evaluation.
    n, length = x.shape[0], x.shape[1]
    x = nn.Dense(self.width)(x.reshape((n, length // self.patch, -1)))
    x = x + self.param("position", nn.initializers.normal(0.02),
                       x.shape[1:], x.dtype)
    x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x))
    y = nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x)))
    x = x + nn.Dense(self.width)(y)
    return nn.Dense(self.num_classes)(jnp.mean(nn.LayerNorm()(x), axis=1))


class Problem(NamedTuple):
  """A model, its training set and its training-mode loss."""

  name: str
  model: Any
  x_train: np.ndarray
  y_train: np.ndarray
  batch_size: int
  description: str

  def loss(self, params, batch_stats, x, y):
    """Training-mode mean cross-entropy (the loss every step differentiates)."""
    return loop.make_train_loss(self.model)(params, batch_stats, x, y)[0]

  def grad_fn(self, batch_stats, x, y):
    """``params -> gradient`` on ``(x, y)``: ``loop.make_grad_fn``."""
    return loop.make_grad_fn(self.model, batch_stats, x, y)


def load(name: str) -> Problem:
  dataset_name, model_name = PROBLEMS[name]
  ds = data_lib.load_dataset(dataset_name)
  if model_name == "strided":
    model = StridedConvNet(ds.num_classes)
  elif model_name == "attention":
    model = AttentionNet(ds.num_classes)
  else:
    model = models.make_model(model_name, num_classes=ds.num_classes)
  what = {"cnn": "CLI CNN, 3x (Conv k3, 32 ch, BatchNorm, ReLU), Dense",
          "mlp": "CLI MLP, 2x128 ReLU, no BatchNorm",
          "strided": "2x (Conv k5 stride 2, 16/32 ch, BatchNorm, ReLU), "
                     "Dense",
          "attention": "10 tokens of 4, one pre-LayerNorm block (2-head "
                       "attention, GELU MLP), mean pool, Dense"}[model_name]
  return Problem(name, model, ds.x_train, ds.y_train, BATCH_SIZE,
                 f"{what}; {dataset_name} ({len(ds.x_train)} training "
                 f"examples), batch {BATCH_SIZE}")


def sub_batch(x: jax.Array, y: jax.Array, fraction: float):
  """The leading ``fraction`` of a batch (at least 2 examples, for BatchNorm)."""
  if fraction >= 1.0:
    return x, y
  n = max(2, int(round(fraction * x.shape[0])))
  return x[:n], y[:n]


def large_batch(problem: Problem, num_chunks: int):
  """``num_chunks`` batches of ``batch_size`` from the training set, stacked.

  The large-batch Hessian is the mean of these batches' training-mode
  Hessians: the Hessian of the expected mini-batch loss that SGD descends (for
  a model without BatchNorm, the Hessian of the mean loss over all of them).
  """
  b = problem.batch_size
  n = min(num_chunks, len(problem.x_train) // b)
  x = jnp.asarray(problem.x_train[:n * b]).reshape((n, b) + problem.x_train.shape[1:])
  y = jnp.asarray(problem.y_train[:n * b]).reshape(n, b)
  return x, y
