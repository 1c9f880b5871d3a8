"""``finite_difference_fn``: one-gradient products against the dense Hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from _oracles import dense_hessian, flat, mlp_problem
from jax.flatten_util import ravel_pytree


def test_product_matches_dense_hessian_in_float64(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  h = np.asarray(dense_hessian(lambda p: loss(p, batch), params))
  _, unravel = ravel_pytree(params)
  fd = jax.jit(xsam_optax.finite_difference_fn(grad_fn, grad_fn(params)))
  recomputed = jax.jit(xsam_optax.finite_difference_fn(grad_fn))
  for seed in range(2):
    v = np.random.default_rng(seed).standard_normal(h.shape[0])
    v /= np.linalg.norm(v)
    expected = h @ v
    tol = 1e-5 * np.linalg.norm(expected)
    assert np.linalg.norm(flat(fd(params, unravel(v))) - expected) < tol
    assert np.linalg.norm(flat(recomputed(params, unravel(v))) - expected) < tol


def test_refresh_with_finite_differences_finds_the_top_eigenvector(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  h = np.asarray(dense_hessian(lambda p: loss(p, batch), params))
  values, vectors = np.linalg.eigh(h)
  tx = xsam_optax.eigenvector_correction(method="lanczos", num_iters=12)
  grads = grad_fn(params)
  _, state = jax.jit(lambda s: tx.update(
      grads, s, params, grad_fn=grad_fn,
      curvature_fn=xsam_optax.finite_difference_fn(grad_fn, grads)))(
          tx.init(params))
  v = flat(optax.tree.get(state, "eigenvector"))
  assert abs(float(v @ vectors[:, -1])) > 1 - 1e-6
  np.testing.assert_allclose(float(optax.tree.get(state, "eigenvalue")),
                             values[-1], rtol=1e-5)


def test_bfloat16_parameters_give_bfloat16_products():
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2))
  out = xsam_optax.finite_difference_fn(grad_fn)(params, params)
  assert out["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kwargs, message", [
    (dict(grad_fn="g"), "grad_fn must be callable"),
    (dict(grad_fn=lambda p: p, scale=0.0), "scale must be > 0"),
    (dict(grad_fn=lambda p: p, scale=-1.0), "scale must be"),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    xsam_optax.finite_difference_fn(**kwargs)
