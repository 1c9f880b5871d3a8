"""BatchNorm in the training step: batch statistics everywhere, running stats updated once.

The oracles call ``model.apply`` directly (not the training code's loss helpers)
and build dense Hessians with ``jax.hessian``.
"""

import functools

import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xsam_optax.train import loop
from xsam_optax.train import optimizers
from xsam_optax.train.models import CNN

NUM_CLASSES = 3
MODEL = CNN(num_classes=NUM_CLASSES, features=(2,), kernel_size=3)  # 43 parameters


@jax.jit
def clean_stats(params, batch_stats, x):
  """Oracle: running statistics after one plain training-mode forward pass."""
  _, mutated = MODEL.apply({"params": params, "batch_stats": batch_stats}, x,
                           train=True, mutable=["batch_stats"])
  return mutated["batch_stats"]


@functools.partial(jax.jit, static_argnames="train")
def oracle_loss(params, batch_stats, x, y, train=True):
  if train:
    logits, _ = MODEL.apply({"params": params, "batch_stats": batch_stats}, x,
                            train=True, mutable=["batch_stats"])
  else:
    logits = MODEL.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


oracle_grad = jax.jit(jax.grad(oracle_loss), static_argnames="train")


@functools.partial(jax.jit, static_argnames="train")
def dense_hessian_eigenvalues(params, batch_stats, x, y, train):
  flat, unravel = ravel_pytree(params)
  f = lambda w: oracle_loss(unravel(w), batch_stats, x, y, train=train)
  return jnp.linalg.eigvalsh(jax.hessian(f)(flat))


@pytest.fixture(scope="module")
def setup():
  kx, kv = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (16, 5, 1)) * 2.0 + 0.5
  y = jnp.arange(16) % NUM_CLASSES
  variables = jax.jit(MODEL.init)(jax.random.key(0), x)
  # Non-trivial running statistics, so "updated from" is visible.
  batch_stats = jax.tree.map(
      lambda s: s + 0.3 * jax.random.normal(kv, s.shape), variables["batch_stats"])
  return variables["params"], batch_stats, x, y


def trees_differ(a, b, tol=1e-5):
  gaps = jax.tree.leaves(jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
  return max(float(g) for g in gaps) > tol


def init(tx, params, batch_stats):
  return loop.TrainState(params, batch_stats, tx.init(params), jnp.zeros([], jnp.int32))


@pytest.mark.parametrize("refresh", [None, True], ids=["refresh-in-graph", "refresh-on-host"])
def test_running_stats_updated_once_from_clean_pass(setup, refresh):
  params, batch_stats, x, y = setup
  rho = 0.5
  tx = optimizers.make_optimizer("xsam", learning_rate=0.1, rho=rho, alpha=0.5,
                           update_every=1, num_iters=2).tx
  state = init(tx, params, batch_stats)
  step = jax.jit(loop.make_train_step(MODEL, tx), static_argnames="refresh")

  for _ in range(2):
    expected = clean_stats(state.params, state.batch_stats, x)
    new_state, _ = step(state, x, y, refresh=refresh)
    chex.assert_trees_all_close(new_state.batch_stats, expected, rtol=1e-5, atol=1e-6)
    # Controls that the comparison can tell apart: two updates in one step, or
    # statistics from the SAM-perturbed parameters.
    assert trees_differ(new_state.batch_stats, clean_stats(state.params, expected, x))
    g = oracle_grad(state.params, state.batch_stats, x, y)
    perturbed = optax.tree.add_scale(state.params, rho / optax.tree.norm(g), g)
    assert trees_differ(new_state.batch_stats,
                        clean_stats(perturbed, state.batch_stats, x))
    assert trees_differ(state.params, new_state.params)
    state = new_state


def test_grad_fn_uses_batch_statistics_not_running_ones(setup):
  params, batch_stats, x, y = setup
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  grad = jax.jit(lambda bs: loop.make_grad_fn(MODEL, bs, x, y)(params))
  g_running, g_zeros = grad(batch_stats), grad(zeros)
  chex.assert_trees_all_close(g_running, g_zeros, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(g_running, oracle_grad(params, batch_stats, x, y), rtol=1e-5, atol=1e-6)
  assert trees_differ(g_running, oracle_grad(params, batch_stats, x, y, train=False))


def test_sam_ascent_gradient_is_training_mode_on_same_batch(setup):
  params, batch_stats, x, y = setup
  lr, rho = 0.1, 0.2
  tx = optimizers.make_optimizer("sam", learning_rate=lr, rho=rho, momentum=0.0, weight_decay=0.0).tx
  new_state, _ = jax.jit(loop.make_train_step(MODEL, tx))(init(tx, params, batch_stats), x, y)

  g = oracle_grad(params, batch_stats, x, y)
  g_adv = oracle_grad(optax.tree.add_scale(params, rho / optax.tree.norm(g), g),
                      batch_stats, x, y)
  chex.assert_trees_all_close(new_state.params, optax.tree.add_scale(params, -lr, g_adv),
                     rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("train", "num_iters"))
def dense_power_iteration(params, batch_stats, x, y, v0, train, num_iters):
  flat, unravel = ravel_pytree(params)
  hessian = jax.hessian(lambda w: oracle_loss(unravel(w), batch_stats, x, y, train=train))(flat)
  v = ravel_pytree(v0)[0]
  for _ in range(num_iters):
    v = hessian @ v
    v = v / jnp.linalg.norm(v)
  return v


def test_top_eigenvalue_is_of_training_mode_hessian(setup):
  params, batch_stats, x, y = setup
  train_top = dense_hessian_eigenvalues(params, batch_stats, x, y, train=True)[-1]
  eval_top = dense_hessian_eigenvalues(params, batch_stats, x, y, train=False)[-1]
  assert abs(train_top - eval_top) > 0.05 * abs(train_top)

  v0 = jax.tree.map(jnp.ones_like, params)
  measured = jax.jit(loop.make_top_eigenvalue_fn(MODEL, num_iters=8))(
      params, batch_stats, x, y, v0)
  np.testing.assert_allclose(measured, train_top, rtol=1e-3)


def test_xsam_refresh_hvps_are_of_training_mode_hessian(setup):
  params, batch_stats, x, y = setup
  num_iters = 3
  tx = optimizers.make_optimizer("xsam", learning_rate=0.1, method="power", num_iters=num_iters).tx
  state = init(tx, params, batch_stats)
  step = jax.jit(loop.make_train_step(MODEL, tx), static_argnames="refresh")
  new_state, _ = step(state, x, y, refresh=True)

  # The refresh is `num_iters` power steps from the stored start vector, at
  # the pre-step parameters, on the step's mini-batch.
  start = optax.tree.get(state.opt_state, "eigenvector")
  got = ravel_pytree(optax.tree.get(new_state.opt_state, "eigenvector"))[0]
  cosine = lambda train: abs(float(got @ dense_power_iteration(
      params, batch_stats, x, y, start, train=train, num_iters=num_iters)))
  assert cosine(train=True) > 1 - 1e-4
  assert cosine(train=False) < 1 - 1e-2


@functools.partial(jax.jit, static_argnames=("train", "num_iters"))
def dense_gauss_newton_power_iteration(params, batch_stats, x, y, v0, train, num_iters):
  """Oracle: power iteration on J^T H_z J of the logits, built densely."""
  flat, unravel = ravel_pytree(params)

  def logits(w):
    variables = {"params": unravel(w), "batch_stats": batch_stats}
    if train:
      return MODEL.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    return MODEL.apply(variables, x, train=False)

  z = logits(flat)
  jac = jax.jacobian(lambda w: logits(w).ravel())(flat)
  ce = lambda u: optax.softmax_cross_entropy_with_integer_labels(
      u.reshape(z.shape), y).mean()
  gauss_newton = jac.T @ jax.hessian(ce)(z.ravel()) @ jac
  v = ravel_pytree(v0)[0]
  for _ in range(num_iters):
    v = gauss_newton @ v
    v = v / jnp.linalg.norm(v)
  return v


def test_gauss_newton_refresh_is_of_training_mode_logits(setup):
  """--curvature gauss-newton on a BatchNorm model: the refresh multiplies by
  the Gauss-Newton matrix of the training-mode logits (batch statistics)."""
  params, batch_stats, x, y = setup
  num_iters = 3
  tx = optimizers.make_optimizer("xsam", learning_rate=0.1, method="power",
                           num_iters=num_iters).tx
  state = init(tx, params, batch_stats)
  step = jax.jit(loop.make_train_step(MODEL, tx, curvature="gauss-newton"),
                 static_argnames="refresh")
  new_state, _ = step(state, x, y, refresh=True)

  start = optax.tree.get(state.opt_state, "eigenvector")
  got = ravel_pytree(optax.tree.get(new_state.opt_state, "eigenvector"))[0]
  cosine = lambda train: abs(float(got @ dense_gauss_newton_power_iteration(
      params, batch_stats, x, y, start, train=train, num_iters=num_iters)))
  assert cosine(train=True) > 1 - 1e-4
  assert cosine(train=False) < 1 - 1e-2


def load_nnx_example():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).parents[1] / "examples" / "nnx_training.py"
  spec = importlib.util.spec_from_file_location("nnx_training", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_nnx_example_updates_running_stats_once_from_clean_pass(setup):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  example = load_nnx_example()
  _, _, x, y = setup
  model = example.CNN((5,), 1, NUM_CLASSES, rngs=nnx.Rngs(0), features=(2,))
  tx = optimizers.make_optimizer("xsam", learning_rate=0.1, rho=0.5, update_every=1, num_iters=2).tx
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  oracle = nnx.clone(model)
  oracle(x)  # One plain training-mode forward pass.
  expected = nnx.state(oracle, nnx.BatchStat)
  params_before = nnx.clone(nnx.state(model, nnx.Param))
  example.train_step(model, optimizer, x, y, refresh=True)
  chex.assert_trees_all_close(nnx.state(model, nnx.BatchStat), expected, rtol=1e-5, atol=1e-6)
  assert trees_differ(nnx.state(model, nnx.Param), params_before)
  assert float(optax.tree.get(optimizer.opt_state, "eigenvalue")) != 0.0
