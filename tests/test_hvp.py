import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsam_optax
from _oracles import conv_problem, dense_hessian, flat, mlp_problem


@pytest.mark.parametrize("problem", [mlp_problem, conv_problem])
def test_hvp_equals_dense_hessian_times_vector(x64, problem):
  params, loss, batch = problem()
  objective = lambda p: loss(p, batch)
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape,
                                               x.dtype), params)
  hessian = dense_hessian(objective, params)
  got = xsam_optax.hvp(jax.grad(objective), params, v)
  np.testing.assert_allclose(flat(got), hessian @ flat(v), rtol=1e-10,
                             atol=1e-12)


@pytest.mark.parametrize("problem", [mlp_problem, conv_problem])
def test_hvp_agrees_with_central_differences(x64, problem):
  params, loss, batch = problem(seed=3)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  v = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape,
                                               x.dtype), params)
  h = 1e-5
  plus = grad_fn(jax.tree.map(lambda p, d: p + h * d, params, v))
  minus = grad_fn(jax.tree.map(lambda p, d: p - h * d, params, v))
  finite_difference = (flat(plus) - flat(minus)) / (2 * h)
  got = flat(xsam_optax.hvp(grad_fn, params, v))
  np.testing.assert_allclose(got, finite_difference, rtol=1e-6, atol=1e-8)


def test_hvp_keeps_structure_and_dtypes():
  params = {"a": jnp.ones((2, 3), jnp.float32),
            "b": [jnp.ones((4,), jnp.bfloat16)]}
  loss = lambda p: (jnp.sum(p["a"] ** 3)
                    + jnp.sum(p["b"][0].astype(jnp.float32) ** 4))
  out = xsam_optax.hvp(jax.grad(loss), params, params)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(
      lambda x: x.dtype, params)
  np.testing.assert_allclose(out["a"], 6.0)
  np.testing.assert_allclose(out["b"][0].astype(jnp.float32), 12.0)
