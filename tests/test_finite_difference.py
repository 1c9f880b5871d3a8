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
    tol = 1e-4 * np.linalg.norm(expected)
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


def _guarded_refreshes(losses, max_growth):
  """States after one refresh per loss, each with finite-difference products."""
  tx = xsam_optax.eigenvector_correction(update_every=1, seed=3)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  state = tx.init(params)
  states = []
  for loss in losses:
    grad_fn = jax.grad(loss)
    fd = xsam_optax.finite_difference_fn(grad_fn, max_growth=max_growth)
    _, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                         curvature_fn=fd)
    states.append(state)
  return params, states


_CURVATURE = jnp.array([3.0, 2.0, 1.0])


def _quadratic(factor):
  return lambda p: 0.5 * factor * jnp.sum(_CURVATURE * p["w"] ** 2)


def test_guard_rejects_a_product_that_outgrew_the_last_accepted_one(x64):
  # Plain restatement (float64, where a quadratic's difference is exact to
  # ~1e-4 at the default step; float32 rounds the shift itself), so a refresh of
  # H' = f H from the stored v has length f ||H v||: accepted iff
  # f ||H v|| <= 2 ||H u|| of the last accepted refresh from u.
  _, (first, grown, doubled) = _guarded_refreshes(
      [_quadratic(1.0), _quadratic(1.5), _quadratic(1.5 * 2.5)], 2.0)
  length = lambda s: float(jnp.hypot(s.eigenvalue, s.residual))
  u = flat(first.eigenvector)
  # 1.5 ||H u|| after one power step from the first vector: accepted.
  assert float(grown.residual) >= 0
  assert not np.allclose(flat(grown.eigenvector), u)
  # Then 2.5x as long again: rejected, the previous vector and eigenvalue
  # kept, and the residual marked unknown.
  np.testing.assert_allclose(flat(doubled.eigenvector),
                             flat(grown.eigenvector))
  assert float(doubled.eigenvalue) == float(grown.eigenvalue)
  assert float(doubled.residual) < 0
  hv = lambda s, factor: np.linalg.norm(factor * np.asarray(_CURVATURE)
                                        * flat(s.eigenvector))
  assert hv(grown, 1.5 * 2.5) > 2 * length(grown)
  np.testing.assert_allclose(length(grown), hv(first, 1.5), rtol=1e-4)


def test_guard_catches_a_kink_and_never_locks_the_vector():
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  # A ReLU kink exactly at the parameters: the gradient jumps by 10 (times a
  # unit direction) within any step along a direction with a positive
  # component on it, and the difference divided by a tiny step is enormous.
  kink = jnp.array([-0.6, 0.0, -0.8])
  kinked = lambda p: _quadratic(1.0)(p) + 10.0 * jax.nn.relu(
      jnp.dot(kink, p["w"] - params["w"]))
  _, guarded = _guarded_refreshes([_quadratic(1.0)] * 2 + [kinked] * 2, 2.0)
  _, unguarded = _guarded_refreshes([_quadratic(1.0)] * 2 + [kinked], None)
  before = flat(guarded[1].eigenvector)
  assert float(jnp.dot(kink, before)) > 0  # the step crosses the kink
  # Unguarded, the crossing drags the vector towards the jump's direction.
  crossed = flat(unguarded[2].eigenvector)
  assert abs(crossed @ np.asarray(kink)) > 0.99
  # Guarded, the crossing is rejected ...
  np.testing.assert_allclose(flat(guarded[2].eigenvector), before)
  assert float(guarded[2].residual) < 0
  # ... once: the next refresh is accepted whatever its length.
  np.testing.assert_allclose(flat(guarded[3].eigenvector), crossed,
                             rtol=1e-5, atol=1e-6)


def test_hessian_products_are_never_guarded():
  # A tenfold rise of exact curvature between refreshes moves the vector.
  tx = xsam_optax.eigenvector_correction(update_every=1, seed=3)
  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  state = tx.init(params)
  for factor in (1.0, 10.0):
    grad_fn = jax.grad(_quadratic(factor))
    _, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  assert float(state.residual) >= 0


@pytest.mark.parametrize("max_growth", [1.0, 0.5, float("nan"), float("inf"),
                                        True, "2"])
def test_bad_max_growth_is_named(max_growth):
  with pytest.raises(ValueError, match="max_growth must be"):
    xsam_optax.finite_difference_fn(lambda p: p, max_growth=max_growth)


def test_a_product_carries_its_guard():
  assert xsam_optax.finite_difference_fn(lambda p: p).max_growth == 2.0
  assert xsam_optax.finite_difference_fn(lambda p: p,
                                         max_growth=None).max_growth is None
