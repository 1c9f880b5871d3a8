"""Numerical faults: zero gradients, NaN/inf gradients and HVPs, degenerate Hessians.

Every test states the documented behaviour and checks it against an independent
restatement (the update formula in NumPy, or a dense eigendecomposition).
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
from _oracles import flat, oracle_correct

METHODS = ("power", "lanczos")
CURVATURE = jnp.array([10.0, 1.0])


def quad_loss(p):
  """Hessian diag(20, 2, 12 b_i^2): top eigenpair (20, e_w0) at b = 1."""
  return jnp.sum(CURVATURE * p["w"] ** 2) + jnp.sum(p["b"] ** 4)


def make_params(w=(1.0, 2.0), b=1.0):
  return {"w": jnp.asarray(w, jnp.float32), "b": jnp.full((3,), b, jnp.float32)}


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def assert_unit(tree, atol=1e-5):
  np.testing.assert_allclose(np.linalg.norm(flat(tree)), 1.0, atol=atol)


def nan_like(tree, value=jnp.nan):
  return jax.tree.map(lambda x: jnp.full_like(x, value), tree)


@jax.custom_jvp
def _poison_tangent(x, poison):
  """Identity; its derivative is NaN when ``poison > 0`` (a NaN HVP only)."""
  del poison
  return x


@_poison_tangent.defjvp
def _poison_tangent_jvp(primals, tangents):
  (x, poison), (t, _) = primals, tangents
  return x, t * jnp.where(poison > 0, jnp.nan, 1.0)


@functools.lru_cache(maxsize=None)
def correction_step(method):
  """One jitted eigenvector_correction step on a loss with fault knobs.

  loss(p) = quad * quad_loss(p) + <lin, p>; the gradient (and so every HVP)
  is multiplied by ``scale``; ``poison_hvp > 0`` makes only the HVPs NaN.
  One compilation per method serves every test below.
  """
  tx = xsam_optax.eigenvector_correction(0.3, update_every=1, num_iters=4,
                                         method=method)

  @jax.jit
  def step(params, state, lin, quad, scale, poison_hvp):
    loss = lambda p: quad * quad_loss(p) + sum(
        jnp.vdot(a, x) for a, x in zip(jax.tree.leaves(lin),
                                       jax.tree.leaves(p)))

    def grad_fn(p):
      return jax.tree.map(lambda g: _poison_tangent(g * scale, poison_hvp),
                          jax.grad(loss)(p))

    g = grad_fn(params)
    updates, state = tx.update(g, state, params, grad_fn=grad_fn)
    return g, updates, state

  return tx, step


def run_correction(method, params, state=None, *, lin=None, quad=1.0,
                   scale=1.0, poison_hvp=0.0):
  tx, step = correction_step(method)
  state = tx.init(params) if state is None else state
  lin = nan_like(params, 0.0) if lin is None else lin
  return step(params, state, lin, jnp.float32(quad), jnp.float32(scale),
              jnp.float32(poison_hvp))


# ----------------------------------------------------------------- zero gradient


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradient_correction_gives_no_nan_anywhere(method):
  # At the minimum of a quadratic g = 0, but the Hessian diag(20, 2, 0, 0, 0)
  # is not: the refresh still finds its top eigenpair.
  params = make_params(w=(0.0, 0.0), b=0.0)
  g, updates, state = run_correction(method, params)
  np.testing.assert_array_equal(flat(g), 0.0)
  chex.assert_tree_all_finite((updates, state))
  np.testing.assert_array_equal(flat(updates), 0.0)
  assert float(state.cos_angle) == 0.0
  assert_unit(state.eigenvector)
  np.testing.assert_allclose(float(state.eigenvalue), 20.0, rtol=1e-5)
  np.testing.assert_allclose(abs(float(state.eigenvector["w"][0])), 1.0,
                             atol=1e-5)


def test_zero_gradient_xsam_gives_no_nan_anywhere():
  params = {"w": jnp.zeros(2), "b": jnp.zeros(3)}
  grad_fn = jax.grad(quad_loss)
  tx = xsam_optax.xsam(optax.sgd(0.1, momentum=0.9), rho=0.05, alpha=0.5,
                       update_every=2)
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  state = tx.init(params)
  for _ in range(3):  # a refresh, a kept step, a refresh
    updates, state = step(params, state)
    chex.assert_tree_all_finite((updates, state))
    np.testing.assert_array_equal(flat(updates), 0.0)
    params = optax.apply_updates(params, updates)
  assert float(state[1].cos_angle) == 0.0
  assert_unit(state[1].eigenvector)


@pytest.mark.parametrize("make", [
    lambda: xsam_optax.sam_ascent(0.05),
    lambda: xsam_optax.sam(optax.sgd(0.1), rho=0.05),
])
def test_zero_gradient_sam_ascent_evaluates_at_params(make):
  # eps = rho g / ||g|| is guarded: g = 0 gives eps = 0, i.e. grad_fn(params).
  params = make_params(w=(0.0, 0.0), b=0.0)
  seen = []
  grad_fn = lambda p: (seen.append(p), jax.grad(quad_loss)(p))[1]
  tx = make()
  updates, state = tx.update(nan_like(params, 0.0), tx.init(params), params,
                             grad_fn=grad_fn)
  chex.assert_tree_all_finite((updates, state))
  chex.assert_trees_all_equal(seen[-1], params)


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradient_and_zero_hessian_give_no_nan(method):
  # A constant loss: nothing to estimate and nothing to correct.
  params = make_params()
  _, updates, state = run_correction(method, params, quad=0.0)
  chex.assert_tree_all_finite((updates, state))
  np.testing.assert_array_equal(flat(updates), 0.0)
  assert_unit(state.eigenvector)
  assert float(state.eigenvalue) == 0.0


# ------------------------------------------------------ NaN / inf in g or in Hv


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_gradient_keeps_previous_eigenvector(method):
  params = make_params()
  _, _, state = run_correction(method, params)
  assert float(state.eigenvalue) > 15.0  # a real estimate to protect
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    # A poisoned batch: the gradient and every HVP through it are non-finite.
    g, updates, new_state = run_correction(method, params, state, scale=bad)
    assert not all_finite(g)
    # The stored estimate is the previous one, bit for bit, and unit-norm.
    chex.assert_trees_all_equal(new_state.eigenvector, state.eigenvector)
    assert_unit(new_state.eigenvector)
    assert float(new_state.eigenvalue) == float(state.eigenvalue)
    assert float(new_state.residual) == -1.0  # "unknown"
    # Documented: a non-finite gradient normalises to zero, never to NaN.
    chex.assert_tree_all_finite((new_state.eigenvector, new_state.eigenvalue,
                                 new_state.cos_angle))
    np.testing.assert_array_equal(flat(updates), 0.0)
    assert int(new_state.count) == int(state.count) + 1


@pytest.mark.parametrize("method", METHODS)
def test_nan_hvp_keeps_previous_eigenvector_and_corrects_with_it(method):
  _, _, state = run_correction(method, make_params())
  params = make_params(w=(0.5, -1.0), b=0.7)
  # A finite gradient whose Hessian-vector products are NaN.
  g, updates, new_state = run_correction(method, params, state,
                                         poison_hvp=1.0)
  chex.assert_tree_all_finite(g)
  chex.assert_trees_all_equal(new_state.eigenvector, state.eigenvector)
  assert float(new_state.eigenvalue) == float(state.eigenvalue)
  assert float(new_state.residual) == -1.0
  np.testing.assert_allclose(
      flat(updates), oracle_correct(g, state.eigenvector, 0.3), rtol=1e-5,
      atol=1e-6)
  assert np.isfinite(float(new_state.cos_angle))


def test_poisoned_tangent_really_poisons_the_hvp():
  # Guards the two tests above: the knob makes the HVP, not the gradient, NaN.
  params = make_params()
  grad_fn = lambda p: jax.tree.map(lambda g: _poison_tangent(g, 1.0),
                                   jax.grad(quad_loss)(p))
  chex.assert_tree_all_finite(grad_fn(params))
  assert not all_finite(xsam_optax.hvp(grad_fn, params, params))


def test_nan_at_perturbed_point_never_reaches_params():
  # g is finite at params, but the loss is undefined at params + eps. X-SAM's
  # normalisation turns the non-finite g_adv into a zero direction, so the
  # base optimizer sees zeros, never NaN (apply_if_finite, which inspects the
  # incoming gradient, could not catch this case).
  loss = lambda p: -jnp.sum(jnp.sqrt(1.0 - p["w"])) + jnp.sum(p["b"] ** 2)
  params = {"w": jnp.array([0.999, 0.0]), "b": jnp.ones(3)}
  grad_fn = jax.grad(loss)
  chex.assert_tree_all_finite(grad_fn(params))
  eps = 0.5 * flat(grad_fn(params)) / np.linalg.norm(flat(grad_fn(params)))
  assert not all_finite(grad_fn(
      jax.tree.map(jnp.add, params, ravel_pytree(params)[1](eps))))
  tx = xsam_optax.xsam(optax.sgd(0.1), rho=0.5, update_every=1)
  state = tx.init(params)
  updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
  chex.assert_tree_all_finite((updates, state))
  np.testing.assert_array_equal(flat(updates), 0.0)
  assert_unit(state[1].eigenvector)


def _skip_run(poison_at, num_steps, max_errors=3):
  """apply_if_finite(xsam) on a quadratic, poisoning the batches in poison_at."""
  tx = optax.apply_if_finite(
      xsam_optax.xsam(optax.sgd(0.05, momentum=0.9), rho=0.05, alpha=0.4,
                      update_every=2, num_iters=4),
      max_consecutive_errors=max_errors)

  @jax.jit
  def step(params, state, poison):
    grad_fn = lambda p: jax.tree.map(lambda g: g * poison,
                                     jax.grad(quad_loss)(p))
    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params = make_params()
  state = tx.init(params)
  for i in range(num_steps):
    params, state = step(params, state,
                         jnp.float32(jnp.nan if i in poison_at else 1.0))
  return params, state


def test_apply_if_finite_skips_nan_step_without_corrupting_state():
  # Steps 2 and 3 get NaN batches: the run must equal one that never saw them.
  params, state = _skip_run(poison_at=(2, 3), num_steps=7)
  ref_params, ref_state = _skip_run(poison_at=(), num_steps=5)
  assert int(state.total_notfinite) == 2
  assert int(state.notfinite_count) == 0 and bool(state.last_finite)
  chex.assert_trees_all_equal(params, ref_params)
  chex.assert_trees_all_equal(state.inner_state, ref_state.inner_state)
  chex.assert_tree_all_finite(state.inner_state)
  assert_unit(state.inner_state[1].eigenvector)


# ------------------------------------------------------- degenerate Hessians


@pytest.mark.parametrize("method", METHODS)
def test_zero_hessian_keeps_warm_start_with_eigenvalue_zero(method):
  # Linear model: H = 0, so every unit vector is an eigenvector with
  # eigenvalue 0. Documented: the warm start (the seeded random vector before
  # the first refresh) is kept, eigenvalue 0, residual 0, and the correction
  # acts along it.
  a = make_params(w=(3.0, -1.0), b=0.5)
  params = make_params()
  tx, _ = correction_step(method)
  state0 = tx.init(params)
  g, updates, state = run_correction(method, params, state0, lin=a, quad=0.0)
  chex.assert_trees_all_equal(g, a)
  chex.assert_tree_all_finite((updates, state))
  np.testing.assert_allclose(flat(state.eigenvector), flat(state0.eigenvector),
                             atol=1e-6)
  assert_unit(state.eigenvector)
  assert float(state.eigenvalue) == 0.0
  assert float(state.residual) == 0.0
  np.testing.assert_allclose(
      flat(updates), oracle_correct(a, state.eigenvector, 0.3), rtol=1e-5,
      atol=1e-6)


def test_negative_dominant_eigenvalue_power_vs_lanczos():
  # H has eigenvalues (-6, 2, 1, 0.5, 0.25) in a rotated basis: the largest in
  # magnitude is negative. Power iteration returns it (documented); Lanczos
  # returns the algebraically largest. Oracle: dense eigh in float64.
  with jax.enable_x64(True):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    eigs = np.array([-6.0, 2.0, 1.0, 0.5, 0.25])
    h = jnp.asarray(q @ np.diag(eigs) @ q.T)
    loss = lambda p: 0.5 * p["x"] @ h @ p["x"] + jnp.sum(p["x"])
    grad_fn = jax.grad(loss)
    params = {"x": jnp.asarray(np.linspace(-1.0, 1.0, 5))}
    values, vectors = np.linalg.eigh(np.asarray(h))
    g = grad_fn(params)
    for method, iters, want in (("power", 25, 0), ("lanczos", 5, 4)):
      tx = xsam_optax.eigenvector_correction(0.2, update_every=1,
                                             num_iters=iters, method=method)
      updates, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
      chex.assert_tree_all_finite((updates, state))
      np.testing.assert_allclose(float(state.eigenvalue), values[want],
                                 rtol=1e-8)
      v = flat(state.eigenvector)
      np.testing.assert_allclose(abs(v @ vectors[:, want]), 1.0, atol=1e-8)
      np.testing.assert_allclose(
          flat(updates), oracle_correct(g, state.eigenvector, 0.2), atol=1e-12)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_gradient_without_normalisation_gives_zeros(bad):
  # normalize=False multiplies the unit direction back by ||g||: a non-finite
  # norm must give a zero update, not 0 * inf = NaN.
  params = make_params()
  tx = xsam_optax.eigenvector_correction(0.3, normalize=False)
  state = tx.init(params)
  updates, new_state = tx.update(nan_like(params, bad), state, params,
                                 grad_fn=jax.grad(quad_loss), refresh=False)
  chex.assert_tree_all_finite((updates, new_state.cos_angle))
  np.testing.assert_array_equal(flat(updates), 0.0)
  # The control: a finite gradient keeps its length.
  g = jax.grad(quad_loss)(params)
  updates, _ = tx.update(g, state, params, grad_fn=jax.grad(quad_loss),
                         refresh=False)
  np.testing.assert_allclose(
      flat(updates), oracle_correct(g, state.eigenvector, 0.3,
                                    normalize=False), rtol=1e-5, atol=1e-6)


# ------------------------------------------ any finite scale of the gradient


def _tanh_problem(dtype):
  """A small tanh regression in ``dtype``: ``(params, loss)``."""
  rng = np.random.default_rng(0)
  cast = lambda a: jnp.asarray(a, dtype)
  params = {"w": cast(rng.normal(size=(3, 4))), "v": cast(rng.normal(size=4))}
  x, y = cast(rng.normal(size=(8, 3))), cast(rng.normal(size=8))
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)
  return params, loss


SCALED = {
    "sam_ascent": lambda: xsam_optax.sam_ascent(0.05),
    "xsam, power": lambda: optax.chain(
        xsam_optax.sam_ascent(0.05),
        xsam_optax.eigenvector_correction(0.3, update_every=1, num_iters=2)),
    "xsam, lanczos": lambda: optax.chain(
        xsam_optax.sam_ascent(0.05),
        xsam_optax.eigenvector_correction(0.3, update_every=1, num_iters=3,
                                          method="lanczos")),
    "eigen_sam_ascent, lanczos": lambda: xsam_optax.eigen_sam_ascent(
        0.05, 0.3, update_every=1, num_iters=3, method="lanczos"),
}


@functools.lru_cache(maxsize=None)
def scaled_steps(dtype):
  """One jitted program: each transform's first update, with ``grad_fn``
  (and so every curvature product) multiplied by ``scale``."""
  params, loss = _tanh_problem(dtype)
  txs = {name: make() for name, make in SCALED.items()}

  @jax.jit
  def run(scale):
    grad_fn = lambda p: jax.tree.map(
        lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype),
        jax.grad(loss)(p))
    out = {}
    for name, tx in txs.items():
      updates, state = tx.update(grad_fn(params), tx.init(params), params,
                                 grad_fn=grad_fn)
      out[name] = (updates, optax.tree.get(state, "eigenvalue"),
                   optax.tree.get(state, "residual"))
    return out

  return run


@pytest.mark.parametrize("dtype, scales", [
    (jnp.float32, (1e20, 1e-20, 1e30, 1e-30)),
    (jnp.bfloat16, (1e20, 1e-20, 1e30, 1e-30)),
    (jnp.float16, (1e3, 1e-3)),  # what float16 can hold
])
def test_updates_are_the_same_at_any_scale_of_the_gradient(dtype, scales):
  # Unscaled, float32 squares of a gradient of norm 1e20 overflow and those
  # of 1e-20 flush to zero: the unit directions were zeros. Now SAM's
  # gradient scales with the loss, X-SAM's direction does not, and the
  # eigenvalue and residual scale with it; all within the dtype's rounding
  # (the scaled gradient is rounded to the dtype first).
  run = scaled_steps(dtype)
  want = run(jnp.float32(1.0))
  eps = float(jnp.finfo(dtype).eps)
  for scale in scales:
    got = run(jnp.float32(scale))
    for name in SCALED:
      updates, eigenvalue, residual = got[name]
      want_updates, want_eigenvalue, want_residual = want[name]
      # The ascents give a gradient, X-SAM a direction.
      divide = 1.0 if name.startswith("xsam") else scale
      np.testing.assert_allclose(
          flat(updates) / divide, flat(want_updates), rtol=2 * eps,
          atol=2 * eps * np.abs(flat(want_updates)).max(),
          err_msg=f"{name} at scale {scale}")
      if eigenvalue is None:
        continue
      tolerance = 1e-5 if dtype == jnp.float32 else 0.05
      np.testing.assert_allclose(float(eigenvalue) / scale,
                                 float(want_eigenvalue), rtol=tolerance,
                                 err_msg=f"{name} at scale {scale}")
      np.testing.assert_allclose(float(residual) / scale,
                                 float(want_residual), rtol=tolerance,
                                 atol=tolerance * abs(float(want_eigenvalue)),
                                 err_msg=f"{name} at scale {scale}")


# --------------------------------- jax_debug_infs / jax_debug_nans from init


DEBUGGED = {
    "sam": lambda: xsam_optax.sam(optax.sgd(0.1)),
    "xsam, power": lambda: xsam_optax.xsam(optax.sgd(0.1), num_iters=2),
    "xsam, lanczos": lambda: xsam_optax.xsam(optax.sgd(0.1), num_iters=2,
                                             method="lanczos"),
    "eigen_sam_ascent, power": lambda: optax.chain(
        xsam_optax.eigen_sam_ascent(update_every=2, num_iters=2),
        optax.sgd(0.1)),
    "eigen_sam_ascent, lanczos": lambda: optax.chain(
        xsam_optax.eigen_sam_ascent(update_every=2, num_iters=2,
                                    method="lanczos"), optax.sgd(0.1)),
}
@pytest.mark.parametrize("name", list(DEBUGGED))
def test_debug_infs_and_nans_stay_quiet_on_a_healthy_run_from_init(name):
  # A healthy run never makes an inf or NaN, not even one a jnp.where
  # discards: the "unknown" residual is -1, not inf. Jitted, JAX checks the
  # step's outputs; op by op (jax.disable_jit, as debug_nans reruns a step
  # to find the first bad value) it checks every primitive's. Both modes
  # at once; two steps: the first refreshes, the second does not.
  params, loss = _tanh_problem(jnp.float32)
  grad_fn = jax.grad(loss)
  tx = DEBUGGED[name]()

  def step(params, state, scale):
    scaled = lambda p: jax.tree.map(lambda g: g * scale, grad_fn(p))
    updates, state = tx.update(scaled(params), state, params,
                               grad_fn=scaled)
    return optax.apply_updates(params, updates), state

  with jax.debug_infs(True), jax.debug_nans(True):
    for op_by_op in (False, True):
      with jax.disable_jit(op_by_op):
        p, state = params, tx.init(params)
        for _ in range(2):
          p, state = (step if op_by_op else jax.jit(step))(p, state, 1.0)
        chex.assert_tree_all_finite((p, state))
        assert not np.allclose(flat(p), flat(params))  # it trained
    # The control: both modes are on and see inside the step. Op by op, a
    # bad gradient is reported where it is made, though the step's outputs
    # stay finite (the transforms guard it).
    for bad, word in ((jnp.inf, "inf"), (jnp.nan, "nan")):
      with jax.disable_jit(), pytest.raises(FloatingPointError, match=word):
        step(p, state, bad)
