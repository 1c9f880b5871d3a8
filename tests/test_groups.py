"""Per-group perturbations (grouped_grad_fn) and rho / alpha schedules.

Oracles: the m-group formula restated in float64 NumPy on flat vectors (each
group's gradient from ``jax.grad`` on that group's slice alone, its SAM point,
the gradient there, the mean), a dense-Hessian power step for the refresh,
and ``optax.inject_hyperparams`` for the schedules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_optax
from _oracles import dense_hessian, flat, mlp_problem, oracle_correct

RHO, ALPHA, LR, GROUPS = 0.3, 0.4, 0.1, 4
pytestmark = pytest.mark.usefixtures("x64")


@pytest.fixture
def problem(x64):
  del x64
  params, loss, batch = mlp_problem(seed=3, n=16)
  return params, loss, batch


def group_slices(batch, m):
  n = batch[0].shape[0] // m
  return [jax.tree.map(lambda x, i=i: x[i * n:(i + 1) * n], batch) for i in range(m)]


def unit(d):
  return d / np.linalg.norm(d)


def oracle_adv(params, loss, batch, m, direction_of):
  """mean_i grad L_i(theta + rho d_i), d_i = direction_of(g_i), flat float64."""
  theta, unravel = ravel_pytree(params)
  theta = np.asarray(theta, np.float64)
  total = np.zeros_like(theta)
  for group in group_slices(batch, m):
    grad = lambda t, group=group: flat(jax.grad(loss)(unravel(jnp.asarray(t)), group))
    d = direction_of(grad(theta))
    total += grad(theta + RHO * d)
  return total / m


def step(tx, params, grad_fn, *, jit=True):
  state = tx.init(params)
  update = lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
  updates, state = (jax.jit(update) if jit else update)(params, state)
  return updates, state


def test_one_group_is_todays_sam_bit_for_bit(problem):
  params, loss, batch = problem
  grouped = xsam_optax.grouped_grad_fn(loss, batch, 1)
  plain = jax.grad(lambda p: loss(p, batch))
  for make in (lambda: xsam_optax.sam(optax.sgd(LR), rho=RHO),
               lambda: xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA),
               lambda: optax.chain(xsam_optax.eigen_sam_ascent(RHO, ALPHA, update_every=1),
                                   optax.sgd(LR))):
    got, got_state = step(make(), params, grouped)
    want, want_state = step(make(), params, plain)
    for a, b in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grouped_grad_fn_is_the_whole_batch_gradient(problem):
  params, loss, batch = problem
  whole = flat(jax.grad(loss)(params, batch))
  for kwargs in ({}, {"num_microbatches": 2}):
    got = flat(xsam_optax.grouped_grad_fn(loss, batch, GROUPS, **kwargs)(params))
    np.testing.assert_allclose(got, whole, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_with_groups_equals_the_float64_formula(problem, adaptive):
  params, loss, batch = problem
  theta = flat(params)
  scale = np.abs(theta) if adaptive else np.ones_like(theta)
  # ASAM: eps = rho T^2 g / ||T g||, i.e. direction T^2 g of norm ||T g||.
  direction = lambda g: scale ** 2 * g / np.linalg.norm(scale * g)
  want = -LR * oracle_adv(params, loss, batch, GROUPS, direction)
  tx = xsam_optax.sam(optax.sgd(LR), rho=RHO, adaptive=adaptive)
  got, _ = step(tx, params, xsam_optax.grouped_grad_fn(loss, batch, GROUPS))
  np.testing.assert_allclose(flat(got), want, rtol=1e-10, atol=1e-13)
  # Not the global perturbation: the groups' directions matter here.
  global_update = flat(step(tx, params, jax.grad(lambda p: loss(p, batch)))[0])
  assert np.linalg.norm(global_update - want) > 1e-4 * np.linalg.norm(want)


def test_sam_with_microbatched_groups_equals_the_formula(problem):
  params, loss, batch = problem
  want = -LR * oracle_adv(params, loss, batch, GROUPS, unit)
  grad_fn = xsam_optax.grouped_grad_fn(loss, batch, GROUPS, num_microbatches=2)
  got, _ = step(xsam_optax.sam(optax.sgd(LR), rho=RHO), params, grad_fn)
  np.testing.assert_allclose(flat(got), want, rtol=1e-10, atol=1e-13)


def refreshed_eigenvector(params, loss, batch, seed=0):
  """One power step from the transform's start vector on the whole batch's dense Hessian."""
  v0 = flat(xsam_optax.xsam(optax.sgd(LR), seed=seed).init(params)[1].eigenvector)
  h = np.asarray(dense_hessian(lambda p: loss(p, batch), params), np.float64)
  v = h @ v0
  return v / np.linalg.norm(v)


def test_xsam_with_groups_corrects_the_averaged_sam_gradient(problem):
  params, loss, batch = problem
  v = refreshed_eigenvector(params, loss, batch)
  g_adv = oracle_adv(params, loss, batch, GROUPS, unit)
  want = -LR * oracle_correct(g_adv, v, ALPHA)
  tx = xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA, update_every=1)
  got, state = step(tx, params, xsam_optax.grouped_grad_fn(loss, batch, GROUPS))
  # The refresh used the whole batch's Hessian (a power step from the seed's vector).
  np.testing.assert_allclose(flat(state[1].eigenvector), v, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(flat(got), want, rtol=1e-9, atol=1e-12)


def test_eigen_sam_with_groups_equals_the_float64_formula(problem):
  params, loss, batch = problem
  v = refreshed_eigenvector(params, loss, batch)

  def direction(g):
    g_hat = unit(g)
    cos = g_hat @ v
    return unit(g_hat + ALPHA * np.sign(cos) * (v - cos * g_hat))

  want = -LR * oracle_adv(params, loss, batch, GROUPS, direction)
  tx = optax.chain(xsam_optax.eigen_sam_ascent(RHO, ALPHA, update_every=1, num_iters=1),
                   optax.sgd(LR))
  got, state = step(tx, params, xsam_optax.grouped_grad_fn(loss, batch, GROUPS))
  np.testing.assert_allclose(flat(got), want, rtol=1e-9, atol=1e-12)
  # cos_angle stays the whole-batch gradient's.
  g = flat(jax.grad(loss)(params, batch))
  np.testing.assert_allclose(float(state[0].cos_angle), g @ v / np.linalg.norm(g), rtol=1e-9)


def test_grouped_grad_fn_refuses_integer_parameter_leaves(problem):
  params, loss, batch = problem
  grad_fn = xsam_optax.grouped_grad_fn(loss, batch, GROUPS)
  tx = xsam_optax.sam(optax.sgd(LR))
  with_int = {**params, "step": jnp.array(3)}
  state = tx.init(with_int)
  with pytest.raises(ValueError, match="grouped_grad_fn needs float parameters"):
    tx.update(jax.tree.map(jnp.zeros_like, with_int), state, with_int, grad_fn=grad_fn)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_groups": 0}, "num_groups must be >= 1, got 0."),
    ({"num_groups": 2.0}, "num_groups must be an int, got 2.0."),
    ({"num_groups": 3}, "num_groups must divide the batch size 16, got 3."),
    ({"num_groups": 4, "num_microbatches": 3},
     "num_microbatches must divide the group size 4"),
    ({"num_groups": 4, "num_microbatches": 0}, "num_microbatches must be >= 1, got 0."),
])
def test_grouped_grad_fn_bad_counts(problem, kwargs, message):
  _, loss, batch = problem
  with pytest.raises(ValueError) as info:
    xsam_optax.grouped_grad_fn(loss, batch, **kwargs)
  assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("batch", [
    {"x": np.zeros((16, 4)), "scale": np.float32(2.0)},
    (np.zeros((16, 4)), np.zeros(15)),
])
def test_grouped_grad_fn_needs_a_leading_axis(batch):
  with pytest.raises(ValueError, match="batch must be a pytree of arrays sharing a leading"):
    xsam_optax.grouped_grad_fn(lambda p, b: 0.0, batch, 2)


def test_grouped_grad_fn_needs_a_callable_loss(problem):
  with pytest.raises(ValueError, match="loss_fn must be a callable"):
    xsam_optax.grouped_grad_fn(None, problem[2], 2)


# ------------------------------------------------------------- schedules


def run_steps(tx, params, grad_fn, steps=3):
  state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  out = []
  for _ in range(steps):
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
    out.append(flat(params))
  return np.stack(out)


RHO_SCHEDULE = optax.linear_schedule(0.0, 0.2, 2)
ALPHA_SCHEDULE = optax.linear_schedule(0.5, 0.1, 2)


def make(name, rho, alpha, inject=False):
  """The transform ``name`` with these rho and alpha, or through inject_hyperparams."""
  static = ("update_every", "num_iters", "seed")
  if name == "sam":
    factory = optax.inject_hyperparams(xsam_optax.sam) if inject else xsam_optax.sam
    return factory(optax.sgd(LR), rho=rho)
  if name == "xsam":
    factory = (optax.inject_hyperparams(xsam_optax.xsam, static_args=static) if inject
               else xsam_optax.xsam)
    return factory(optax.sgd(LR), rho=rho, alpha=alpha, update_every=1)
  factory = (optax.inject_hyperparams(xsam_optax.eigen_sam_ascent, static_args=static)
             if inject else xsam_optax.eigen_sam_ascent)
  return optax.chain(factory(rho, alpha, update_every=1), optax.sgd(LR))


@pytest.mark.parametrize("name", ["sam", "xsam", "eigen_sam_ascent"])
def test_schedules_equal_inject_hyperparams(problem, name):
  params, loss, batch = problem
  grad_fn = jax.grad(lambda p: loss(p, batch))
  got = run_steps(make(name, RHO_SCHEDULE, ALPHA_SCHEDULE), params, grad_fn)
  want = run_steps(make(name, RHO_SCHEDULE, ALPHA_SCHEDULE, inject=True), params, grad_fn)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  # The schedules matter: step 0 is the step at rho 0 and alpha 0.5, not at
  # the values they reach later.
  np.testing.assert_allclose(got[0], run_steps(make(name, 0.0, 0.5), params, grad_fn, 1)[0],
                             rtol=1e-12)
  assert not np.allclose(got[0], run_steps(make(name, 0.2, 0.1), params, grad_fn, 1)[0])


def test_a_number_keeps_the_empty_state_and_a_schedule_counts(problem):
  params = problem[0]
  assert xsam_optax.sam_ascent(0.05).init(params) == optax.EmptyState()
  state = xsam_optax.sam_ascent(RHO_SCHEDULE).init(params)
  assert isinstance(state, optax.ScaleByScheduleState) and int(state.count) == 0


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_a_negative_or_non_finite_scheduled_rho_acts_as_zero(problem, value):
  params, loss, batch = problem
  grad_fn = jax.grad(lambda p: loss(p, batch))
  got, state = step(xsam_optax.sam(optax.sgd(LR), rho=lambda count: jnp.float64(value)),
                    params, grad_fn)
  np.testing.assert_allclose(flat(got), -LR * flat(grad_fn(params)), rtol=1e-12)
  assert int(state[0].count) == 1


def test_a_negative_scheduled_alpha_removes_nothing(problem):
  params, loss, batch = problem
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.eigenvector_correction(lambda count: -1.0, update_every=1)
  got, _ = step(tx, params, grad_fn)
  g = flat(grad_fn(params))
  np.testing.assert_allclose(flat(got), g / np.linalg.norm(g), rtol=1e-12)


def test_a_schedule_must_return_a_scalar(problem):
  params, loss, batch = problem
  grad_fn = jax.grad(lambda p: loss(p, batch))
  with pytest.raises(ValueError, match="must return a real scalar"):
    step(xsam_optax.sam_ascent(lambda count: jnp.ones(2)), params, grad_fn, jit=False)
