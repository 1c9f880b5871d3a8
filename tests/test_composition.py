"""X-SAM inside the optax and Flax idioms users already write.

Each test is a pattern a new user tries: chaining a transform in front of the
ascent, ``optax.MultiSteps``, Flax Linen's ``TrainState``, ``optax.masked``,
a loss that is not finite at the SAM point, and inputs that are almost right.
The outcome is either the documented result (checked against a restatement
of the formula) or an error, at the transform, that names the cause.
"""

import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

import xsam_optax

RHO = 0.1


def loss(p):
  return jnp.sum(p["w"] ** 4) + jnp.sum(jnp.cos(3.0 * p["b"]))


PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.1, -0.3])}
GRAD_FN = jax.grad(loss)


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def sam_point_gradient(params, direction, rho=RHO, grad_fn=GRAD_FN):
  """grad L(theta + rho d / ||d||), restated without the library."""
  d = flat(direction)
  scale = np.float32(rho / np.linalg.norm(d))
  return grad_fn(jax.tree.map(lambda p, x: p + scale * x, params, direction))


ASCENTS = {
    "sam": lambda: xsam_optax.sam(optax.sgd(0.1), rho=RHO),
    # One power product per step keeps eager calls (and the suite) fast;
    # the estimators are not what these tests are about.
    "xsam": lambda: xsam_optax.xsam(optax.sgd(0.1), rho=RHO, update_every=1,
                                    num_iters=1, method="power"),
    "eigen_sam_ascent": lambda: optax.chain(
        xsam_optax.eigen_sam_ascent(RHO, 0.3, update_every=1, num_iters=1),
        optax.sgd(0.1)),
}
BEFORE = {
    "clip_by_global_norm": lambda: optax.clip_by_global_norm(1e-3),
    "add_decayed_weights": lambda: optax.add_decayed_weights(0.5),
}


# --------------------------------- 1. transforms chained before the ascent


def test_a_transform_before_the_ascent_only_sets_the_perturbation():
  # Documented: the ascent recomputes the gradient with grad_fn, so what
  # came before it only chooses the direction of eps.
  wd = 0.5
  tx = optax.chain(optax.add_decayed_weights(wd), xsam_optax.sam_ascent(RHO))
  g = GRAD_FN(PARAMS)
  updates, _ = tx.update(g, tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)
  tilted = jax.tree.map(lambda gi, p: gi + wd * p, g, PARAMS)
  np.testing.assert_allclose(flat(updates),
                             flat(sam_point_gradient(PARAMS, tilted)),
                             rtol=1e-6)


@pytest.mark.parametrize("before", BEFORE)
@pytest.mark.parametrize("name", ASCENTS)
def test_check_incoming_reports_a_transform_before_the_ascent(name, before):
  tx = optax.chain(BEFORE[before](), ASCENTS[name]())
  state = tx.init(PARAMS)
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=GRAD_FN,
              check_incoming=True)
  message = str(info.value)
  assert "differ from grad_fn(params)" in message, message
  assert "base optimizer" in message and "MultiSteps" in message, message


def test_check_incoming_raises_under_jit():
  tx = optax.chain(optax.add_decayed_weights(0.5), ASCENTS["xsam"]())
  step = jax.jit(lambda p, s: tx.update(GRAD_FN(p), s, p, grad_fn=GRAD_FN,
                                        check_incoming=True))
  with pytest.raises(Exception, match="differ from grad_fn"):
    jax.block_until_ready(step(PARAMS, tx.init(PARAMS)))


@pytest.mark.parametrize("name", ASCENTS)
def test_documented_placement_passes_the_check_and_clips(name):
  # Clipping and weight decay inside the base optimizer act on the final
  # direction; check_incoming finds nothing wrong and changes no value.
  clip = 1e-3
  base = optax.chain(optax.clip_by_global_norm(clip),
                     optax.add_decayed_weights(0.5), optax.sgd(1.0))
  build = {"sam": lambda: xsam_optax.sam(base, rho=RHO),
           "xsam": lambda: xsam_optax.xsam(base, rho=RHO, update_every=1,
                                           num_iters=1, method="power"),
           "eigen_sam_ascent": lambda: optax.chain(
               xsam_optax.eigen_sam_ascent(RHO, 0.3, update_every=1,
                                           num_iters=1), base)}[name]
  tx = build()
  state = tx.init(PARAMS)
  g = GRAD_FN(PARAMS)
  checked, _ = tx.update(g, state, PARAMS, grad_fn=GRAD_FN,
                         check_incoming=True)
  plain, _ = tx.update(g, state, PARAMS, grad_fn=GRAD_FN)
  np.testing.assert_array_equal(flat(checked), flat(plain))
  # sgd(1.0) after the clip and the decay: -(clipped + 0.5 * params).
  clipped = -flat(plain) - 0.5 * flat(PARAMS)
  np.testing.assert_allclose(np.linalg.norm(clipped), clip, rtol=1e-4)


def test_check_incoming_tolerates_rounding_but_not_a_real_change():
  tx = xsam_optax.sam(optax.sgd(0.1), rho=RHO)
  state = tx.init(PARAMS)
  g = GRAD_FN(PARAMS)
  nudged = jax.tree.map(lambda x: x * (1 + 1e-6), g)
  tx.update(nudged, state, PARAMS, grad_fn=GRAD_FN, check_incoming=True)
  scaled = jax.tree.map(lambda x: x * 1.01, g)
  with pytest.raises(ValueError, match="differ from grad_fn"):
    tx.update(scaled, state, PARAMS, grad_fn=GRAD_FN, check_incoming=True)


# ------------------------------------------ 2. optax.MultiSteps is not accumulation


def _microbatch_problem():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=8), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
  loss_fn = lambda p, b: jnp.mean((jnp.tanh(b[0] @ p["w"]) - b[1]) ** 2)
  return params, loss_fn, (x, y)


def test_multisteps_around_xsam_is_reported_by_check_incoming():
  params, loss_fn, (x, y) = _microbatch_problem()
  tx = optax.MultiSteps(xsam_optax.xsam(optax.sgd(0.1), update_every=1,
                                        num_iters=1, method="power"),
                        every_k_schedule=2)
  state = tx.init(params)
  micro = [(x[:4], y[:4]), (x[4:], y[4:])]
  grad_fn = jax.grad(lambda p: loss_fn(p, micro[0]))
  _, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                       check_incoming=True)  # mean of one = itself: fine
  grad_fn = jax.grad(lambda p: loss_fn(p, micro[1]))
  # MultiSteps runs its inner update under lax.cond: the check reports
  # from the compiled program, as under jax.jit.
  with pytest.raises(Exception, match="differ from grad_fn") as info:
    jax.block_until_ready(tx.update(grad_fn(params), state, params,
                                    grad_fn=grad_fn, check_incoming=True))
  assert "accumulated_grad_fn" in str(info.value)


# ------------------------------------------------ 3. Flax Linen TrainState


class _Quartic(nn.Module):
  """``loss`` as a Linen module whose parameters are PARAMS: the eager calls
  below then reuse the operations compiled for the rest of this file."""

  @nn.compact
  def __call__(self):
    return loss({name: self.param(name, lambda _, v=value: v)
                 for name, value in PARAMS.items()})


def _linen_problem():
  model = _Quartic()
  params = model.init(jax.random.PRNGKey(0))["params"]
  loss_fn = lambda p: model.apply({"params": p})
  return model, params, loss_fn


def test_flax_train_state_forwards_grad_fn_and_refresh():
  from xsam_optax.flax_utils import TrainState  # pylint: disable=g-import-not-at-top
  model, params, loss_fn = _linen_problem()
  grad_fn = jax.grad(loss_fn)
  tx = xsam_optax.xsam(optax.sgd(0.1, momentum=0.9), update_every=5,
                       num_iters=1, method="power")
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @functools.partial(jax.jit, static_argnames="refresh")
  def step(state, refresh):
    return state.apply_gradients(grads=grad_fn(state.params), grad_fn=grad_fn,
                                 refresh=refresh)

  # The schedule alone would refresh at step 0; refresh=False reaching
  # tx.update is what keeps the eigenvalue at 0.
  state = step(state, refresh=False)
  assert float(optax.tree.get(state.opt_state, "eigenvalue")) == 0.0
  state = step(state, refresh=True)
  assert float(optax.tree.get(state.opt_state, "eigenvalue")) != 0.0
  p, opt_state = params, tx.init(params)
  for refresh in (False, True):  # the same two steps without TrainState
    updates, opt_state = tx.update(grad_fn(p), opt_state, p, grad_fn=grad_fn,
                                   refresh=refresh)
    p = optax.apply_updates(p, updates)
  assert int(state.step) == 2
  np.testing.assert_allclose(flat(state.params), flat(p), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(flat(state.opt_state), flat(opt_state),
                             rtol=1e-5, atol=1e-6)


def test_flax_train_state_subclass_fields_still_go_to_replace():
  from xsam_optax.flax_utils import TrainState  # pylint: disable=g-import-not-at-top

  class WithStats(TrainState):
    batch_stats: Any = None

  model, params, loss_fn = _linen_problem()
  grad_fn = jax.grad(loss_fn)
  state = WithStats.create(apply_fn=model.apply, params=params,
                           tx=xsam_optax.sam(optax.sgd(0.1)),
                           batch_stats={"mean": jnp.zeros(2)})
  new = state.apply_gradients(grads=grad_fn(params), grad_fn=grad_fn,
                              batch_stats={"mean": jnp.ones(2)})
  np.testing.assert_array_equal(new.batch_stats["mean"], 1.0)
  assert not np.allclose(flat(new.params), flat(params))


def test_plain_flax_train_state_error_points_to_the_helper():
  model, params, loss_fn = _linen_problem()
  grad_fn = jax.grad(loss_fn)
  state = flax_train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=xsam_optax.xsam(optax.sgd(0.1)))
  with pytest.raises(ValueError) as info:
    state.apply_gradients(grads=grad_fn(params), grad_fn=grad_fn)
  message = str(info.value)
  assert "TrainState.apply_gradients" in message, message
  assert "xsam_optax.flax_utils.TrainState" in message, message


def test_missing_grad_fn_error_names_wrappers_that_drop_it():
  tx = optax.lookahead(xsam_optax.xsam(optax.sgd(0.1)), sync_period=2,
                       slow_step_size=0.5)
  params = optax.LookaheadParams.init_synced(PARAMS)
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), tx.init(params), params)
  assert "optax.lookahead" in str(info.value)


def test_lookahead_recipe_binds_grad_fn():
  # The guide's recipe: a wrapper that cannot forward grad_fn gets a transform
  # with grad_fn already bound, built inside the step.
  def bind_grad_fn(tx, grad_fn):
    return optax.GradientTransformation(
        tx.init, lambda u, s, p=None: tx.update(u, s, p, grad_fn=grad_fn))

  inner = xsam_optax.sam(optax.sgd(0.1), rho=RHO)
  tx = optax.lookahead(bind_grad_fn(inner, GRAD_FN), sync_period=2,
                       slow_step_size=0.5)
  params = optax.LookaheadParams.init_synced(PARAMS)
  g = GRAD_FN(PARAMS)  # the gradient at the fast parameters
  updates, _ = tx.update(g, tx.init(params), params)
  np.testing.assert_allclose(
      flat(updates.fast), -0.1 * flat(sam_point_gradient(PARAMS, g)),
      rtol=1e-6)


# ---------------------------------------- 4. a loss not finite at the SAM point


def _cliff_loss(p):
  # Finite at PARAMS_CLIFF, undefined once w[0] passes 1 (sqrt of a negative).
  return -jnp.sum(jnp.sqrt(1.0 - p["w"])) + jnp.sum(p["b"] ** 2)


PARAMS_CLIFF = {"w": jnp.array([0.999, 0.0]), "b": jnp.ones(3)}


@pytest.mark.parametrize("name", ASCENTS)
def test_non_finite_sam_point_gives_a_zero_direction_not_nan(name):
  grad_fn = jax.grad(_cliff_loss)
  g = grad_fn(PARAMS_CLIFF)
  assert all_finite(g)
  assert not all_finite(sam_point_gradient(PARAMS_CLIFF, g, rho=0.5,
                                           grad_fn=grad_fn))
  build = {"sam": lambda: xsam_optax.sam(optax.sgd(0.1), rho=0.5),
           "xsam": lambda: xsam_optax.xsam(optax.sgd(0.1), rho=0.5,
                                           update_every=1, num_iters=1,
                                           method="power"),
           "eigen_sam_ascent": lambda: optax.chain(
               xsam_optax.eigen_sam_ascent(0.5, 0.0, update_every=1,
                                           num_iters=1), optax.sgd(0.1))}
  tx = build[name]()
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  updates, state = step(PARAMS_CLIFF, tx.init(PARAMS_CLIFF))
  assert all_finite(updates) and all_finite(state)
  np.testing.assert_array_equal(flat(updates), 0.0)
  assert all_finite(optax.apply_updates(PARAMS_CLIFF, updates))


def test_non_finite_sam_point_zeroes_only_that_step():
  # The next (finite) step is SAM as usual; momentum carried over is intact.
  tx = xsam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=RHO)
  state = tx.init(PARAMS)
  _, state = tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=GRAD_FN)
  trace = flat(state[1][0].trace)
  bad = lambda p: jax.tree.map(lambda x: x * jnp.nan, GRAD_FN(p))
  updates, state = tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=bad)
  # SGD with momentum on a zero gradient: the decayed trace, nothing else.
  np.testing.assert_allclose(flat(updates), -0.1 * 0.9 * trace, rtol=1e-6)


@pytest.mark.parametrize("build, name", [
    (lambda v: xsam_optax.sam_ascent(v), "rho"),
    (lambda v: xsam_optax.sam(optax.sgd(0.1), rho=v), "rho"),
    (lambda v: xsam_optax.xsam(optax.sgd(0.1), rho=v), "rho"),
    (lambda v: xsam_optax.eigen_sam_ascent(rho=v), "rho"),
    (lambda v: xsam_optax.eigen_sam_ascent(alpha=v), "alpha"),
    (lambda v: xsam_optax.eigenvector_correction(alpha=v), "alpha"),
])
@pytest.mark.parametrize("value", [float("inf"), np.float32(np.inf),
                                   float("nan")])
def test_non_finite_python_hyperparameters_are_rejected(build, name, value):
  with pytest.raises(ValueError) as info:
    build(value)
  message = str(info.value)
  assert message.startswith(name + " ") and "finite" in message, message


# ------------------------------------------ 5. optax.masked / multi_transform


@pytest.mark.parametrize("wrap", [
    lambda tx: optax.masked(tx, {"w": True, "b": False}),
    lambda tx: optax.multi_transform({"x": tx, "frozen": optax.set_to_zero()},
                                     {"w": "x", "b": "frozen"}),
])
@pytest.mark.parametrize("name", ASCENTS)
def test_masked_xsam_names_the_cause_at_the_transform(name, wrap):
  tx = wrap(ASCENTS[name]())
  state = tx.init(PARAMS)
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=GRAD_FN)
  message = str(info.value)
  assert "MaskedNode" in message and "optax.masked" in message, message
  assert "frozen" in message, message


def test_frozen_parameters_recipe_is_sam_on_the_trainable_ones():
  # The guide's recipe: the optimizer sees only the trainable parameters; the
  # loss closes over the frozen ones, which never move and are never
  # perturbed. Oracle: the SAM step restated on the trainable leaves.
  frozen = {"b": PARAMS["b"]}
  trainable = {"w": PARAMS["w"]}
  grad_fn = jax.grad(lambda t: loss({**t, **frozen}))
  tx = xsam_optax.sam(optax.sgd(0.1), rho=RHO)
  updates, _ = tx.update(grad_fn(trainable), tx.init(trainable), trainable,
                         grad_fn=grad_fn, check_incoming=True)
  g = np.asarray(GRAD_FN(PARAMS)["w"], np.float64)
  w_adv = np.asarray(PARAMS["w"]) + RHO * g / np.linalg.norm(g)
  want = -0.1 * (4.0 * w_adv ** 3)  # d/dw sum(w^4) at the SAM point
  np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5)
  assert set(updates) == {"w"}


def test_multi_transform_as_the_base_optimizer_works():
  # Documented: per-group base optimizers inside xsam are fine (SAM and the
  # correction act on all parameters; only the base step differs by group).
  labels = {"w": "fast", "b": "slow"}
  direction = []
  probe = optax.GradientTransformation(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None: (direction.append(u), (u, s))[1])
  make = lambda base: xsam_optax.xsam(
      optax.chain(probe, base), rho=RHO, update_every=1, num_iters=1,
      method="power")
  tx = make(optax.multi_transform(
      {"fast": optax.sgd(1.0), "slow": optax.sgd(0.1)}, labels))
  updates, _ = tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS,
                         grad_fn=GRAD_FN)
  d = direction[-1]
  np.testing.assert_allclose(updates["w"], -1.0 * d["w"], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], -0.1 * d["b"], rtol=1e-6)


# --------------------------------------------------- almost-right inputs


@pytest.mark.parametrize("refresh", [1, 0, "yes", 1.0, jnp.array(1),
                                     jnp.array([True, False]),
                                     np.array([True])])
@pytest.mark.parametrize("name", ["xsam", "eigen_sam_ascent"])
def test_refresh_must_be_none_or_a_bool(name, refresh):
  tx = ASCENTS[name]()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=GRAD_FN,
              refresh=refresh)
  message = str(info.value)
  assert message.startswith("refresh must be None"), message
  assert "refresh_schedule(tx)" in message and "refresh_due" in message, message


@pytest.mark.parametrize("refresh", [True, np.bool_(False), jnp.array(True),
                                     np.array(False)])
def test_refresh_accepts_bools_and_boolean_scalars(refresh):
  tx = ASCENTS["xsam"]()
  updates, _ = tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS,
                         grad_fn=GRAD_FN, refresh=refresh)
  assert all_finite(updates)


ALL = dict(ASCENTS, eigenvector_correction=lambda: (
    xsam_optax.eigenvector_correction(0.2, update_every=1, num_iters=1,
                                      method="power")))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("wrong, what", [
    (lambda g: {"w": g["w"][None], "b": g["b"]}, "shape (1, 2)"),
    (lambda g: {"w": g["w"][:1], "b": g["b"]}, "shape (1,)"),
    (lambda g: {"w": g["w"].astype(jnp.bfloat16), "b": g["b"]},
     "dtype bfloat16"),
])
def test_grad_fn_leaves_of_wrong_shape_or_dtype_are_named(name, wrong, what):
  tx = ALL[name]()
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS,
              grad_fn=lambda p: wrong(GRAD_FN(p)))
  message = str(info.value)
  assert "grad_fn" in message and "['w']" in message, message
  assert what in message, message


@pytest.mark.parametrize("name", ALL)
def test_grad_fn_returning_value_and_grad_gets_a_hint(name):
  tx = ALL[name]()
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS,
              grad_fn=jax.value_and_grad(loss))
  assert "value_and_grad" in str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_python_float_leaves_in_params_work(name):
  as_float = {"w": PARAMS["w"], "b": 0.5}
  as_array = {"w": PARAMS["w"], "b": jnp.asarray(0.5)}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 4) + jnp.cos(3.0 * p["b"]))
  results = []
  for params in (as_float, as_array):
    tx = ALL[name]()
    results.append(tx.update(grad_fn(params), tx.init(params), params,
                             grad_fn=grad_fn)[0])
  np.testing.assert_allclose(flat(results[0]), flat(results[1]), rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_empty_params_give_empty_updates(name):
  tx = ALL[name]()
  state = tx.init({})
  updates, state = jax.jit(
      lambda s: tx.update({}, s, {}, grad_fn=lambda p: p))(state)
  assert updates == {}
  assert not any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(state))


def test_optimizer_that_is_not_a_transform_is_named():
  for alias in (xsam_optax.xsam, xsam_optax.sam):
    with pytest.raises(ValueError) as info:
      alias(optax.sgd)  # the factory, not optax.sgd(0.1)
    message = str(info.value)
    assert message.startswith("optimizer must be"), message
    assert "optax.sgd(0.1)" in message, message


def test_eager_update_follows_the_schedule_without_a_cond():
  # Without jax.jit, a lax.cond is traced and compiled anew at every call
  # (seconds per step). Eagerly the step count is known: a step that does
  # not refresh must not trace the refresh's Hessian-vector products, i.e.
  # call grad_fn as often as when the host says refresh=False.
  tx = xsam_optax.xsam(optax.sgd(0.1), rho=RHO, update_every=3, num_iters=1,
                       method="power")
  state = tx.init(PARAMS)
  _, state = tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=GRAD_FN,
                       refresh=True)  # step 0
  counts = []
  for refresh in (None, False):
    calls = []
    counting_grad_fn = lambda p, calls=calls: (calls.append(1), GRAD_FN(p))[1]
    tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=counting_grad_fn,
              refresh=refresh)  # step 1: no refresh either way
    counts.append(len(calls))
  assert counts[0] == counts[1], counts


def test_grad_fn_failure_says_what_it_was_called_with():
  # optax.flatten hands the transform one flat vector: the user's loss then
  # fails on it, and the error carries a note (Python >= 3.11) naming the
  # likely cause.
  tx = optax.flatten(xsam_optax.sam(optax.sgd(0.1)))
  with pytest.raises(TypeError, match="string indexing") as info:
    tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)
  if sys.version_info >= (3, 11):
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "grad_fn failed" in notes and "optax.flatten" in notes, notes
