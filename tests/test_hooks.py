"""The two hooks of a refresh: ``method`` (the estimator) and ``curvature_fn``.

``method`` accepts a name or any callable ``(matvec, v0) -> EigenResult``;
``curvature_fn(params, v)`` replaces the Hessian of ``grad_fn`` in the
refresh's products (``hessian_fn`` of a sub-batch gradient, Gauss-Newton).
Oracles: dense Hessians, the estimator run on a dense matvec, and the update
rule restated. Timings live in ``benchmarks/``.
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


def _sub_batch(batch, n):
  return jax.tree.map(lambda a: a[:n], batch)


def _norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def shifted_power(matvec, v0, *, shift=1.0, num_steps=3):
  """A user's estimator, written without the library's: power iteration on
  A + shift I, then the Rayleigh quotient and residual of A at the result."""
  v = jax.tree.map(lambda x: x / _norm(v0), v0)
  for _ in range(num_steps):
    w = jax.tree.map(lambda a, x: a + shift * x, matvec(v), v)
    v = jax.tree.map(lambda x: x / _norm(w), w)
  w = matvec(v)
  value = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(v),
                                             jax.tree.leaves(w)))
  residual = _norm(jax.tree.map(lambda a, x: a - value * x, w, v))
  return xsam_optax.EigenResult(value, v, residual, jnp.asarray(num_steps + 1))


TRACKERS = {
    "eigenvector_correction": lambda **kw: xsam_optax.eigenvector_correction(
        0.3, **kw),
    "xsam": lambda **kw: xsam_optax.xsam(optax.sgd(0.1), rho=0.05, alpha=0.3,
                                         **kw),
    "eigen_sam_ascent": lambda **kw: optax.chain(
        xsam_optax.eigen_sam_ascent(0.05, 0.3, **kw), optax.sgd(0.1)),
}


# -------------------------------------------------------------------- method


@pytest.mark.parametrize("name", TRACKERS)
def test_user_estimator_drives_the_refresh(x64, name):
  """The stored eigenpair is the user's estimator applied to the Hessian (a
  dense matvec here) from the stored start vector; jitted, it compiles once."""
  chex.clear_trace_counter()  # counts per function body, across parameters
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  hessian = np.asarray(dense_hessian(lambda p: loss(p, batch), params))
  _, unravel = ravel_pytree(params)
  tx = TRACKERS[name](method=shifted_power)
  state = tx.init(params)
  start = optax.tree.get(state, "eigenvector")
  step = jax.jit(chex.assert_max_traces(
      lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn), n=1))
  updates, state = step(params, state)

  want = shifted_power(lambda v: unravel(hessian @ flat(v)), start)
  np.testing.assert_allclose(flat(optax.tree.get(state, "eigenvector")),
                             flat(want.eigenvector), rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(optax.tree.get(state, "eigenvalue"),
                             want.eigenvalue, rtol=1e-10)
  np.testing.assert_allclose(optax.tree.get(state, "residual"),
                             want.residual, rtol=1e-8)
  if name == "eigenvector_correction":
    np.testing.assert_allclose(
        flat(updates), oracle_correct(grad_fn(params), want.eigenvector, 0.3),
        rtol=1e-10, atol=1e-13)
  step(params, state)  # a kept step (update_every=5): no retrace


@pytest.mark.parametrize("method, estimator", [
    ("power", xsam_optax.power_iteration), ("lanczos", xsam_optax.lanczos)])
def test_method_names_are_shorthands_for_the_bound_estimators(x64, method,
                                                              estimator):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  runs = []
  for m in (method, functools.partial(estimator, num_iters=4)):
    named = {"num_iters": 4} if isinstance(m, str) else {}
    tx = xsam_optax.xsam(optax.sgd(0.1), update_every=2, method=m, **named)
    step = jax.jit(lambda p, s, tx=tx: tx.update(grad_fn(p), s, p,
                                                 grad_fn=grad_fn))
    p, state = params, tx.init(params)
    for _ in range(3):  # refresh, kept step, warm-started refresh
      updates, state = step(p, state)
      p = optax.apply_updates(p, updates)
    runs.append((p, state))
  # The named form starts from the stored (unit) eigenvector without
  # normalising it again, which saves a reduction per leaf: the same
  # arithmetic up to float64 rounding.
  chex.assert_trees_all_close(*runs, rtol=1e-12, atol=1e-15)


FAILURES = {  # what a user's estimator can return that the docs reject
    "NaN residual": lambda r: r._replace(residual=jnp.asarray(jnp.nan)),
    "NaN eigenvalue": lambda r: r._replace(eigenvalue=jnp.asarray(jnp.nan)),
    "inf eigenvalue": lambda r: r._replace(eigenvalue=jnp.asarray(jnp.inf)),
    "zero vector": lambda r: r._replace(
        eigenvector=jax.tree.map(jnp.zeros_like, r.eigenvector)),
    "NaN in the vector": lambda r: r._replace(
        eigenvector=jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan),
                                 r.eigenvector)),
}


@pytest.mark.parametrize("failure", list(FAILURES) + [None])
def test_failed_user_estimate_keeps_the_previous_eigenvector(x64, failure):
  # Documented: a non-finite eigenvalue or residual, or a zero or
  # non-finite vector, keeps the previous eigenvector and eigenvalue, and
  # the residual says "unknown". The control (None) is stored.
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))

  def estimator(matvec, v0):
    result = shifted_power(matvec, v0)
    return FAILURES[failure](result) if failure else result

  tx = xsam_optax.eigenvector_correction(0.3, update_every=1,
                                         method=estimator)
  state = tx.init(params)
  _, new = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  if failure is None:
    want = shifted_power(
        lambda v: xsam_optax.hvp(grad_fn, params, v), state.eigenvector)
    np.testing.assert_allclose(flat(new.eigenvector),
                               flat(want.eigenvector), rtol=1e-12)
    assert float(new.eigenvalue) == float(want.eigenvalue) != 0.0
    assert float(new.residual) == float(want.residual) >= 0.0
    return
  chex.assert_trees_all_equal(new.eigenvector, state.eigenvector)
  assert float(new.residual) == -1.0  # unknown
  assert float(new.eigenvalue) == float(state.eigenvalue)


def test_user_estimate_is_stored_in_the_parameters_dtypes():
  """An estimator may compute in float32 for bf16 parameters: the stored
  eigenvector keeps the parameters' dtype, so the state types stay fixed
  (both branches of the schedule's lax.cond must agree)."""
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  grad_fn = jax.grad(lambda p: loss(p, batch).astype(jnp.float32))

  def in_float32(matvec, v0):
    up = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    down = lambda t: jax.tree.map(lambda x, p: x.astype(p.dtype), t, v0)
    return shifted_power(lambda v: up(matvec(down(v))), up(v0))

  tx = xsam_optax.eigenvector_correction(0.3, method=in_float32)
  state = tx.init(params16)
  _, new = jax.jit(lambda s: tx.update(grad_fn(params16), s, params16,
                                       grad_fn=grad_fn))(state)
  chex.assert_trees_all_equal_dtypes(new.eigenvector, params16)
  assert float(new.eigenvalue) != 0.0


def test_estimator_returning_several_pairs_is_named():
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.eigenvector_correction(
      method=functools.partial(xsam_optax.lanczos, num_iters=4, k=2))
  with pytest.raises(ValueError, match="method must return one eigenpair"):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)


# -------------------------------------------------------------- curvature_fn


@pytest.mark.parametrize("refresh", [None, True])
def test_sub_batch_hessian_drives_the_refresh_and_only_the_refresh(x64,
                                                                   refresh):
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
      grad_fn(p), s, p, grad_fn=grad_fn,
      curvature_fn=xsam_optax.hessian_fn(sub_grad_fn), **extra))
  updates, state = step(params, state)

  g = grad_fn(params)
  g_adv = grad_fn(jax.tree.map(lambda p, x: p + rho * x / _norm(g), params, g))
  h_sub = dense_hessian(lambda p: loss(p, _sub_batch(batch, 8)), params)
  v = flat(v0)
  for _ in range(iters):
    v = h_sub @ v
    v = v / jnp.linalg.norm(v)
  np.testing.assert_allclose(flat(optax.tree.get(state, "eigenvector")), v,
                             rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(flat(updates),
                             -lr * oracle_correct(g_adv, v, alpha),
                             rtol=1e-9, atol=1e-12)


def test_sub_batch_hessian_finds_the_top_eigenvector_of_its_own_hessian(x64):
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
                         grad_fn=grad_fn,
                         curvature_fn=xsam_optax.hessian_fn(jax.grad(sub_loss)))
    v = flat(state.eigenvector)
    assert abs(v @ vecs_sub[:, -1]) > 0.9999, type(state).__name__
    np.testing.assert_allclose(state.eigenvalue, vals_sub[-1], rtol=1e-6)


def test_hessian_fn_of_grad_fn_is_the_default(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.xsam(optax.sgd(0.1), update_every=2)
  plain = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  same = jax.jit(lambda p, s: tx.update(
      grad_fn(p), s, p, grad_fn=grad_fn,
      curvature_fn=xsam_optax.hessian_fn(grad_fn)))
  s_plain = s_same = tx.init(params)
  for _ in range(3):
    u_plain, s_plain = plain(params, s_plain)
    u_same, s_same = same(params, s_same)
    chex.assert_trees_all_equal(u_plain, u_same)
  chex.assert_trees_all_equal(s_plain, s_same)


def test_curvature_fn_is_unused_on_steps_without_refresh(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.eigenvector_correction()
  state = tx.init(params)
  broken = lambda p, v: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), v)
  _, new = tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                     curvature_fn=broken, refresh=False)
  chex.assert_trees_all_equal(new.eigenvector, state.eigenvector)


@pytest.mark.parametrize("name", ["eigenvector_correction", "eigen_sam_ascent"])
def test_removed_hvp_grad_fn_is_not_silently_ignored(name):
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = TRACKERS[name]()
  with pytest.raises(ValueError, match=r"hessian_fn\(g\) for hvp_grad_fn=g"):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn,
              hvp_grad_fn=grad_fn)
