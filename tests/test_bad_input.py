"""Bad input: errors name the argument, the value and the allowed range.

Static settings are checked when the transform is built (before ``init``);
float hyperparameters only when they are plain Python numbers, so arrays (as
``optax.inject_hyperparams`` passes them) are accepted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax

SGD = optax.sgd(0.1)


def loss(p):
  return jnp.sum(p["w"] ** 4) + jnp.sum(jnp.cos(p["b"]))


PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 0.1, -0.3])}
GRAD_FN = jax.grad(loss)
LANCZOS_3 = functools.partial(xsam_optax.lanczos, num_iters=3)


# (label, build, argument, value as printed, allowed range as printed)
CONSTRUCTION_ERRORS = [
    ("sam_ascent rho<0", lambda: xsam_optax.sam_ascent(-0.1),
     "rho", "-0.1", ">= 0"),
    ("sam_ascent rho=nan", lambda: xsam_optax.sam_ascent(float("nan")),
     "rho", "nan", ">= 0"),
    ("sam rho<0", lambda: xsam_optax.sam(SGD, rho=-1.0),
     "rho", "-1.0", ">= 0"),
    ("xsam rho<0", lambda: xsam_optax.xsam(SGD, rho=-0.5),
     "rho", "-0.5", ">= 0"),
    ("correction alpha<0",
     lambda: xsam_optax.eigenvector_correction(-0.1),
     "alpha", "-0.1", "[0.0, 2.0]"),
    ("correction alpha>2",
     lambda: xsam_optax.eigenvector_correction(2.5),
     "alpha", "2.5", "[0.0, 2.0]"),
    ("xsam alpha>2", lambda: xsam_optax.xsam(SGD, alpha=3.0),
     "alpha", "3.0", "[0.0, 2.0]"),
    ("xsam alpha=inf", lambda: xsam_optax.xsam(SGD, alpha=float("inf")),
     "alpha", "inf", "[0.0, 2.0]"),
    ("correction update_every=0",
     lambda: xsam_optax.eigenvector_correction(update_every=0),
     "update_every", "0", ">= 1"),
    ("xsam update_every=-3", lambda: xsam_optax.xsam(SGD, update_every=-3),
     "update_every", "-3", ">= 1"),
    ("correction num_iters=0",
     lambda: xsam_optax.eigenvector_correction(num_iters=0),
     "num_iters", "0", ">= 1"),
    ("xsam num_iters=0", lambda: xsam_optax.xsam(SGD, num_iters=0),
     "num_iters", "0", ">= 1"),
    ("correction method",
     lambda: xsam_optax.eigenvector_correction(method="arnoldi"),
     "method", "'arnoldi'", "'power', 'lanczos'"),
    ("xsam method", lambda: xsam_optax.xsam(SGD, method="Power"),
     "method", "'Power'", "'power', 'lanczos'"),
    ("xsam update_every float", lambda: xsam_optax.xsam(SGD, update_every=2.5),
     "update_every", "2.5", "int"),
    ("xsam num_iters bool", lambda: xsam_optax.xsam(SGD, num_iters=True),
     "num_iters", "True", "int"),
    ("xsam lanczos num_iters=1",
     lambda: xsam_optax.xsam(SGD, num_iters=1, method="lanczos"),
     "num_iters", "1", "method='power'"),
    ("xsam method neither name nor callable",
     lambda: xsam_optax.xsam(SGD, method=3),
     "method", "3", "or a callable (matvec, v0) -> EigenResult"),
    ("callable method with num_iters",
     lambda: xsam_optax.xsam(SGD, method=LANCZOS_3, num_iters=8),
     "num_iters", "num_iters=8", "functools.partial"),
    ("eigen_sam callable method with num_iters",
     lambda: xsam_optax.eigen_sam_ascent(method=LANCZOS_3, num_iters=4),
     "num_iters", "num_iters=4", "functools.partial"),
    ("xsam seed<0", lambda: xsam_optax.xsam(SGD, seed=-1),
     "seed", "-1", ">= 0"),
    ("sam_ascent adaptive", lambda: xsam_optax.sam_ascent(adaptive="yes"),
     "adaptive", "'yes'", "True or False"),
]


@pytest.mark.parametrize("label, build, name, value, allowed",
                         CONSTRUCTION_ERRORS,
                         ids=[c[0] for c in CONSTRUCTION_ERRORS])
def test_bad_setting_raises_at_construction(label, build, name, value,
                                            allowed):
  del label
  with pytest.raises(ValueError) as info:
    build()  # no init, no update: the error comes from the factory
  message = str(info.value)
  assert message.startswith(name + " "), message
  assert message.split(", got ", 1)[1].startswith(value), message
  assert allowed in message, message


def _matvec_never_called(v):
  raise AssertionError("validation must happen before any product")


@pytest.mark.parametrize("call, name, value, allowed", [
    (lambda: xsam_optax.lanczos(_matvec_never_called, jnp.ones(4),
                                num_iters=3, k=5),
     "k", "5", "<= num_iters (3)"),
    (lambda: xsam_optax.lanczos(_matvec_never_called, jnp.ones(4),
                                num_iters=0),
     "num_iters", "0", ">= 1"),
    (lambda: xsam_optax.power_iteration(_matvec_never_called, jnp.ones(4),
                                        num_iters=0),
     "num_iters", "0", ">= 1"),
    (lambda: xsam_optax.power_iteration(_matvec_never_called, jnp.ones(4),
                                        num_iters=3, tol=-1e-3),
     "tol", "-0.001", ">= 0"),
])
def test_estimators_validate_before_any_product(call, name, value, allowed):
  with pytest.raises(ValueError) as info:
    call()
  message = str(info.value)
  assert message.startswith(name + " ") and value in message, message
  assert allowed in message, message


@pytest.mark.parametrize("step, update_every, name, value", [
    (-1, 5, "step", "-1"),
    (2.0, 5, "step", "2.0"),
    (True, 5, "step", "True"),
    (np.zeros(2, np.int32), 5, "step", "array"),
    (3, 0, "update_every", "0"),
])
def test_refresh_due_names_the_bad_argument(step, update_every, name, value):
  with pytest.raises(ValueError) as info:
    xsam_optax.refresh_due(step, update_every)
  message = str(info.value)
  assert message.startswith(name + " ") and value in message, message


def test_refresh_due_inside_jit_points_to_the_in_graph_schedule():
  with pytest.raises(ValueError, match="refresh=None"):
    jax.jit(lambda step: xsam_optax.refresh_due(step, 5))(3)


def test_refresh_due_accepts_host_integers():
  assert xsam_optax.refresh_due(np.int64(10), 5) is True
  assert xsam_optax.refresh_due(np.asarray(7), 5) is False


def test_array_for_a_static_setting_says_how_to_inject():
  # optax.inject_hyperparams turns every numeric argument into an array,
  # including the static ints; the error must say what to do about it.
  with pytest.raises(ValueError, match="static_args") as info:
    optax.inject_hyperparams(xsam_optax.eigenvector_correction)(
        alpha=0.1).init(PARAMS)
  assert "update_every" in str(info.value)
  # ...and doing what it says works.
  tx = optax.inject_hyperparams(
      xsam_optax.eigenvector_correction,
      static_args=("update_every", "num_iters", "seed"))(alpha=0.1)
  tx.init(PARAMS)


# ---------------------------------------------- arrays for float hyperparams


def test_array_hyperparameters_are_accepted():
  rho, alpha = jnp.asarray(0.3), jnp.asarray(0.7)
  for tx in (xsam_optax.sam_ascent(rho), xsam_optax.sam(SGD, rho=rho),
             xsam_optax.eigenvector_correction(alpha),
             xsam_optax.xsam(SGD, rho=rho, alpha=alpha)):
    tx.init(PARAMS)


def _xsam_update(rho, alpha):
  tx = xsam_optax.xsam(SGD, rho=rho, alpha=alpha, update_every=1)
  return tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS,
                   grad_fn=GRAD_FN)[0]


def test_traced_hyperparameters_match_python_floats():
  # Under jit rho and alpha are tracers, as inject_hyperparams passes them.
  traced = jax.jit(_xsam_update)
  got = traced(jnp.float32(0.3), jnp.float32(0.7))
  want = jax.jit(lambda: _xsam_update(0.3, 0.7))()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The values are really used: others give another update.
  other = traced(jnp.float32(0.0), jnp.float32(0.0))
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(other)[0])


def test_out_of_range_array_is_not_checked():
  # Documented: arrays (possibly traced) are not validated.
  xsam_optax.sam_ascent(jnp.asarray(-1.0))
  xsam_optax.eigenvector_correction(jnp.asarray(5.0))


# -------------------------------------------------------- update() arguments


TRANSFORMS = {
    "sam_ascent": lambda: xsam_optax.sam_ascent(0.05),
    "eigenvector_correction": lambda: xsam_optax.eigenvector_correction(0.2),
    "sam": lambda: xsam_optax.sam(SGD),
    "xsam": lambda: xsam_optax.xsam(SGD),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_update_without_grad_fn_shows_how_to_pass_it(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), state, PARAMS)
  message = str(info.value)
  assert "needs grad_fn" in message, message
  assert "tx.update(grads, state, params, grad_fn=grad_fn)" in message
  assert "jax.grad(" in message


@pytest.mark.parametrize("name", TRANSFORMS)
def test_update_without_params_says_so(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(GRAD_FN(PARAMS), state, grad_fn=GRAD_FN)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_non_callable_grad_fn(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="grad_fn must be callable"):
    tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=GRAD_FN(PARAMS))


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("wrong", [
    lambda g: [g["b"], g["w"]],                  # a list, not a dict
    lambda g: {"w": g["w"]},                      # a missing key
    lambda g: {"w": g["w"], "b": (g["b"],)},      # an extra level
])
def test_grad_fn_with_other_structure_names_both(name, wrong):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  bad_grad_fn = lambda p: wrong(GRAD_FN(p))
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), state, PARAMS, grad_fn=bad_grad_fn)
  message = str(info.value)
  assert "grad_fn" in message, message
  assert str(jax.tree.structure(PARAMS)) in message, message
  assert str(jax.tree.structure(bad_grad_fn(PARAMS))) in message, message


# ------------------------------------------------------- accumulated_grad_fn


@pytest.mark.parametrize("batch, num, message", [
    ((np.zeros((32, 4)), np.zeros(32)), 0,
     "num_microbatches must be >= 1, got 0."),
    ((np.zeros((32, 4)), np.zeros(32)), 2.0,
     "num_microbatches must be an int, got 2.0."),
    ((np.zeros((32, 4)), np.zeros(32)), 5,
     "num_microbatches must divide the batch size 32, got 5."),
    ((np.zeros((32, 4)), np.zeros(30)), 2,
     "leading sizes [30, 32]"),
    ({"x": np.zeros((32, 4)), "scale": np.float32(2.0)}, 2,
     "leading sizes [-1, 32]"),
])
def test_accumulated_grad_fn_bad_batch_or_count(batch, num, message):
  with pytest.raises(ValueError) as info:
    xsam_optax.accumulated_grad_fn(lambda p, b: 0.0, batch, num)
  assert message in str(info.value), str(info.value)


# ------------------------------------------------------- complex parameters


COMPLEX_PARAMS = {"w": jnp.array([1.0, -2.0]),
                  "layer": {"z": jnp.array([1.0 + 2.0j, 0.5j], jnp.complex64)}}
ALL_TRANSFORMS = {**TRANSFORMS,
                  "eigen_sam_ascent": lambda: xsam_optax.eigen_sam_ascent()}


def _says_split_the_leaf(message, owner, what):
  assert message.startswith(f"{owner}: {what}['layer']['z'] is complex64"), (
      message)
  assert "real and imaginary parts" in message, message
  assert "p['re'] + 1j * p['im']" in message, message


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_complex_parameters_are_refused_at_init_naming_the_leaf(name):
  # Accepted, they gave a complex cosine and eigenvalue and a direction
  # from unconjugated inner products, without an error.
  with pytest.raises(ValueError) as info:
    ALL_TRANSFORMS[name]().init(COMPLEX_PARAMS)
  owner = "eigen_sam_ascent" if name == "eigen_sam_ascent" else (
      "eigenvector_correction" if name == "eigenvector_correction"
      else "sam_ascent")  # the first member of sam() and xsam()
  _says_split_the_leaf(str(info.value), f"{owner}.init", "params")


@pytest.mark.parametrize("name", ALL_TRANSFORMS)
def test_complex_parameters_or_updates_are_refused_at_update(name):
  tx = ALL_TRANSFORMS[name]()
  real = jax.tree.map(jnp.real, COMPLEX_PARAMS)
  state = tx.init(real)  # a state from real parameters of the same shapes
  grads = jax.tree.map(jnp.ones_like, real)
  for params, updates, what in ((COMPLEX_PARAMS, grads, "params"),
                                (real, COMPLEX_PARAMS, "updates")):
    with pytest.raises(ValueError) as info:
      tx.update(updates, state, params, grad_fn=lambda p: grads)
    assert ".update: " + what + "['layer']['z'] is complex64" in str(
        info.value), str(info.value)


@pytest.mark.parametrize("estimator", [xsam_optax.power_iteration,
                                       xsam_optax.lanczos])
def test_estimators_refuse_a_complex_start_vector(estimator):
  with pytest.raises(ValueError, match=r"v0\['z'\] is complex64"):
    estimator(_matvec_never_called, {"z": jnp.ones(3, jnp.complex64)},
              num_iters=2)


def test_split_complex_parameters_train_as_the_message_says():
  # |z - c|^2 with z complex: as two real leaves, X-SAM runs and its
  # eigenvalue is that of the real 2x2 Hessian, 2 (float64 oracle: the
  # Hessian of |re + i im - c|^2 is 2 I).
  c = jnp.array([1.0 - 1.0j, 2.0j], jnp.complex64)

  def loss(p):
    z = p["re"] + 1j * p["im"]
    return jnp.sum(jnp.abs(z - c) ** 2)

  params = {"re": jnp.zeros(2), "im": jnp.zeros(2)}
  grad_fn = jax.grad(loss)
  tx = xsam_optax.xsam(SGD, update_every=1)
  _, state = tx.update(grad_fn(params), tx.init(params), params,
                       grad_fn=grad_fn)
  eigenvalue = optax.tree.get(state, "eigenvalue")
  assert eigenvalue.dtype == jnp.float32
  np.testing.assert_allclose(float(eigenvalue), 2.0, rtol=1e-6)
