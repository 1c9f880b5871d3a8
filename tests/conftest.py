"""Shared fixtures: small models whose dense Hessian is cheap to form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.flatten_util import ravel_pytree


@pytest.fixture
def x64():
  """Runs the test in float64 (where precision is the point)."""
  with jax.enable_x64(True):
    yield


class TinyConvNet(nn.Module):
  """Conv -> tanh -> dense: parameters of four different shapes."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), padding="SAME", param_dtype=x.dtype)(x)
    x = jnp.tanh(x).reshape((x.shape[0], -1))
    return nn.Dense(2, param_dtype=x.dtype)(x)


def mlp_problem(seed=0, n=32, din=3, hidden=5, dtype=jnp.float64):
  """A tanh MLP regression: (params, loss(params, batch), batch)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {
      "hidden": {"w": jax.random.normal(k1, (din, hidden), dtype),
                 "b": 0.1 * jax.random.normal(k2, (hidden,), dtype)},
      "out": {"w": jax.random.normal(k3, (hidden,), dtype)},
  }
  x = jax.random.normal(k4, (n, din), dtype)
  y = jnp.sin(x @ jnp.arange(1, din + 1, dtype=dtype))

  def loss(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["hidden"]["w"] + p["hidden"]["b"])
    return jnp.mean((h @ p["out"]["w"] - yb) ** 2)

  return params, loss, (x, y)


def conv_problem(seed=0, n=8, dtype=jnp.float64):
  """A tiny Flax conv net classifier: (params, loss(params, batch), batch)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k1, (n, 4, 4, 1), dtype)
  y = jax.random.randint(k2, (n,), 0, 2)
  model = TinyConvNet()
  params = model.init(k3, x)["params"]

  def loss(p, batch):
    xb, yb = batch
    logits = model.apply({"params": p}, xb)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

  return params, loss, (x, y)


def dense_hessian(loss, params):
  """The Hessian as a matrix over the ravelled parameters (the oracle)."""
  flat, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss(unravel(f)))(flat)


def flat(tree):
  return ravel_pytree(tree)[0]
