"""Helpers the tests share: small problems and independent oracles.

The oracles restate the maths without the library: a dense Hessian from
``jax.hessian`` of the ravelled loss, the correction rule in NumPy on flat
float64 vectors.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def flat(tree) -> np.ndarray:
  """The leaves, ravelled and concatenated in NumPy float64 (tree order)."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def oracle_correct(g, v, alpha, *, rule="reference", normalize=True):
  """X-SAM's rule restated on flat NumPy vectors (a zero g gives zeros)."""
  g, v = flat(g), flat(v)
  norm = np.linalg.norm(g)
  g_hat = g / norm if norm > 0 else np.zeros_like(g)
  c = g_hat @ v
  corrected = g_hat - alpha * (c if rule == "sign_invariant" else abs(c)) * v
  return corrected if normalize else norm * corrected


def dense_hessian(loss, params):
  """The Hessian as a matrix over the ravelled parameters."""
  vector, unravel = ravel_pytree(params)
  return jax.hessian(lambda f: loss(unravel(f)))(vector)


def mlp_problem(seed=0, n=32, din=3, hidden=5, dtype=jnp.float64):
  """A tanh MLP regression: ``(params, loss(params, batch), batch)``.

  Data come from NumPy: eager JAX ops would each compile a tiny program.
  """
  rng = np.random.default_rng(seed)
  cast = lambda a: jnp.asarray(np.asarray(a, np.float64).astype(dtype))
  params = {"hidden": {"w": cast(rng.normal(size=(din, hidden))),
                       "b": cast(0.1 * rng.normal(size=hidden))},
            "out": {"w": cast(rng.normal(size=hidden))}}
  x = rng.normal(size=(n, din))
  batch = (cast(x), cast(np.sin(x @ np.arange(1, din + 1))))

  def loss(p, batch):
    xb, yb = batch
    h = jnp.tanh(xb @ p["hidden"]["w"] + p["hidden"]["b"])
    return jnp.mean((h @ p["out"]["w"] - yb) ** 2)

  return params, loss, batch


class TinyConvNet(nn.Module):
  """Conv -> tanh -> dense: parameters of four different shapes."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), padding="SAME", param_dtype=x.dtype)(x)
    x = jnp.tanh(x).reshape((x.shape[0], -1))
    return nn.Dense(2, param_dtype=x.dtype)(x)


def conv_problem(seed=0, n=8, dtype=jnp.float64):
  """A tiny Flax conv net classifier: ``(params, loss(params, batch), batch)``."""
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


class Counted:
  """``grad_fn`` that counts its calls: each call is one gradient."""

  def __init__(self, grad_fn):
    self.grad_fn, self.calls = grad_fn, 0

  def __call__(self, params):
    self.calls += 1
    return self.grad_fn(params)
