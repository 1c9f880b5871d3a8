"""``xsam(..., hessian_at="sam_point")``: refreshes multiply by the Hessian at
the SAM point, and one ``jax.jvp`` gives the SAM gradient with the product.

Oracles: the SAM point and the dense Hessian there computed in NumPy/JAX
without the library, power iteration restated on the dense matrix, X-SAM's
rule restated (``_oracles.oracle_correct``); and the same transform run with
a callable method (not fused) for the paths the oracle does not restate.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_optax
from _oracles import dense_hessian, flat, mlp_problem, oracle_correct

RHO, ALPHA, LR = 0.05, 0.3, 0.1


def _sam_point(params, g):
  """``params + rho g / ||g||`` on flat float64 vectors."""
  flat_params, unravel = ravel_pytree(params)
  flat_g = np.asarray(flat(g))
  return unravel(np.asarray(flat_params) + RHO * flat_g / np.linalg.norm(flat_g))


def _step(tx, grad_fn, **kwargs):
  return jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn,
                                        **kwargs))


def test_power_step_uses_the_hessian_at_the_sam_point(x64):
  """One step from the stored vector v0: v1 = H(p+eps) v0 / ||.||, its
  Rayleigh quotient, and SGD on the corrected SAM gradient."""
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                       hessian_at="sam_point")
  state = tx.init(params)
  v0 = flat(optax.tree.get(state, "eigenvector"))
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn), n=1))
  updates, state = step(params, state)

  point = _sam_point(params, grad_fn(params))
  hessian = np.asarray(dense_hessian(lambda p: loss(p, batch), point))
  hv = hessian @ v0
  v1 = hv / np.linalg.norm(hv)
  np.testing.assert_allclose(flat(optax.tree.get(state, "eigenvector")), v1,
                             rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(optax.tree.get(state, "eigenvalue"), v0 @ hv,
                             rtol=1e-10)
  g_adv = flat(grad_fn(point))
  np.testing.assert_allclose(flat(updates),
                             -LR * oracle_correct(g_adv, v1, ALPHA),
                             rtol=1e-10, atol=1e-13)
  # At theta the Hessian differs: the point is not a no-op here.
  at_params = np.asarray(dense_hessian(lambda p: loss(p, batch), params)) @ v0
  assert np.linalg.norm(at_params / np.linalg.norm(at_params) - v1) > 1e-6


@pytest.mark.parametrize("kwargs, estimator", [
    ({}, functools.partial(xsam_optax.power_iteration, num_iters=1)),
    ({"method": "lanczos", "num_iters": 3},
     functools.partial(xsam_optax.lanczos, num_iters=3)),
])
def test_fused_products_equal_separate_ones(x64, kwargs, estimator):
  """Named methods fuse the SAM gradient into the products; a callable method
  (same estimator) takes them separately: same steps, on every path."""
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  fused = xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                          hessian_at="sam_point", **kwargs)
  separate = xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                             hessian_at="sam_point", method=estimator)
  paths = [_step(fused, grad_fn), _step(fused, grad_fn, refresh=True),
           _step(separate, grad_fn)]
  states = [fused.init(params), fused.init(params), separate.init(params)]
  for _ in range(3):
    outs = [step(params, s) for step, s in zip(paths, states)]
    states = [s for _, s in outs]
    for updates, state in outs[1:]:
      chex.assert_trees_all_close(updates, outs[0][0], rtol=1e-12, atol=1e-15)
      chex.assert_trees_all_close(state, outs[0][1], rtol=1e-12, atol=1e-15)
    params = optax.apply_updates(params, outs[0][0])


def test_periodic_refresh_under_cond_is_at_the_sam_point_too(x64):
  """refresh=None with a period runs the products under lax.cond (not
  fused); they are the host-chosen refresh's, step for step."""
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA, update_every=2,
                       hessian_at="sam_point")
  in_graph, host = _step(tx, grad_fn), {
      r: _step(tx, grad_fn, refresh=r) for r in (True, False)}
  a = b = tx.init(params)
  for t in range(4):
    (ua, a), (ub, b) = in_graph(params, a), host[t % 2 == 0](params, b)
    chex.assert_trees_all_close(ua, ub, rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(a, b, rtol=1e-12, atol=1e-15)
    params = optax.apply_updates(params, ua)


def test_state_is_the_chains_and_sgd_gets_the_other_extras():
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  at_point = xsam_optax.xsam(optax.sgd(LR), hessian_at="sam_point")
  at_params = xsam_optax.xsam(optax.sgd(LR))
  state = at_point.init(params)
  assert (jax.tree.structure(state)
          == jax.tree.structure(at_params.init(params)))
  _, state = at_point.update(grad_fn(params), state, params, grad_fn=grad_fn)
  assert int(optax.tree.get(state, "count")) == 1
  assert np.isfinite(float(optax.tree.get(state, "cos_angle")))


def test_curvature_fn_gets_the_sam_point(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  seen = []

  def curvature_fn(p, v):
    seen.append(p)
    return xsam_optax.hvp(grad_fn, p, v)

  tx = xsam_optax.xsam(optax.sgd(LR), rho=RHO, hessian_at="sam_point")
  tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn,
            curvature_fn=curvature_fn)
  np.testing.assert_allclose(flat(seen[-1]),
                             flat(_sam_point(params, grad_fn(params))),
                             rtol=1e-12)


def test_non_finite_sam_point_gives_a_zero_step_when_fused():
  params = {"w": jnp.array([1.0, 2.0])}
  grad_fn = lambda p: {"w": jnp.where(p["w"] > 1.01, jnp.nan, 1.0) * p["w"]}
  tx = xsam_optax.xsam(optax.sgd(LR), rho=1.0, hessian_at="sam_point")
  updates, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params),
                         params, grad_fn=grad_fn)
  np.testing.assert_array_equal(updates["w"], 0.0)


def test_bad_hessian_at_is_named():
  with pytest.raises(ValueError, match="hessian_at must be one of"):
    xsam_optax.xsam(optax.sgd(0.1), hessian_at="theta")


def test_fused_step_traces_one_forward_pass_fewer():
  """The point of the option: the SAM gradient comes out of a product's
  jvp, so the traced update has one tanh layer evaluation fewer than with
  hessian_at="params" (gradient at the SAM point + product at theta)."""
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  g = grad_fn(params)

  def forward_passes(**kwargs):
    tx = xsam_optax.xsam(optax.sgd(LR), **kwargs)
    jaxpr = jax.make_jaxpr(
        lambda p, s: tx.update(g, s, p, grad_fn=grad_fn))(params,
                                                          tx.init(params))
    return str(jaxpr).count("tanh")

  assert forward_passes(hessian_at="sam_point") == forward_passes() - 1
