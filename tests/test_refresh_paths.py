"""A periodic refresh under ``refresh=None``: the two programs it can compile to.

A traced refresh runs under ``lax.cond`` on accelerators and, on CPU, is
computed at every step and kept on refresh steps only. Oracles: each program
forced in turn, and the host-chosen path (``refresh=refresh_due(...)``, no
traced choice at all), over several steps of a small conv net in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from xsam_optax import _tracking

STEPS = 7


def conv_problem():
  """A 1-D conv + tanh + dense net on a fixed batch, float64."""
  rng = np.random.default_rng(0)
  params = {"conv": jnp.asarray(rng.standard_normal((3, 2, 4)) * 0.5),
            "dense": jnp.asarray(rng.standard_normal((4 * 8, 3)) * 0.3)}
  x = jnp.asarray(rng.standard_normal((6, 8, 2)))
  y = jnp.asarray(rng.integers(0, 3, 6))

  def loss(p):
    h = jax.lax.conv_general_dilated(x, p["conv"], (1,), "SAME",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    logits = jnp.tanh(h).reshape(6, -1) @ p["dense"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss


def run(tx, params, loss, refresh_of):
  """``STEPS`` jitted steps; ``refresh_of(step)`` is update's ``refresh``."""
  grad_fn = jax.grad(loss)

  def step(params, state, refresh):
    updates, state = tx.update(grad_fn(params), state, params,
                               grad_fn=grad_fn, refresh=refresh)
    return optax.apply_updates(params, updates), state

  traced = jax.jit(step)
  host = jax.jit(step, static_argnames="refresh")
  state = tx.init(params)
  trail = []
  for t in range(STEPS):
    refresh = refresh_of(t)
    fn = host if isinstance(refresh, bool) else traced
    params, state = fn(params, state, refresh)
    trail.append((params, state))
  return trail


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-12,
                               atol=1e-14)


def force_cond(monkeypatch):
  monkeypatch.setattr(_tracking, "_EVERY_STEP_PLATFORMS", ())


@pytest.mark.parametrize("method,num_iters", [("power", 1), ("lanczos", 3)])
def test_both_programs_and_the_host_path_agree(x64, monkeypatch, method,
                                               num_iters):
  params, loss = conv_problem()
  tx = xsam_optax.xsam(optax.sgd(0.1), update_every=3, num_iters=num_iters,
                       method=method)
  host = run(tx, params, loss, lambda t: xsam_optax.refresh_due(t, 3))
  every_step = run(tx, params, loss, lambda t: None)
  explicit = run(tx, params, loss, lambda t: jnp.asarray(t % 3 == 0))
  force_cond(monkeypatch)
  under_cond = run(tx, params, loss, lambda t: None)
  for t in range(STEPS):
    assert_same(every_step[t], under_cond[t])
    assert_same(every_step[t], host[t])
    assert_same(explicit[t], host[t])
  # The eigenvector moved on refresh steps only (else the test proves little).
  vectors = [flat for _, s in host for flat in [jax.tree.leaves(
      optax.tree.get(s, "eigenvector"))[0]]]
  assert not np.allclose(vectors[2], vectors[3])
  np.testing.assert_array_equal(vectors[3], vectors[4])


def compiled_text(tx, params, loss):
  grad_fn = jax.grad(loss)

  def step(params, state):
    return tx.update(grad_fn(params), state, params, grad_fn=grad_fn)

  return jax.jit(step).lower(params, tx.init(params)).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU's program")
def test_cpu_program_has_no_conditional(monkeypatch):
  params, loss = conv_problem()
  tx = xsam_optax.xsam(optax.sgd(0.1), update_every=2)
  assert " conditional(" not in compiled_text(tx, params, loss)
  force_cond(monkeypatch)
  assert " conditional(" in compiled_text(tx, params, loss)


def test_failed_products_off_schedule_change_nothing():
  """Products computed on non-refresh steps are dropped even when non-finite."""
  params, loss = conv_problem()
  tx = xsam_optax.eigenvector_correction(update_every=2)
  grad_fn = jax.grad(loss)
  nan = lambda p, v: jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), v)

  def step(state, curvature_fn_is_nan):
    curvature = nan if curvature_fn_is_nan else None
    return tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                     curvature_fn=curvature)[1]

  step = jax.jit(step, static_argnums=1)
  state = step(tx.init(params), False)  # step 0 refreshes
  after = step(state, True)  # step 1: no refresh, failing products
  for name in ("eigenvector", "eigenvalue"):
    assert_same(optax.tree.get(after, name), optax.tree.get(state, name))
  assert np.isfinite(float(after.residual))


def test_host_schedule_read_from_the_transform_cannot_disagree(x64):
  # The trap it closes: a transform built with update_every=5 and a host
  # counting with refresh_due's old default (period 2) refresh on other
  # steps, silently. Oracle: the transform's own schedule (refresh=None).
  params, loss = conv_problem()
  tx = xsam_optax.xsam(optax.sgd(0.1), update_every=5)
  schedule = xsam_optax.refresh_schedule(tx)
  assert schedule.update_every == 5
  own = run(tx, params, loss, lambda t: None)
  host = run(tx, params, loss, schedule)
  for t in range(STEPS):
    assert_same(own[t], host[t])
  with pytest.warns(DeprecationWarning, match="update_every"):
    mismatched = run(tx, params, loss, xsam_optax.refresh_due)
  assert not np.allclose(jax.tree.leaves(mismatched[-1][0])[0],
                         jax.tree.leaves(own[-1][0])[0])


@pytest.mark.parametrize("factory", [
    lambda k: xsam_optax.xsam(optax.sgd(0.1), update_every=k),
    lambda k: xsam_optax.eigenvector_correction(update_every=k),
    lambda k: xsam_optax.eigen_sam_ascent(update_every=k),
])
def test_refresh_schedule_reads_each_transforms_period(factory):
  for k in (1, 3):
    schedule = xsam_optax.refresh_schedule(factory(k))
    assert schedule == xsam_optax.RefreshSchedule(k)
    assert [schedule(t) for t in range(7)] == [t % k == 0 for t in range(7)]


@pytest.mark.parametrize("tx", [
    optax.sgd(0.1),
    xsam_optax.sam(optax.sgd(0.1)),
    optax.chain(xsam_optax.eigenvector_correction(update_every=5),
                optax.sgd(0.1)),
    object(),
], ids=["sgd", "sam", "chain", "object"])
def test_refresh_schedule_refuses_a_transform_whose_period_it_cannot_know(tx):
  with pytest.raises(ValueError, match=r"^tx must be a transform returned by"):
    xsam_optax.refresh_schedule(tx)
