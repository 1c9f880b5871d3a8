"""What a demanding user tries next: unusual pytrees, integer leaves, an
estimator of their own, hyperparameters injected at run time, a CLI run
whose results cannot be written, and what the composition check costs.

Oracles: the same leaves in a plain dict, the same tree without its integer
leaves, the update formulas restated (``_oracles.oracle_correct``), and the
library's own built-in estimator where a user's must coincide with it.
"""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from _oracles import Counted, flat, oracle_correct
from xsam_optax.train import cli
from xsam_optax.train import report

RHO, ALPHA, LR = 0.1, 0.5, 0.1


def loss(w, b):
  return jnp.sum(w ** 4) + jnp.sum(jnp.cos(3.0 * b))


W, B = np.array([1.0, -2.0]), np.array([0.5, 0.1, -0.3])
PARAMS = {"w": jnp.asarray(W, jnp.float32), "b": jnp.asarray(B, jnp.float32)}
GRAD_FN = jax.grad(lambda p: loss(p["w"], p["b"]))

ASCENTS = {
    "sam": lambda: xsam_optax.sam(optax.sgd(LR), rho=RHO),
    "xsam": lambda: xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                                    num_iters=2),
    "eigen_sam_ascent": lambda: optax.chain(
        xsam_optax.eigen_sam_ascent(RHO, ALPHA, update_every=1, num_iters=2),
        optax.sgd(LR)),
}


def run(tx, params, grad_fn, steps=2, **extra):
  """``steps`` jitted updates at fixed params: the last updates and state."""
  step = jax.jit(lambda s: tx.update(grad_fn(params), s, params,
                                     grad_fn=grad_fn, **extra))
  state = tx.init(params)
  for _ in range(steps):
    updates, state = step(state)
  return updates, state


def assert_leaves_close(got, want, rtol=1e-6, atol=1e-7):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol,
                               atol=atol)


# ------------------------------------------ 1. registered pytree classes


class Pair:
  """A parameter container registered with JAX and nothing else: no
  ``__eq__``, so two instances compare by identity."""

  def __init__(self, w, b):
    self.w, self.b = w, b


jax.tree_util.register_pytree_node(
    Pair, lambda p: ((p.w, p.b), None), lambda _, children: Pair(*children))


@pytest.mark.parametrize("name", ASCENTS)
def test_a_registered_pytree_class_gets_the_update_of_the_same_leaves_in_a_dict(
    name):
  # Keys in the class's leaf order, so that the random start vector, drawn
  # leaf by leaf, is the same.
  as_dict = {"0w": PARAMS["w"], "1b": PARAMS["b"]}
  as_class = Pair(PARAMS["w"], PARAMS["b"])
  dict_updates, dict_state = run(
      ASCENTS[name](), as_dict, jax.grad(lambda p: loss(p["0w"], p["1b"])))
  class_updates, class_state = run(
      ASCENTS[name](), as_class, jax.grad(lambda p: loss(p.w, p.b)))
  assert isinstance(class_updates, Pair)
  assert_leaves_close(class_updates, dict_updates)
  assert_leaves_close(class_state, dict_state)


# ------------------------------------------------------- 2. integer leaves


def with_counter(params):
  """``params`` plus the leaves a user keeps beside the weights."""
  return {**params, "step": jnp.asarray(7, jnp.int32),
          "frozen": jnp.asarray(True)}


def counter_loss(p):
  # The integer leaves are read, as a user's step counter would be.
  return loss(p["w"], p["b"]) * (1.0 + 0.0 * p["step"]) + 0.0 * p["frozen"]


COUNTER_GRAD_FN = jax.grad(counter_loss, allow_int=True)  # float0 for ints
PIECES = {  # the ascents without a base optimizer: their own output
    "sam_ascent": lambda: xsam_optax.sam_ascent(RHO),
    "sam_ascent+correction": lambda: optax.chain(
        xsam_optax.sam_ascent(RHO, adaptive=True),
        xsam_optax.eigenvector_correction(ALPHA, num_iters=2,
                                          method="lanczos")),
    "eigen_sam_ascent": lambda: xsam_optax.eigen_sam_ascent(
        RHO, ALPHA, update_every=1, num_iters=2),
}


@pytest.mark.parametrize("name", PIECES)
def test_integer_leaves_pass_through_and_the_float_leaves_get_their_own_update(
    name):
  # Oracle: the same tree without the integer leaves.
  params = with_counter(PARAMS)
  curvature_fn = (xsam_optax.finite_difference_fn(COUNTER_GRAD_FN)
                  if "correction" in name else None)
  updates, state = run(PIECES[name](), params, COUNTER_GRAD_FN,
                       check_incoming=True,
                       **({"curvature_fn": curvature_fn} if curvature_fn
                          else {}))
  plain_curvature = (xsam_optax.finite_difference_fn(GRAD_FN)
                     if curvature_fn else None)
  want, want_state = run(PIECES[name](), PARAMS, GRAD_FN, check_incoming=True,
                         **({"curvature_fn": plain_curvature}
                            if plain_curvature else {}))
  for key in ("step", "frozen"):  # the incoming float0 gradients, as they came
    assert updates[key].dtype == jax.dtypes.float0
  assert_leaves_close({k: updates[k] for k in PARAMS}, want)
  eigenvector = optax.tree.get(state, "eigenvector")
  if eigenvector is not None:
    assert eigenvector["step"] is None and eigenvector["frozen"] is None
    assert_leaves_close(state, want_state)


def _outputs(p):
  """Outputs whose loss below is ``loss``: a Gauss-Newton split of it."""
  scale = 1.0 + 0.0 * p.get("step", 0)  # reads the counter, if there is one
  return jnp.concatenate([p["w"] ** 2, jnp.cos(3.0 * p["b"])]) * scale


def _output_loss(z):
  return jnp.sum(z[:2] ** 2) + jnp.sum(z[2:])


CURVATURES = {
    "hessian_fn": lambda grad_fn: xsam_optax.hessian_fn(grad_fn),
    "gauss_newton_fn": lambda grad_fn: xsam_optax.gauss_newton_fn(
        _outputs, _output_loss),
}


@pytest.mark.parametrize("name", CURVATURES)
def test_integer_leaves_with_exact_curvature_products(name):
  # Exact products differentiate through every leaf: jax.jvp needs a float0
  # tangent at an integer leaf. Oracle: the tree without its integer leaves.
  np.testing.assert_allclose(float(_output_loss(_outputs(PARAMS))),
                             float(loss(PARAMS["w"], PARAMS["b"])), rtol=1e-6)
  make = lambda: optax.chain(
      xsam_optax.sam_ascent(RHO),
      xsam_optax.eigenvector_correction(ALPHA, update_every=1, num_iters=3))
  updates, state = run(make(), with_counter(PARAMS), COUNTER_GRAD_FN,
                       curvature_fn=CURVATURES[name](COUNTER_GRAD_FN))
  want, want_state = run(make(), PARAMS, GRAD_FN,
                         curvature_fn=CURVATURES[name](GRAD_FN))
  assert updates["step"].dtype == jax.dtypes.float0
  assert_leaves_close({k: updates[k] for k in PARAMS}, want)
  assert_leaves_close(state, want_state)
  assert float(optax.tree.get(state, "eigenvalue")) > 1.0  # a real refresh


@pytest.mark.parametrize("name", ["sam", "xsam", "eigen_sam_ascent"])
def test_grad_fn_of_another_structure_with_integer_leaves_names_both(name):
  params = with_counter(PARAMS)
  tx = ASCENTS[name]()
  floats_only = lambda p: {k: v for k, v in COUNTER_GRAD_FN(p).items()
                           if k in PARAMS}  # drops the integer leaves
  with pytest.raises(ValueError) as info:
    tx.update(COUNTER_GRAD_FN(params), tx.init(params), params,
              grad_fn=floats_only)
  message = str(info.value)
  assert "grad_fn returned a pytree whose structure differs from params" in (
      message), message
  assert str(jax.tree.structure(params)) in message, message
  assert str(jax.tree.structure(floats_only(params))) in message, message


def test_integer_leaves_with_zero_gradients_train_as_with_plain_optax():
  # Plain optax accepts a zero gradient of the leaf's own dtype; so must
  # xsam(...), leaving the counter where it was.
  params = with_counter(PARAMS)

  def grad_fn(p):
    return jax.tree.map(
        lambda g, x: jnp.zeros_like(x) if g.dtype == jax.dtypes.float0 else g,
        COUNTER_GRAD_FN(p), p)

  def train(params, grad_fn):
    tx = xsam_optax.xsam(optax.sgd(LR, momentum=0.9), rho=RHO, alpha=ALPHA)
    return _train_three_steps(tx, params, grad_fn)

  trained = train(params, grad_fn)
  assert int(trained["step"]) == 7 and bool(trained["frozen"]) is True
  assert trained["step"].dtype == jnp.int32
  assert_leaves_close({k: trained[k] for k in PARAMS}, train(PARAMS, GRAD_FN))


def _train_three_steps(tx, params, grad_fn):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state)
  return params


@pytest.mark.parametrize("name", ["sam", "xsam"])
def test_float0_gradients_train_through_sam_and_xsam(name):
  # jax.grad(..., allow_int=True) gives the counter a float0 gradient,
  # which optax's SGD cannot compute with (it failed inside optax). The base
  # decays weights and keeps momentum; the counter must not move. Oracle:
  # the same tree without its integer leaves.
  base = lambda: optax.chain(optax.add_decayed_weights(0.01),
                             optax.sgd(LR, momentum=0.9))
  make = {"sam": lambda: xsam_optax.sam(base(), rho=RHO),
          "xsam": lambda: xsam_optax.xsam(base(), rho=RHO, alpha=ALPHA)}[name]
  trained = _train_three_steps(make(), with_counter(PARAMS), COUNTER_GRAD_FN)
  assert int(trained["step"]) == 7 and trained["step"].dtype == jnp.int32
  assert bool(trained["frozen"]) is True and trained["frozen"].dtype == bool
  assert_leaves_close({k: trained[k] for k in PARAMS},
                      _train_three_steps(make(), PARAMS, GRAD_FN))


# ------------------------------------------------- 3. a user's estimator


def _power_2(matvec, v0):
  return xsam_optax.power_iteration(matvec, v0, num_iters=2)


def test_a_methods_eigenvector_of_another_norm_is_normalised():
  def too_long(matvec, v0):
    result = _power_2(matvec, v0)
    return result._replace(
        eigenvector=jax.tree.map(lambda x: 2.2 * x, result.eigenvector))

  make = lambda method: xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                                        method=method)
  updates, state = run(make(too_long), PARAMS, GRAD_FN)
  want_updates, want_state = run(make(_power_2), PARAMS, GRAD_FN)
  eigenvector = optax.tree.get(state, "eigenvector")
  assert np.linalg.norm(flat(eigenvector)) == pytest.approx(1.0, abs=1e-6)
  assert_leaves_close(eigenvector, optax.tree.get(want_state, "eigenvector"))
  # A step of -LR times a unit-norm-ish direction, not 2.2 times longer.
  assert_leaves_close(updates, want_updates)


def test_a_method_returning_a_tuple_is_told_what_to_return():
  def as_tuple(matvec, v0):
    return tuple(_power_2(matvec, v0))

  tx = xsam_optax.eigenvector_correction(ALPHA, method=as_tuple)
  with pytest.raises(ValueError) as info:
    tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS, grad_fn=GRAD_FN)
  assert str(info.value).startswith(
      "method must return an xsam_optax.EigenResult(eigenvalue, eigenvector, "
      "residual, num_matvecs), got a tuple of length 4.")


# ----------------------- 5. the results table survives a failed write


def test_the_table_is_printed_before_writing_files_can_fail(monkeypatch,
                                                            tmp_path):
  def full_disk(path, metrics):
    raise OSError(28, "No space left on device", path)

  monkeypatch.setattr(report, "write_metrics", full_disk)
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(OSError,
                                                      match="No space"):
    cli.main(["--optimizer", "sgd", "--dataset", "mnist1d", "--model", "mlp",
              "--train-size", "64", "--batch-size", "64", "--epochs", "1",
              "--eig-iters", "2", "--eval-batch-size", "64", "--no-progress",
              "--out", str(tmp_path)])
  lines = out.getvalue().splitlines()
  header = next(i for i, line in enumerate(lines)
                if line.startswith("optimizer"))
  assert lines[header].split()[:3] == ["optimizer", "test", "acc"]
  assert lines[header + 1].split()[0] == "sgd"
  assert not (tmp_path / "metrics.json").exists()


# ------------------------------ 6. hyperparameters injected at run time


def _injected_xsam(**hyperparams):
  tx = optax.inject_hyperparams(
      xsam_optax.xsam, static_args=("update_every", "num_iters", "seed"))(
          optax.sgd(LR), rho=RHO, alpha=ALPHA, num_iters=2)
  state = tx.init(PARAMS)
  for name, value in hyperparams.items():
    state.hyperparams[name] = jnp.float32(value)
  return tx, state


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_injected_alpha_removes_nothing(bad):
  tx, state = _injected_xsam(alpha=bad)
  g = GRAD_FN(PARAMS)
  updates, state = jax.jit(lambda s: tx.update(g, s, PARAMS,
                                               grad_fn=GRAD_FN))(state)
  g_adv = GRAD_FN(jax.tree.map(
      lambda p, x: p + np.float32(RHO / np.linalg.norm(flat(g))) * x,
      PARAMS, g))
  v = state.inner_state[1].eigenvector
  # alpha acts as 0: the normalised SAM gradient, nothing along v removed.
  np.testing.assert_allclose(flat(updates),
                             -LR * oracle_correct(g_adv, v, 0.0),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_a_non_finite_injected_rho_gives_the_gradient_at_params(bad):
  g = GRAD_FN(PARAMS)
  tx, state = _injected_xsam(rho=bad)
  updates, state = jax.jit(lambda s: tx.update(g, s, PARAMS,
                                               grad_fn=GRAD_FN))(state)
  v = state.inner_state[1].eigenvector
  np.testing.assert_allclose(flat(updates), -LR * oracle_correct(g, v, ALPHA),
                             rtol=1e-5, atol=1e-7)
  ascent = optax.inject_hyperparams(xsam_optax.sam_ascent)(rho=RHO)
  state = ascent.init(PARAMS)
  state.hyperparams["rho"] = jnp.float32(bad)
  updates, _ = ascent.update(g, state, PARAMS, grad_fn=GRAD_FN)
  np.testing.assert_allclose(flat(updates), flat(g), rtol=1e-6)


@pytest.mark.parametrize("which", ["rho", "alpha"])
def test_a_non_finite_injected_eigen_sam_setting_acts_as_zero(which):
  g = GRAD_FN(PARAMS)
  tx = optax.inject_hyperparams(
      xsam_optax.eigen_sam_ascent,
      static_args=("update_every", "num_iters", "seed"))(
          RHO, ALPHA, update_every=1, num_iters=2)
  state = tx.init(PARAMS)
  state.hyperparams[which] = jnp.float32(np.nan)
  updates, _ = tx.update(g, state, PARAMS, grad_fn=GRAD_FN)
  # alpha -> 0 is plain SAM; rho -> 0 is the gradient at params.
  point = (PARAMS if which == "rho" else jax.tree.map(
      lambda p, x: p + np.float32(RHO / np.linalg.norm(flat(g))) * x,
      PARAMS, g))
  np.testing.assert_allclose(flat(updates), flat(GRAD_FN(point)), rtol=1e-5,
                             atol=1e-7)


def test_a_callable_rule_read_as_a_schedule_is_told_to_be_static():
  # optax.inject_hyperparams calls every callable argument with the step
  # count. A rule that survives the call (a default for alpha) returns an
  # array, which xsam then gets as its rule.
  rule = lambda cos, alpha=0.5: alpha * cos
  with pytest.raises(ValueError) as info:
    optax.inject_hyperparams(
        xsam_optax.xsam, static_args=("update_every", "num_iters", "seed"))(
            optax.sgd(LR), rule=rule).init(PARAMS)
  assert "name a callable rule in static_args, e.g. static_args=('rule',)" in (
      str(info.value))
  # Doing what it says works, and equals the named rule it restates.
  static = ("update_every", "num_iters", "seed", "rule", "method")
  injected = optax.inject_hyperparams(xsam_optax.xsam, static_args=static)(
      optax.sgd(LR), rho=RHO, alpha=ALPHA, rule=rule, method=_power_2)
  named = xsam_optax.xsam(optax.sgd(LR), rho=RHO, alpha=ALPHA,
                          rule="sign_invariant", num_iters=2)
  assert_leaves_close(run(injected, PARAMS, GRAD_FN)[0],
                      run(named, PARAMS, GRAD_FN)[0])


# ------------------------- 7. the composition check is opt-in: what it costs


@pytest.mark.parametrize("check, calls", [(False, 1), (True, 2)])
def test_sam_ascent_evaluates_grad_fn_at_params_only_when_asked(check, calls):
  counted = Counted(GRAD_FN)
  tx = xsam_optax.sam_ascent(RHO)
  tx.update(GRAD_FN(PARAMS), tx.init(PARAMS), PARAMS, grad_fn=counted,
            check_incoming=check)
  assert counted.calls == calls
