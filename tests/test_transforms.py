import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from _oracles import dense_hessian, flat, mlp_problem


def run(tx, params, loss, batch, steps, **update_kwargs):
  """Trains with a jitted step; returns params, state and every update."""
  state = tx.init(params)
  grad_fn = jax.grad(lambda p: loss(p, batch))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn, **update_kwargs)
    return optax.apply_updates(params, updates), state, updates

  history = []
  for _ in range(steps):
    params, state, updates = step(params, state)
    history.append((updates, state))
  assert step._cache_size() == 1
  return params, state, history


def test_sam_ascent_chain_matches_optax_contrib_sam(x64):
  params, loss, batch = mlp_problem()
  rho, lr = 0.05, 0.1
  ours, _, _ = run(optax.chain(xsam_optax.sam_ascent(rho), optax.sgd(lr)),
                   params, loss, batch, steps=5)
  theirs_tx = optax.contrib.sam(
      optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2, opaque_mode=True)
  state = theirs_tx.init(params)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  theirs = params
  for _ in range(5):
    updates, state = theirs_tx.update(
        grad_fn(theirs), state, theirs, grad_fn=lambda p, _: grad_fn(p))
    theirs = optax.apply_updates(theirs, updates)
  np.testing.assert_allclose(flat(ours), flat(theirs), rtol=1e-12)
  assert not np.allclose(flat(ours), flat(params))


def test_correction_equals_the_formula_with_the_stored_eigenvector(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  alpha = 0.3
  for rule in ("reference", "sign_invariant"):
    for normalize in (True, False):
      tx = xsam_optax.eigenvector_correction(
          alpha, num_iters=3, rule=rule, normalize=normalize)
      g = grad_fn(params)
      updates, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
      v = flat(optax.tree.get(state, "eigenvector"))
      g = flat(g)
      g_hat = g / np.linalg.norm(g)
      c = g_hat @ v
      factor = c if rule == "sign_invariant" else np.sign(g @ v) * c
      expected = g_hat - alpha * factor * v
      if not normalize:
        expected *= np.linalg.norm(g)
      np.testing.assert_allclose(flat(updates), expected, rtol=1e-12)
      np.testing.assert_allclose(optax.tree.get(state, "cos_angle"), c,
                                 rtol=1e-12)


def test_a_callable_rule_sets_the_coefficient_of_the_eigenvector(x64):
  """rule=(cos, alpha) -> coefficient: g_hat - coefficient * v, both paths."""
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  g = grad_fn(params)
  rule = lambda cos, alpha: alpha * cos ** 3 + 0.25  # nothing the named rules give
  for normalize in (True, False):
    tx = xsam_optax.eigenvector_correction(0.7, rule=rule, num_iters=2,
                                           normalize=normalize)
    updates, state = jax.jit(
        lambda g, s: tx.update(g, s, params, grad_fn=grad_fn))(g, tx.init(params))
    v, gf = flat(state.eigenvector), flat(g)
    c = gf @ v / np.linalg.norm(gf)
    expected = gf / np.linalg.norm(gf) - (0.7 * c ** 3 + 0.25) * v
    if not normalize:
      expected *= np.linalg.norm(gf)
    np.testing.assert_allclose(flat(updates), expected, rtol=1e-12)
  with pytest.raises(ValueError, match="rule must return a scalar"):
    bad = xsam_optax.eigenvector_correction(rule=lambda cos, alpha: jnp.ones(2))
    bad.update(g, bad.init(params), params, grad_fn=grad_fn)


def state_with_eigenvector(tx, params, eigenvector):
  return tx.init(params)._replace(eigenvector=eigenvector)


@pytest.mark.parametrize("rule", ["reference", "sign_invariant"])
def test_sign_invariance_of_the_update(x64, rule):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.eigenvector_correction(0.5, rule=rule)
  v = tx.init(params).eigenvector
  minus_v = jax.tree.map(jnp.negative, v)
  g = grad_fn(params)
  plus, _ = tx.update(g, state_with_eigenvector(tx, params, v), params,
                      grad_fn=grad_fn, refresh=False)
  minus, _ = tx.update(g, state_with_eigenvector(tx, params, minus_v), params,
                       grad_fn=grad_fn, refresh=False)
  if rule == "sign_invariant":
    np.testing.assert_allclose(flat(plus), flat(minus), rtol=1e-13)
  else:
    assert np.max(np.abs(flat(plus) - flat(minus))) > 1e-3


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_stored_eigenvector_matches_dense_top_eigenvector(x64, method):
  params, loss, batch = mlp_problem()
  hessian = dense_hessian(lambda p: loss(p, batch), params)
  values, vectors = np.linalg.eigh(hessian)
  # Power iteration finds the largest magnitude, Lanczos the largest value.
  top = np.argmax(np.abs(values)) if method == "power" else -1
  tx = xsam_optax.eigenvector_correction(num_iters=len(values) if
                                         method == "lanczos" else 300,
                                         method=method)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  _, state = jax.jit(lambda g, s: tx.update(g, s, params, grad_fn=grad_fn))(
      grad_fn(params), tx.init(params))
  v = flat(state.eigenvector)
  assert abs(v @ vectors[:, top]) > 0.9999
  np.testing.assert_allclose(state.eigenvalue, values[top], rtol=1e-6)


@pytest.mark.parametrize("make", [xsam_optax.eigenvector_correction,
                                  xsam_optax.eigen_sam_ascent])
def test_fresh_state_says_nothing_is_estimated_yet(make):
  """As the state's docs say: before the first refresh the eigenvalue is 0, the
  residual -1 ("unknown", not "converged"), the eigenvector a unit vector."""
  params, _, _ = mlp_problem(dtype=jnp.float32)
  state = make().init(params)
  assert int(state.count) == 0
  assert float(state.eigenvalue) == 0.0 and float(state.cos_angle) == 0.0
  assert float(state.residual) == -1.0
  np.testing.assert_allclose(np.linalg.norm(flat(state.eigenvector)), 1.0,
                             rtol=1e-6)
  chex.assert_trees_all_equal_shapes_and_dtypes(state.eigenvector, params)


def test_refresh_happens_exactly_every_update_every_steps(x64):
  params, loss, batch = mlp_problem()
  tx = xsam_optax.xsam(optax.sgd(0.05), update_every=3, num_iters=2)
  _, _, history = run(tx, params, loss, batch, steps=10)
  previous = tx.init(params)
  refreshed = []
  for step, (_, state) in enumerate(history):
    before_v = flat(optax.tree.get(previous, "eigenvector"))
    after_v = flat(optax.tree.get(state, "eigenvector"))
    changed_v = not np.array_equal(before_v, after_v)
    changed_value = (optax.tree.get(previous, "eigenvalue")
                     != optax.tree.get(state, "eigenvalue"))
    assert changed_v == changed_value, step
    if changed_v:
      refreshed.append(step)
    previous = state
  assert refreshed == [0, 3, 6, 9]
  assert int(optax.tree.get(history[-1][1], "count")) == 10
  # The host's copy of the schedule names the same steps, the period read
  # from the transform itself.
  assert [s for s in range(10) if xsam_optax.refresh_due(s, 3)] == refreshed
  schedule = xsam_optax.refresh_schedule(tx)
  assert [s for s in range(10) if schedule(s)] == refreshed


def quadratic(sharp=10.0, flat_=1.0):
  curvature = jnp.array([sharp, flat_])
  loss = lambda p, batch=None: 0.5 * jnp.sum(curvature * p["w"] ** 2)
  return loss


def normalized_sam_direction(params, rho, grad_fn):
  g = grad_fn(params)["w"]
  g_adv = grad_fn({"w": params["w"] + rho * g / jnp.linalg.norm(g)})["w"]
  return g_adv / jnp.linalg.norm(g_adv)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_quadratic_sign_invariant_rule_damps_the_sharp_component(x64, sign):
  loss = quadratic()
  grad_fn = jax.grad(loss)
  rho, lr, alpha = 0.05, 0.3, 0.5
  sharp = jnp.array([sign, 0.0])  # the top eigenvector, either sign
  tx = xsam_optax.xsam(optax.sgd(lr), rho=rho, alpha=alpha,
                       rule="sign_invariant", num_iters=10)
  state = tx.init({"w": jnp.zeros(2)})
  step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
  sam_direction_at = jax.jit(
      lambda p: normalized_sam_direction(p, rho, grad_fn))
  xsam_params = sam_params = {"w": jnp.array([0.4, 1.0])}
  xsam_x, sam_x = [], []
  for _ in range(30):
    updates, state = step(xsam_params, state)
    v = optax.tree.get(state, "eigenvector")["w"]
    assert abs(v @ sharp) > 1 - 1e-9
    sam_direction = sam_direction_at(xsam_params)
    # Every step: (1 - alpha) times SAM's sharp component at the same point.
    np.testing.assert_allclose(-updates["w"][0] / lr,
                               (1 - alpha) * sam_direction[0], rtol=1e-9)
    xsam_params = optax.apply_updates(xsam_params, updates)
    xsam_x.append(float(xsam_params["w"][0]))
    sam_params = {"w": sam_params["w"]
                  - lr * sam_direction_at(sam_params)}
    sam_x.append(float(sam_params["w"][0]))
  # Normalised SAM keeps oscillating across the sharp valley with steps of
  # length lr; X-SAM's sharp steps are (1 - alpha) as long, and so is the swing.
  assert np.ptp(sam_x[-10:]) > 0.2
  np.testing.assert_allclose(np.ptp(xsam_x[-10:]),
                             (1 - alpha) * np.ptp(sam_x[-10:]), rtol=0.05)


def test_quadratic_reference_rule_depends_on_the_sign_of_v(x64):
  loss = quadratic()
  grad_fn = jax.grad(loss)
  alpha = 0.5
  tx = xsam_optax.eigenvector_correction(alpha)
  params = {"w": jnp.array([0.4, 1.0])}
  e_x = {"w": jnp.array([1.0, 0.0])}
  minus_e_x = {"w": jnp.array([-1.0, 0.0])}
  g = grad_fn(params)
  c = g["w"][0] / jnp.linalg.norm(g["w"])  # > 0: g points along +e_x
  along, _ = tx.update(g, state_with_eigenvector(tx, params, e_x), params,
                       grad_fn=grad_fn, refresh=False)
  against, _ = tx.update(g, state_with_eigenvector(tx, params, minus_e_x),
                         params, grad_fn=grad_fn, refresh=False)
  np.testing.assert_allclose(along["w"][0], (1 - alpha) * c, rtol=1e-12)
  np.testing.assert_allclose(against["w"][0], (1 + alpha) * c, rtol=1e-12)
  np.testing.assert_allclose(along["w"][1], against["w"][1], rtol=1e-12)


def test_alpha_zero_is_sam_followed_by_normalisation(x64):
  params, loss, batch = mlp_problem()
  xsam_params, _, _ = run(
      xsam_optax.xsam(optax.sgd(0.1, momentum=0.9), alpha=0.0), params, loss,
      batch, steps=6)
  sam_params, _, _ = run(
      optax.chain(xsam_optax.sam_ascent(0.05), optax.contrib.normalize(),
                  optax.sgd(0.1, momentum=0.9)), params, loss, batch, steps=6)
  np.testing.assert_allclose(flat(xsam_params), flat(sam_params), rtol=1e-12)


def test_xsam_is_exactly_the_chain_of_its_pieces(x64):
  params, loss, batch = mlp_problem()
  options = dict(update_every=2, num_iters=3, method="lanczos")
  whole, _, _ = run(xsam_optax.xsam(optax.adam(1e-2), rho=0.1, alpha=0.4,
                                    **options), params, loss, batch, steps=5)
  chained, _, _ = run(optax.chain(
      xsam_optax.sam_ascent(0.1),
      xsam_optax.eigenvector_correction(0.4, **options),
      optax.adam(1e-2)), params, loss, batch, steps=5)
  np.testing.assert_array_equal(flat(whole), flat(chained))


def test_adaptive_ascent_matches_asam_formula(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  rho = 0.5
  tx = xsam_optax.sam_ascent(rho, adaptive=True)
  g = grad_fn(params)
  updates, _ = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  w, g_flat = flat(params), flat(g)
  eps = rho * w ** 2 * g_flat / np.linalg.norm(np.abs(w) * g_flat)
  _, unravel = jax.flatten_util.ravel_pytree(params)
  np.testing.assert_allclose(flat(updates), flat(grad_fn(unravel(w + eps))),
                             rtol=1e-12)


@pytest.mark.parametrize("update_every, has_cond", [(1, False), (2, True)])
def test_only_a_real_schedule_compiles_a_cond(update_every, has_cond):
  """Refreshing every step needs no lax.cond (slow on XLA:CPU); the
  update_every=2 control shows the check can see one."""
  params, loss, batch = mlp_problem(dtype=jnp.float32)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.xsam(optax.sgd(0.05), update_every=update_every)
  step = lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
  text = jax.jit(step).lower(params, tx.init(params)).as_text()
  assert ("stablehlo.case" in text or "stablehlo.if" in text) == has_cond


def test_every_step_schedule_equals_host_refresh_every_step(x64):
  params, loss, batch = mlp_problem()
  grad_fn = jax.grad(lambda p: loss(p, batch))
  tx = xsam_optax.xsam(optax.sgd(0.05), update_every=1, method="power",
                       num_iters=1)
  scheduled = host = params
  s_scheduled = s_host = tx.init(params)
  for _ in range(3):
    u, s_scheduled = tx.update(grad_fn(scheduled), s_scheduled, scheduled,
                               grad_fn=grad_fn)
    scheduled = optax.apply_updates(scheduled, u)
    u, s_host = tx.update(grad_fn(host), s_host, host, grad_fn=grad_fn,
                          refresh=True)
    host = optax.apply_updates(host, u)
  np.testing.assert_array_equal(flat(scheduled), flat(host))
  assert optax.tree.get(s_scheduled, "eigenvalue") != 0.0


def test_host_chosen_refresh_equals_the_scheduled_one(x64):
  params, loss, batch = mlp_problem()
  tx = xsam_optax.xsam(optax.sgd(0.05), update_every=3, num_iters=3)
  scheduled, scheduled_state, _ = run(tx, params, loss, batch, steps=7)
  state = tx.init(params)
  grad_fn = jax.grad(lambda p: loss(p, batch))
  step = jax.jit(lambda p, s, refresh: tx.update(
      grad_fn(p), s, p, grad_fn=grad_fn, refresh=refresh),
      static_argnames="refresh")
  host = params
  for i in range(7):
    updates, state = step(host, state,
                          refresh=xsam_optax.refresh_due(i, update_every=3))
    host = optax.apply_updates(host, updates)
  np.testing.assert_allclose(flat(host), flat(scheduled), rtol=1e-12)
  np.testing.assert_allclose(optax.tree.get(state, "eigenvalue"),
                             optax.tree.get(scheduled_state, "eigenvalue"))


def test_nnx_optimizer_forwards_grad_fn_and_matches_the_functional_loop():
  from flax import nnx

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(3, 6, rngs=rngs)
      self.out = nnx.Linear(6, 1, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
  y = jnp.cos(x.sum(axis=1, keepdims=True))
  loss_fn = lambda model: jnp.mean((model(x) - y) ** 2)
  tx = xsam_optax.xsam(optax.sgd(0.05), update_every=2, num_iters=3)

  model = Net(nnx.Rngs(0))
  graphdef, start, rest = nnx.split(model, nnx.Param, ...)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(params):
      copy = nnx.merge(graphdef, params, rest, copy=True)
      return nnx.as_pure(nnx.state(nnx.grad(loss_fn)(copy), nnx.Param))

    optimizer.update(model, nnx.grad(loss_fn)(model), grad_fn=grad_fn)

  pure_loss = lambda p: loss_fn(nnx.merge(graphdef, p, rest, copy=True))
  params, state, _ = run(tx, nnx.as_pure(start), lambda p, _: pure_loss(p),
                         None, steps=5)
  for _ in range(5):
    nnx_step(model, optimizer)
  np.testing.assert_allclose(
      flat(nnx.as_pure(nnx.state(model, nnx.Param))), flat(params),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      optax.tree.get(nnx.as_pure(optimizer.opt_state), "eigenvalue"),
      optax.tree.get(state, "eigenvalue"), rtol=1e-5)
