"""Promises the docstrings make that a one-line slip would break silently.

Each test states one promise and checks it against an oracle that does not
use the code under test: call counts, the restated formula, the unrolled
loop and a NumPy Krylov projection, a float64 sum, Flax's own ``TrainState``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

import xsam_optax
from _oracles import Counted, flat, mlp_problem


# ------------------- finite_difference_fn with grads: one gradient a product


def test_finite_difference_with_grads_takes_one_gradient_and_uses_them(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  grads = grad_fn(params)
  norm = np.linalg.norm(flat(params))
  v = jax.tree.map(lambda x: x / norm, params)  # the estimators' unit vectors
  counted = Counted(grad_fn)
  product = xsam_optax.finite_difference_fn(counted, grads)(params, v)
  assert counted.calls == 1  # at params + h v only
  counted.calls = 0
  xsam_optax.finite_difference_fn(counted)(params, v)
  assert counted.calls == 2  # without grads, grad_fn(params) as well
  # The product differences against the given grads: shifting them by d
  # shifts the product by -d / h, h = 3e-4 sqrt(eps) max(1, ||params||)
  # (the documented default: 1e-7 of max(1, ||params||) in float32).
  h = 3e-4 * np.sqrt(np.finfo(np.float64).eps) * max(
      1.0, np.linalg.norm(flat(params)))
  shifted = jax.tree.map(lambda g: g + 1e-9, grads)
  moved = xsam_optax.finite_difference_fn(grad_fn, shifted)(params, v)
  np.testing.assert_allclose(flat(moved) - flat(product), -1e-9 / h,
                             rtol=1e-6)


# ----------------------------------------------- check_incoming's tolerance


LOSS = lambda p: jnp.sum(p["w"] ** 4) + jnp.sum(jnp.cos(3.0 * p["b"]))
PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.1, -0.3])}
TOLERANCE = float(np.sqrt(np.finfo(np.float32).eps))  # the documented one


@pytest.mark.parametrize("scale", [1e6, 1.0, 1e-6])
def test_check_incoming_tolerance_is_relative_to_the_gradient(scale):
  grad_fn = lambda p: jax.tree.map(lambda g: scale * g, jax.grad(LOSS)(p))
  g = grad_fn(PARAMS)
  tx = xsam_optax.sam_ascent(0.1)
  state = tx.init(PARAMS)
  check = lambda factor: tx.update(
      jax.tree.map(lambda x: x * np.float32(factor), g), state, PARAMS,
      grad_fn=grad_fn, check_incoming=True)
  check(1 + 0.5 * TOLERANCE)  # rounding-sized, whatever the scale: passes
  with pytest.raises(ValueError) as info:
    check(1 + 2 * TOLERANCE)  # twice the tolerance: reported
  assert ("(relative difference 0.000691, tolerance 0.00035)"
          in str(info.value)), str(info.value)


def test_check_incoming_tolerance_is_the_least_precise_leaf_dtypes():
  # A bfloat16 leaf beside a float32 one: the incoming gradient may differ
  # from grad_fn's by bfloat16 rounding (one ulp, 2^-7 relative, here most
  # of the norm), which the float32 tolerance (sqrt(2^-23) = 3.5e-4) would
  # reject; the documented tolerance is the widest dtype's, sqrt(2^-7).
  params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16),
            "b": jnp.array([0.5, 0.1], jnp.float32)}
  loss = lambda p: (jnp.sum(p["w"].astype(jnp.float32) ** 4)
                    + jnp.sum(jnp.cos(3.0 * p["b"])))
  grad_fn = jax.grad(loss)
  g = grad_fn(params)
  tx = xsam_optax.sam_ascent(0.1)
  state = tx.init(params)
  check = lambda factor: tx.update(
      {"w": (g["w"] * factor).astype(jnp.bfloat16), "b": g["b"]}, state,
      params, grad_fn=grad_fn, check_incoming=True)
  check(1 + 2.0 ** -7)  # one bfloat16 ulp of the leaf: rounding, passes
  with pytest.raises(ValueError, match=r"tolerance 0\.088\)"):
    check(1.25)  # beyond sqrt(2^-7) = 0.088 relative: reported


def test_check_incoming_under_a_mapped_axis_compares_with_the_mean_gradient():
  params, loss, batch = mlp_problem(n=16, dtype=jnp.float32)
  shards = jax.tree.map(lambda a: a.reshape((4, -1) + a.shape[1:]), batch)
  tx = xsam_optax.sam_ascent(0.1, batch_axis_name="batch")

  def replica(shard, averaged):
    grad_fn = jax.grad(lambda q: loss(q, shard))
    own = grad_fn(params)
    g = jax.lax.pmean(own, "batch") if averaged else own
    return tx.update(g, tx.init(params), params, grad_fn=grad_fn,
                     check_incoming=True)[0]

  mapped = lambda averaged: jax.jit(jax.vmap(
      lambda s: replica(s, averaged), axis_name="batch"))
  # The replicas' mean gradient is what the caller must pass: accepted.
  jax.block_until_ready(mapped(True)(shards))
  # Each replica's own gradient is not: reported.
  with pytest.raises(Exception, match="differ from grad_fn"):
    jax.block_until_ready(mapped(False)(shards))


# ---------------------- the rolled estimator loop runs as many products


def _operator():
  """A symmetric 6x6 matrix whose power and Lanczos iterates keep moving
  for several products (close top eigenvalues)."""
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  a = q @ np.diag([3.0, 2.8, 1.5, -1.0, 0.5, 0.2]) @ q.T
  v0 = rng.standard_normal(6)
  return a, v0


def _krylov_top(a, v0, m):
  """The top Ritz value of span(v0, ..., a^(m-1) v0): QR, then eigh."""
  basis = np.stack([np.linalg.matrix_power(a, i) @ v0 for i in range(m)], 1)
  q, _ = np.linalg.qr(basis)
  return np.linalg.eigvalsh(q.T @ a @ q)[-1]


@pytest.mark.parametrize("estimator", ["power", "lanczos"])
def test_rolled_loop_runs_as_many_products_as_the_unrolled_one(x64,
                                                               estimator):
  a, v0 = _operator()
  matvec = lambda v: {"x": jnp.asarray(a) @ v["x"]}
  start = {"x": jnp.asarray(v0)}
  fn = {"power": xsam_optax.power_iteration,
        "lanczos": xsam_optax.lanczos}[estimator]
  # Jitted: eagerly every operation of the loop would compile on its own.
  run = lambda m, unroll: jax.jit(
      lambda v: fn(matvec, v, num_iters=m, unroll=unroll))(start)
  m = 3
  rolled, unrolled = run(m, False), run(m, True)
  np.testing.assert_allclose(flat(rolled.eigenvector),
                             flat(unrolled.eigenvector), rtol=1e-10)
  np.testing.assert_allclose(float(rolled.eigenvalue),
                             float(unrolled.eigenvalue), rtol=1e-10)
  if estimator == "power":
    # Rayleigh quotient of the iterate after m - 1 products, eigenvector
    # one product further (the docstring's convention), restated.
    u = v0 / np.linalg.norm(v0)
    for _ in range(m - 1):
      u = a @ u / np.linalg.norm(a @ u)
    want_value, want_vector = u @ a @ u, a @ u / np.linalg.norm(a @ u)
    np.testing.assert_allclose(flat(rolled.eigenvector), want_vector,
                               rtol=1e-10)
    assert int(rolled.num_matvecs) == m
  else:
    want_value = _krylov_top(a, v0, m)
  np.testing.assert_allclose(float(rolled.eigenvalue), want_value, rtol=1e-10)
  # One product more or fewer shows in the value.
  for other in (m - 1, m + 1):
    assert abs(float(run(other, False).eigenvalue) - want_value) > 1e-3


# ------------------------------------------------- cos_angle keeps its sign


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", ["eigenvector_correction",
                                  "eigen_sam_ascent"])
def test_state_stores_the_signed_cosine_with_the_eigenvector(x64, name,
                                                            sign):
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 4))
  tx = {"eigenvector_correction": lambda: xsam_optax.eigenvector_correction(
            0.3),
        "eigen_sam_ascent": lambda: xsam_optax.eigen_sam_ascent(0.1, 0.3)}[
            name]()
  state = tx.init(params)
  v = flat(state.eigenvector)
  # Mostly along +v or -v, with a part orthogonal to it.
  other = np.array([1.0, 0.0, 0.0]) - v[0] * v
  g = sign * v + 0.5 * other
  _, new = tx.update({"w": jnp.asarray(g)}, state, params, grad_fn=grad_fn,
                     refresh=False)
  want = g @ v / np.linalg.norm(g)
  assert np.sign(want) == sign
  np.testing.assert_allclose(float(new.cos_angle), want, rtol=1e-12)


# ------------------------------ micro-batches are summed in at least float32


def test_accumulated_grad_fn_sums_bfloat16_gradients_in_float32():
  # Micro-batch gradients 256, 1, 1, ..., 1 (16 of them): in bfloat16,
  # 256 + 1 rounds back to 256, so a bf16 running sum stays at 256.
  x = np.ones(16, np.float32)
  x[0] = 256.0
  batch = jnp.asarray(x, jnp.bfloat16)
  params = {"w": jnp.asarray(0.5, jnp.bfloat16)}
  loss_fn = lambda p, b: jnp.mean(b * p["w"])
  grad = xsam_optax.accumulated_grad_fn(loss_fn, batch, 16)(params)["w"]
  assert grad.dtype == jnp.bfloat16
  want = (256.0 + 15.0) / 16  # the float64 mean of the gradients
  bf16_sum = 256.0 / 16
  assert abs(float(grad) - want) <= 0.0625  # bf16 spacing at 16: 0.125
  assert abs(float(grad) - bf16_sum) > 0.5


# ----------------------- Flax's fp8 collection in flax_utils.TrainState


OWG = flax_train_state.OVERWRITE_WITH_GRADIENT


def _fp8_state(cls, tx):
  params = {"params": {"w": jnp.array([1.0, -2.0])},
            OWG: {"scale": jnp.array([3.0])}}
  return cls.create(apply_fn=None, params=params, tx=tx)


def _fp8_grads():
  return {"params": {"w": jnp.array([0.5, 0.25])},
          OWG: {"scale": jnp.array([7.0])}}


def test_train_state_unwraps_fp8_gradients_as_flax_does():
  from xsam_optax.flax_utils import TrainState  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(0.1, momentum=0.9)
  ours = _fp8_state(TrainState, tx)
  flax_own = _fp8_state(flax_train_state.TrainState, tx)
  for _ in range(2):
    ours = ours.apply_gradients(grads=_fp8_grads())
    flax_own = flax_own.apply_gradients(grads=_fp8_grads())
  for got, want in ((ours.params, flax_own.params),
                    (ours.opt_state, flax_own.opt_state)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  assert float(ours.params[OWG]["scale"][0]) == 7.0  # overwritten
  assert int(ours.step) == 2


def test_train_state_gives_xsam_the_params_collection_and_its_grad_fn():
  from xsam_optax.flax_utils import TrainState  # pylint: disable=g-import-not-at-top
  tx = xsam_optax.xsam(optax.sgd(0.1))
  state = _fp8_state(TrainState, tx)
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 4))
  grads = {"params": grad_fn(state.params["params"]),
           OWG: {"scale": jnp.array([7.0])}}
  new = state.apply_gradients(grads=grads, grad_fn=grad_fn)
  updates, opt_state = tx.update(grads["params"], state.opt_state,
                                 state.params["params"], grad_fn=grad_fn)
  np.testing.assert_array_equal(
      new.params["params"]["w"], state.params["params"]["w"] + updates["w"])
  np.testing.assert_array_equal(new.params[OWG]["scale"], [7.0])
  for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(opt_state)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------- the documented defaults, pinned


def _power_on_the_square(matvec, v0):
  """Another estimator, cheap to compile beside power iteration."""
  return xsam_optax.power_iteration(lambda v: matvec(matvec(v)), v0,
                                    num_iters=1)


# (factory, the documented defaults, another valid value for each, the step
# counts probed). The counts tell the refresh period: 2 is the one period
# that refreshes at count 2 and not at 1; 100 the one that refreshes at 100
# and neither at 50 nor at 20.
DOCUMENTED_DEFAULTS = {
    "eigenvector_correction": (
        xsam_optax.eigenvector_correction,
        dict(alpha=0.2, update_every=2, num_iters=1, method="power",
             rule="reference", normalize=True, seed=0),
        dict(alpha=0.3, update_every=3, num_iters=2,
             method=_power_on_the_square, rule="sign_invariant",
             normalize=False, seed=1),
        (1, 2)),
    "eigen_sam_ascent": (
        xsam_optax.eigen_sam_ascent,
        dict(rho=0.05, alpha=0.2, update_every=100, num_iters=5,
             method="power", seed=0),
        dict(rho=0.1, alpha=0.3, update_every=50, num_iters=4,
             method=_power_on_the_square, seed=1),
        (1, 20, 50, 100)),
}


def _probe(tx, counts):
  """``tx``'s state from ``init`` and its update at each step count, flat.

  The incoming gradient leans against the stored eigenvector (a negative
  cosine, where the rules differ) and is not of unit length (where
  ``normalize`` shows)."""
  params = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3, -0.1])}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 4)
                     + jnp.sum(jnp.cos(3.0 * p["b"])) + p["w"][0] * p["b"][0])
  state = tx.init(params)
  g = jax.tree.map(lambda v, d: 0.3 * d - 2.0 * v, state.eigenvector,
                   grad_fn(params))
  # Eager: the operations compile once for all the probed transforms; a
  # jitted step would compile once for each.
  step = lambda s: tx.update(g, s, params, grad_fn=grad_fn)
  return np.concatenate([flat(state)] + [
      flat(step(state._replace(count=jnp.asarray(c, jnp.int32))))
      for c in counts])


@pytest.mark.parametrize("name", list(DOCUMENTED_DEFAULTS))
def test_defaults_are_the_documented_ones(name):
  # Only xsam's defaults were pinned (by the CLI's); a changed default of a
  # piece would change what every user of it computes.
  factory, documented, others, counts = DOCUMENTED_DEFAULTS[name]
  want = _probe(factory(**documented), counts)
  np.testing.assert_array_equal(_probe(factory(), counts), want)
  for key, other in others.items():  # the probe sees every one of them
    assert not np.allclose(_probe(factory(**{**documented, key: other}),
                                  counts), want), key


def test_refresh_due_defaults_to_the_transforms_period_with_a_warning():
  # Documented: update_every=2, the transforms' default, deprecated (it
  # cannot know the transform's period). 2 is the one period due at step 2
  # and not at step 1.
  with pytest.warns(DeprecationWarning, match="refresh_schedule"):
    due = [xsam_optax.refresh_due(step) for step in range(5)]
  assert due == [True, False, True, False, True]
