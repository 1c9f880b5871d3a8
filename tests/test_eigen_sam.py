import jax
import numpy as np
import optax

import xsam_optax
from _oracles import flat, mlp_problem


def test_eigen_sam_perturbation_equals_the_formula(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  rho, alpha = 0.3, 0.4
  tx = xsam_optax.eigen_sam_ascent(rho, alpha, num_iters=3)
  g = grad_fn(params)
  updates, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  v = flat(optax.tree.get(state, "eigenvector"))
  g_hat = flat(g) / np.linalg.norm(flat(g))
  c = g_hat @ v
  direction = g_hat + alpha * np.sign(c) * (v - c * g_hat)
  eps = rho * direction / np.linalg.norm(direction)
  _, unravel = jax.flatten_util.ravel_pytree(params)
  expected = grad_fn(unravel(flat(params) + eps))
  np.testing.assert_allclose(flat(updates), flat(expected), rtol=1e-12)
  np.testing.assert_allclose(state.cos_angle, c, rtol=1e-12)
  assert int(state.count) == 1


def test_eigen_sam_with_alpha_zero_is_sam(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  g = grad_fn(params)
  eigen = xsam_optax.eigen_sam_ascent(0.1, 0.0)
  sam = xsam_optax.sam_ascent(0.1)
  ours, _ = eigen.update(g, eigen.init(params), params, grad_fn=grad_fn)
  theirs, _ = sam.update(g, sam.init(params), params, grad_fn=grad_fn)
  np.testing.assert_allclose(flat(ours), flat(theirs), rtol=1e-12)


def test_eigen_sam_refreshes_on_its_own_schedule(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = optax.chain(xsam_optax.eigen_sam_ascent(update_every=3, num_iters=2),
                   optax.sgd(0.05))
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  values = []
  for _ in range(7):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    values.append(float(optax.tree.get(state, "eigenvalue")))
  changed = [i for i in range(7) if i == 0 or values[i] != values[i - 1]]
  assert changed == [0, 3, 6]
