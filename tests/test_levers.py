"""Performance levers that change what a refresh computes: ``hvp_grad_fn``.

Timings live in ``benchmarks/``; these tests check only semantics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from conftest import dense_hessian, flat, mlp_problem


def _sub_batch(batch, n):
  return jax.tree.map(lambda a: a[:n], batch)


@pytest.mark.parametrize("refresh", [None, True])
def test_hvp_grad_fn_drives_the_refresh_and_only_the_refresh(x64, refresh):
  """Against a re-statement: SAM and the correction use the full batch's
  gradients, the eigenvector comes from power iteration on the sub-batch's
  Hessian."""
  params, loss, batch = mlp_problem(n=32)
  rho, alpha, lr, iters = 0.05, 0.5, 0.1, 5
  grad_fn = jax.grad(lambda p: loss(p, batch))
  sub_grad_fn = jax.grad(lambda p: loss(p, _sub_batch(batch, 8)))
  tx = xsam_optax.xsam(optax.sgd(lr), rho=rho, alpha=alpha, num_iters=iters,
                       method="power")
  state = tx.init(params)
  v0 = optax.tree.get(state, "eigenvector")

  extra = {} if refresh is None else {"refresh": refresh}
  step = jax.jit(lambda p, s: tx.update(
      grad_fn(p), s, p, grad_fn=grad_fn, hvp_grad_fn=sub_grad_fn, **extra))
  updates, state = step(params, state)

  g = grad_fn(params)
  g_norm = jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(g)))
  g_adv = grad_fn(jax.tree.map(lambda p, x: p + rho * x / g_norm, params, g))
  h_sub = dense_hessian(lambda p: loss(p, _sub_batch(batch, 8)), params)
  v = flat(v0)
  for _ in range(iters):
    v = h_sub @ v
    v = v / jnp.linalg.norm(v)
  g_hat = flat(g_adv) / jnp.linalg.norm(flat(g_adv))
  c = g_hat @ v
  expected = -lr * (g_hat - alpha * jnp.abs(c) * v)

  np.testing.assert_allclose(flat(optax.tree.get(state, "eigenvector")), v,
                             rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(flat(updates), expected, rtol=1e-9, atol=1e-12)


def test_hvp_grad_fn_finds_the_top_eigenvector_of_its_own_hessian(x64):
  """A sub-batch Hessian differs from the full batch's: the stored vector
  must be the former's top eigenvector (dense oracle), not the latter's."""
  params, loss, batch = mlp_problem(n=32)
  full_loss = lambda p: loss(p, batch)
  sub_loss = lambda p: loss(p, _sub_batch(batch, 4))
  h_full = np.asarray(dense_hessian(full_loss, params))
  h_sub = np.asarray(dense_hessian(sub_loss, params))
  top_full = np.linalg.eigh(h_full)[1][:, -1]
  vals_sub, vecs_sub = np.linalg.eigh(h_sub)
  assert abs(top_full @ vecs_sub[:, -1]) < 0.99  # The oracle can tell them apart.

  grad_fn = jax.grad(full_loss)
  for tx in (
      xsam_optax.eigenvector_correction(num_iters=20, method="lanczos"),
      xsam_optax.eigen_sam_ascent(num_iters=20, method="lanczos"),
  ):
    _, state = tx.update(grad_fn(params), tx.init(params), params,
                         grad_fn=grad_fn, hvp_grad_fn=jax.grad(sub_loss))
    v = np.asarray(flat(state.eigenvector))
    assert abs(v @ vecs_sub[:, -1]) > 0.9999, type(state).__name__
    np.testing.assert_allclose(state.eigenvalue, vals_sub[-1], rtol=1e-6)


def test_hvp_grad_fn_equal_to_grad_fn_changes_nothing(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.xsam(optax.sgd(0.1), update_every=2)
  plain = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  same = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn,
                                        hvp_grad_fn=grad_fn))
  s_plain = s_same = tx.init(params)
  for _ in range(3):
    u_plain, s_plain = plain(params, s_plain)
    u_same, s_same = same(params, s_same)
    np.testing.assert_array_equal(flat(u_plain), flat(u_same))
  np.testing.assert_array_equal(flat(optax.tree.get(s_plain, "eigenvector")),
                                flat(optax.tree.get(s_same, "eigenvector")))


def test_hvp_grad_fn_is_ignored_on_steps_without_refresh(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.eigenvector_correction()
  state = tx.init(params)
  broken = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
  _, new = tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                     hvp_grad_fn=broken, refresh=False)
  np.testing.assert_array_equal(flat(new.eigenvector), flat(state.eigenvector))


@pytest.mark.parametrize("bad, message", [
    ("not a function", "hvp_grad_fn must be callable"),
    (lambda p: {"other": p}, "hvp_grad_fn returned a pytree"),
])
def test_bad_hvp_grad_fn_is_named(bad, message):
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.eigenvector_correction()
  with pytest.raises(ValueError, match=message):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn,
              hvp_grad_fn=bad)
