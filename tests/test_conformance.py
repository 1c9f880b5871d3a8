"""optax conformance of the public transforms, the way users run them.

sam_ascent, eigenvector_correction, sam and xsam: extra keyword arguments,
no recompilation, bfloat16, stable state types (also under ``lax.cond``),
``optax.inject_hyperparams``, ``optax.apply_if_finite``, ``lax.scan`` loops,
and micro-batch accumulation with :func:`xsam_optax.accumulated_grad_fn`.
Oracles: the update formulas restated in NumPy, and the full-batch gradient.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from _oracles import flat, mlp_problem, oracle_correct

PARAMS, LOSS_FN, BATCH = mlp_problem(dtype=jnp.float32, din=4, hidden=6)
GRAD_FN = jax.jit(jax.grad(lambda p: LOSS_FN(p, BATCH)))

TRANSFORMS = {
    "sam_ascent": lambda **kw: xsam_optax.sam_ascent(0.1, **kw),
    "eigenvector_correction": lambda **kw: xsam_optax.eigenvector_correction(
        0.5, update_every=2, num_iters=2, **kw),
    "sam": lambda **kw: xsam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.1),
    "xsam": lambda **kw: xsam_optax.xsam(
        optax.sgd(0.1, momentum=0.9), rho=0.1, alpha=0.5, update_every=2,
        num_iters=2, **kw),
    # Shares the tracking machinery of eigenvector_correction; checked at
    # trace level only (types, extras), to keep the suite fast.
    "eigen_sam_ascent": lambda **kw: xsam_optax.eigen_sam_ascent(
        0.1, 0.3, update_every=2, num_iters=2, **kw),
}
COMPILED = ("sam_ascent", "eigenvector_correction", "sam", "xsam")


def oracle_ascent(params, g, rho, grad_fn=GRAD_FN):
  """grad L(theta + rho g / ||g||), written out without the library."""
  norm = np.linalg.norm(flat(g))
  return grad_fn(jax.tree.map(
      lambda p, d: np.asarray(p) + np.float32(rho / norm) * np.asarray(d),
      params, g))


def to_bf16(tree):
  return jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x).astype(jnp.bfloat16)), tree)


def types(tree):
  """Structure plus (shape, dtype, weak_type) of every leaf."""
  return (jax.tree.structure(tree),
          [(x.shape, x.dtype, getattr(x, "weak_type", False))
           for x in jax.tree.leaves(tree)])


def make_step(tx):
  """A training step of ``tx`` on LOSS_FN, to be jitted."""

  def step(params, state, batch):
    grad_fn = jax.grad(lambda p: LOSS_FN(p, batch))
    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  return step


@functools.lru_cache(maxsize=None)
def train_step(name):
  """(tx, jitted step) for one transform, shared by the tests below."""
  tx = TRANSFORMS[name]()
  return tx, jax.jit(make_step(tx))


def batches(num):
  """num different mini-batches (perturbed targets), stacked."""
  x, y = map(np.asarray, BATCH)
  noise = 0.1 * np.random.default_rng(7).normal(size=(num,) + y.shape)
  return (jnp.asarray(np.broadcast_to(x, (num,) + x.shape)),
          jnp.asarray((y + noise).astype(np.float32)))


# ------------------------------------------------------------- extra kwargs


@pytest.mark.parametrize("name", TRANSFORMS)
def test_extra_keyword_arguments_are_ignored(name):
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)
  g = GRAD_FN(PARAMS)
  stats = {"mean": jnp.ones(3)}
  plain = lambda s: tx.update(g, s, PARAMS, grad_fn=GRAD_FN)
  extra = lambda s: tx.update(g, s, PARAMS, grad_fn=GRAD_FN, key=1,
                              batch_stats=stats, value=None)
  # The same computation, op for op: the extras reach nothing.
  want = jax.make_jaxpr(plain)(state)
  got = jax.make_jaxpr(extra)(state)
  assert str(got) == str(want)
  assert len(want.eqns) > 3  # a real computation was compared


# --------------------------------------------------------- no recompilation


@pytest.mark.parametrize("name", COMPILED)
def test_no_recompilation_after_the_first_step(name):
  chex.clear_trace_counter()  # counts per function body, across parameters
  tx = TRANSFORMS[name]()
  step = jax.jit(chex.assert_max_traces(make_step(tx), n=1))
  params, state = PARAMS, tx.init(PARAMS)
  xs, ys = batches(4)
  for i in range(4):  # crosses refreshes (every 2 steps) and kept steps
    params, state, _ = step(params, state, (xs[i], ys[i]))
  assert step._cache_size() == 1


# ------------------------------------------------------------ state types


@pytest.mark.parametrize("name", COMPILED)
def test_state_types_are_stable_across_steps(name):
  tx, step = train_step(name)
  params, state = PARAMS, tx.init(PARAMS)
  want = types(state)
  xs, ys = batches(3)
  for i in range(3):
    params, state, updates = step(params, state, (xs[i], ys[i]))
    assert types(state) == want
    assert types(updates) == types(PARAMS)
    assert types(params) == types(PARAMS)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_update_inside_lax_cond(name):
  # lax.cond needs both branches to return identical types: the updated
  # state must type like the initial one (no dtype drift, no weak types).
  tx = TRANSFORMS[name]()
  state = tx.init(PARAMS)

  def maybe_step(pred, state):
    g = GRAD_FN(PARAMS)
    return jax.lax.cond(
        pred,
        lambda s: tx.update(g, s, PARAMS, grad_fn=GRAD_FN)[1],
        lambda s: s,
        state)

  out = jax.eval_shape(maybe_step, True, state)
  assert types(out) == types(state)


# ---------------------------------------------------------------- bfloat16


def test_bf16_params_keep_bf16_everywhere():
  # Design: the eigenvector is stored in the parameters' dtype (it is a
  # direction in parameter space, as large as the parameters); scalars
  # (eigenvalue, residual, cos_angle) are float32.
  params16 = to_bf16(PARAMS)
  batch16 = to_bf16(BATCH)
  grad16 = jax.grad(lambda p: LOSS_FN(p, batch16))
  for name, make in TRANSFORMS.items():
    tx = make()
    state = tx.init(params16)
    out = jax.eval_shape(
        lambda s: tx.update(grad16(params16), s, params16, grad_fn=grad16),
        state)
    assert types(out[0]) == types(params16), name
    assert types(out[1]) == types(state), name
  correction = xsam_optax.eigenvector_correction().init(params16)
  assert {x.dtype for x in jax.tree.leaves(correction.eigenvector)} == {
      jnp.dtype(jnp.bfloat16)}
  assert correction.eigenvalue.dtype == jnp.float32


def test_bf16_xsam_steps_track_float32():
  params16 = to_bf16(PARAMS)
  batch16 = to_bf16(BATCH)
  tx, step = train_step("xsam")
  p16, s16, u16 = step(params16, tx.init(params16), batch16)
  p32, s32, u32 = step(PARAMS, tx.init(PARAMS), BATCH)
  for tree in (p16, u16, s16[1].eigenvector, s16[2]):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {
        jnp.dtype(jnp.bfloat16)}
  np.testing.assert_allclose(np.linalg.norm(flat(s16[1].eigenvector)), 1.0,
                             atol=2e-2)
  # Same direction as in float32, to bfloat16 accuracy.
  np.testing.assert_allclose(flat(u16), flat(u32), atol=3e-2)
  np.testing.assert_allclose(abs(flat(s16[1].eigenvector)
                                 @ flat(s32[1].eigenvector)), 1.0, atol=2e-2)


def test_bf16_diagnostics_are_float32_accurate():
  """eigenvalue and cos_angle are accumulated in float32, not bf16: with
  inputs chosen so that every bf16 product is exact, they equal the exact
  values, which bf16 cannot represent."""
  n = 4096
  i = np.arange(n)
  d = (1 + (37 * i) % 101).astype(np.float32)  # integers: bf16-exact products
  signs = lambda pattern: np.where(pattern, 1.0, -1.0) / 64.0  # unit norm
  pattern = i % 3 == 0
  params = {"w": jnp.asarray(signs(pattern), jnp.bfloat16)}
  grad_fn = lambda p: {"w": jnp.asarray(d, jnp.bfloat16) * p["w"]}
  tx = xsam_optax.eigenvector_correction(0.2, method="power", num_iters=1)
  # Flips 1747 signs: cos(params, start) = (4096 - 2 * 1747) / 4096 = 301 / 2048.
  start = {"w": jnp.asarray(signs(pattern ^ (i < 1747)), jnp.bfloat16)}
  state = tx.init(params)._replace(eigenvector=start)

  # One power step from `start`: the Rayleigh quotient is mean(d).
  _, refreshed = tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                           refresh=True)
  eigenvalue = float(np.mean(d.astype(np.float64)))
  # cos(g, v) with g = params, unit norm like start.
  _, kept = tx.update(params, state, params, grad_fn=grad_fn, refresh=False)
  cos = 301 / 2048
  for got, want in ((refreshed.eigenvalue, eigenvalue), (kept.cos_angle, cos)):
    assert got.dtype == jnp.float32
    assert float(jnp.asarray(want, jnp.bfloat16)) != want  # bf16 would round
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


# ---------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_rho_in_sam_ascent():
  tx = optax.inject_hyperparams(xsam_optax.sam_ascent)(rho=0.05)
  state = tx.init(PARAMS)
  assert float(state.hyperparams["rho"]) == pytest.approx(0.05)
  step = jax.jit(lambda s: tx.update(GRAD_FN(PARAMS), s, PARAMS,
                                     grad_fn=GRAD_FN)[0])
  g = GRAD_FN(PARAMS)
  for rho in (0.05, 0.4):
    state.hyperparams["rho"] = jnp.float32(rho)
    chex.assert_trees_all_close(step(state), oracle_ascent(PARAMS, g, rho), rtol=1e-5,
                       atol=1e-7)
  assert step._cache_size() == 1  # a new rho is data, not a recompile


def test_inject_hyperparams_alpha_in_eigenvector_correction():
  tx = optax.inject_hyperparams(
      xsam_optax.eigenvector_correction,
      static_args=("update_every", "num_iters", "seed"))(alpha=0.1,
                                                         num_iters=2)
  state = tx.init(PARAMS)
  g = GRAD_FN(PARAMS)
  step = jax.jit(lambda s: tx.update(g, s, PARAMS, grad_fn=GRAD_FN))
  for alpha in (0.1, 1.7):
    state.hyperparams["alpha"] = jnp.float32(alpha)
    updates, new_state = step(state)
    v = new_state.inner_state.eigenvector
    np.testing.assert_allclose(flat(updates), oracle_correct(g, v, alpha),
                               rtol=1e-5, atol=1e-6)
  assert step._cache_size() == 1


def test_inject_hyperparams_rho_and_alpha_in_xsam():
  lr = 0.1
  tx = optax.inject_hyperparams(
      xsam_optax.xsam, static_args=("update_every", "num_iters", "seed"))(
          optax.sgd(lr), rho=0.05, alpha=0.2, num_iters=2)
  state = tx.init(PARAMS)
  g = GRAD_FN(PARAMS)
  step = jax.jit(lambda s: tx.update(g, s, PARAMS, grad_fn=GRAD_FN))
  for rho, alpha in ((0.05, 0.2), (0.3, 1.5)):
    state.hyperparams["rho"] = jnp.float32(rho)
    state.hyperparams["alpha"] = jnp.float32(alpha)
    updates, new_state = step(state)
    v = new_state.inner_state[1].eigenvector
    want = -lr * oracle_correct(oracle_ascent(PARAMS, g, rho), v, alpha)
    np.testing.assert_allclose(flat(updates), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------- apply_if_finite


def test_apply_if_finite_is_transparent_on_finite_steps():
  name = "xsam"
  inner = TRANSFORMS[name]()
  tx = optax.apply_if_finite(inner, max_consecutive_errors=2)
  _, plain_step = train_step(name)

  @jax.jit
  def step(params, state, batch):
    grad_fn = jax.grad(lambda p: LOSS_FN(p, batch))
    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  ref_params, ref_state = PARAMS, inner.init(PARAMS)
  xs, ys = batches(3)
  for i in range(3):
    params, state = step(params, state, (xs[i], ys[i]))
    ref_params, ref_state, _ = plain_step(ref_params, ref_state,
                                          (xs[i], ys[i]))
  assert int(state.total_notfinite) == 0
  chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ lax.scan loops


def test_lax_scan_training_loop_with_lax_cond_equals_python_loop():
  # A scanned loop that skips some steps under lax.cond (as users skip, e.g.,
  # bad batches), against a Python loop over the same jitted step.
  tx, step = train_step("xsam")
  xs, ys = batches(6)
  skip = np.array([False, False, True, False, True, False])

  @jax.jit
  def scanned(params, state):
    def body(carry, inputs):
      batch, skip_this = inputs
      carry = jax.lax.cond(skip_this, lambda c: c,
                           lambda c: step(*c, batch)[:2], carry)
      return carry, optax.tree.get(carry[1], "eigenvalue")
    return jax.lax.scan(body, (params, state), ((xs, ys), skip))

  (params, state), eigenvalues = scanned(PARAMS, tx.init(PARAMS))
  ref_params, ref_state = PARAMS, tx.init(PARAMS)
  ref_eigenvalues = []
  for i in range(6):
    if not skip[i]:
      ref_params, ref_state, _ = step(ref_params, ref_state, (xs[i], ys[i]))
    ref_eigenvalues.append(optax.tree.get(ref_state, "eigenvalue"))
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(state, ref_state, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eigenvalues, ref_eigenvalues, rtol=1e-5)
  assert int(optax.tree.get(state, "count")) == 4
  assert len(set(np.asarray(eigenvalues).tolist())) >= 2  # refreshes ran


# ---------------------------------------------- micro-batch accumulation


def test_accumulated_grad_fn_equals_full_batch_gradient():
  full = GRAD_FN(PARAMS)
  for m in (1, 8):
    got = xsam_optax.accumulated_grad_fn(LOSS_FN, BATCH, m)(PARAMS)
    assert types(got) == types(full)
    chex.assert_trees_all_close(got, full, rtol=1e-5, atol=1e-7)


def test_xsam_with_accumulated_grad_fn_equals_full_batch_update():
  tx, full_step = train_step("xsam")
  micro_grad_fn = xsam_optax.accumulated_grad_fn(LOSS_FN, BATCH, 8)

  @jax.jit
  def micro_step(params, state):
    updates, state = tx.update(micro_grad_fn(params), state, params,
                               grad_fn=micro_grad_fn)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(PARAMS)
  p_full, s_full, u_full = full_step(PARAMS, state, BATCH)
  p_micro, s_micro, u_micro = micro_step(PARAMS, state)
  # A refresh ran, so Hessian-vector products went through the scan too.
  assert float(optax.tree.get(s_full, "eigenvalue")) > 0
  chex.assert_trees_all_close(u_micro, u_full, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(s_micro, s_full, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(p_micro, p_full, rtol=2e-5, atol=1e-6)


def test_accumulated_grad_fn_uses_a_fraction_of_the_memory():
  # XLA's own accounting of the compiled gradient and HVP: scratch memory
  # shrinks with the micro-batch, since one micro-batch is alive at a time.
  x = np.random.default_rng(0).normal(size=(512, 8)).astype(np.float32)
  batch = (jnp.asarray(x), jnp.asarray(np.sin(x[:, 0])))
  params = {"w": jnp.full((8, 256), 0.01), "v": jnp.full((256,), 0.01)}
  loss_fn = lambda p, b: jnp.mean((jnp.tanh(b[0] @ p["w"]) @ p["v"]
                                   - b[1]) ** 2)

  def scratch(grad_fn):
    hvp = lambda p: xsam_optax.hvp(grad_fn, p, p)
    return jax.jit(hvp).lower(params).compile().memory_analysis(
        ).temp_size_in_bytes

  full = scratch(jax.grad(lambda p: loss_fn(p, batch)))
  micro = scratch(xsam_optax.accumulated_grad_fn(loss_fn, batch, 8))
  assert micro < full / 4, (micro, full)
