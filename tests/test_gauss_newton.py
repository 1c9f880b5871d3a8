"""``gauss_newton_fn`` and ``curvature_fn``: against dense J^T H_z J oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from _oracles import dense_hessian, flat
from jax.flatten_util import ravel_pytree

CLASSES = 3


def classifier(seed=0, n=12, din=3, hidden=4, dtype=jnp.float64, linear=False):
  """A small softmax classifier: (params, output_fn, output_loss_fn, loss)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(k1, (n, din), dtype)
  y = jax.random.randint(k2, (n,), 0, CLASSES)
  if linear:
    params = {"w": jax.random.normal(k3, (din, CLASSES), dtype)}
    output_fn = lambda p: x @ p["w"]
  else:
    params = {"w1": jax.random.normal(k3, (din, hidden), dtype),
              "w2": jax.random.normal(k4, (hidden, CLASSES), dtype)}
    output_fn = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]
  output_loss_fn = lambda z: -jnp.mean(
      jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))
  loss = lambda p: output_loss_fn(output_fn(p))
  return params, output_fn, output_loss_fn, loss


def dense_gauss_newton(params, output_fn, output_loss_fn):
  """J^T H_z J over the ravelled parameters and flattened outputs."""
  f, unravel = ravel_pytree(params)
  z = output_fn(params)
  jac = jax.jacobian(lambda g: output_fn(unravel(g)).ravel())(f)
  h_z = jax.hessian(lambda u: output_loss_fn(u.reshape(z.shape)))(z.ravel())
  return jac.T @ h_z @ jac


def test_product_equals_dense_oracle_and_is_psd(x64):
  params, output_fn, output_loss_fn, loss = classifier()
  gn = xsam_optax.gauss_newton_fn(output_fn, output_loss_fn)
  g_dense = dense_gauss_newton(params, output_fn, output_loss_fn)
  h_dense = dense_hessian(lambda p, *_: loss(p), params)
  _, unravel = ravel_pytree(params)
  for seed in range(3):
    v = jax.random.normal(jax.random.PRNGKey(10 + seed), g_dense.shape[:1],
                          jnp.float64)
    np.testing.assert_allclose(flat(gn(params, unravel(v))), g_dense @ v,
                               rtol=1e-10, atol=1e-12)
  assert np.linalg.eigvalsh(np.asarray(g_dense)).min() > -1e-12
  # The oracle can tell G from the Hessian of this nonlinear model.
  assert np.abs(np.asarray(g_dense - h_dense)).max() > 1e-2


def test_linear_model_gauss_newton_is_the_hessian(x64):
  params, output_fn, output_loss_fn, loss = classifier(linear=True)
  gn = xsam_optax.gauss_newton_fn(output_fn, output_loss_fn)
  v = jax.tree.map(jnp.ones_like, params)
  np.testing.assert_allclose(flat(gn(params, v)),
                             flat(xsam_optax.hvp(jax.grad(loss), params, v)),
                             rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: xsam_optax.eigenvector_correction(num_iters=14),
    lambda: xsam_optax.eigen_sam_ascent(num_iters=14, method="lanczos"),
], ids=["eigenvector_correction", "eigen_sam_ascent"])
def test_curvature_fn_drives_the_refresh(x64, make):
  """The stored vector is G's top eigenvector (dense oracle), not H's."""
  params, output_fn, output_loss_fn, loss = classifier()
  g_vals, g_vecs = np.linalg.eigh(np.asarray(
      dense_gauss_newton(params, output_fn, output_loss_fn)))
  h_top = np.linalg.eigh(np.asarray(
      dense_hessian(lambda p, *_: loss(p), params)))[1][:, -1]
  assert abs(g_vecs[:, -1] @ h_top) < 0.99  # The oracle can tell them apart.

  tx = make()
  grad_fn = jax.grad(loss)
  _, state = tx.update(
      grad_fn(params), tx.init(params), params, grad_fn=grad_fn,
      curvature_fn=xsam_optax.gauss_newton_fn(output_fn, output_loss_fn))
  v = np.asarray(flat(state.eigenvector))
  assert abs(v @ g_vecs[:, -1]) > 0.9999
  np.testing.assert_allclose(state.eigenvalue, g_vals[-1], rtol=1e-8)


def test_curvature_fn_under_jit_with_host_refresh_matches_in_graph(x64):
  params, output_fn, output_loss_fn, loss = classifier()
  grad_fn = jax.grad(loss)
  gn = xsam_optax.gauss_newton_fn(output_fn, output_loss_fn)
  tx = xsam_optax.xsam(optax.sgd(0.1), update_every=2)
  step = jax.jit(lambda p, s, refresh=None: tx.update(
      grad_fn(p), s, p, grad_fn=grad_fn, curvature_fn=gn,
      **({} if refresh is None else {"refresh": refresh})),
      static_argnames="refresh")
  a = b = params
  s_a = s_b = tx.init(params)
  for i in range(3):
    u, s_a = step(a, s_a)
    a = optax.apply_updates(a, u)
    u, s_b = step(b, s_b, refresh=xsam_optax.refresh_due(i, 2))
    b = optax.apply_updates(b, u)
  np.testing.assert_allclose(flat(a), flat(b), rtol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(curvature_fn="gn"), "curvature_fn must be callable"),
    (dict(curvature_fn=lambda p, v: {"other": v}),
     "curvature_fn returned a pytree"),
])
def test_bad_curvature_fn_is_named(kwargs, message):
  params, _, _, loss = classifier(dtype=jnp.float32)
  grad_fn = jax.grad(loss)
  tx = xsam_optax.eigenvector_correction()
  with pytest.raises(ValueError, match=message):
    tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn,
              **kwargs)


@pytest.mark.parametrize("args, name", [
    (("not a function", lambda z: z.sum()), "output_fn"),
    ((lambda p: p, None), "output_loss_fn"),
])
def test_gauss_newton_fn_names_bad_argument(args, name):
  with pytest.raises(ValueError, match=f"^{name} must be callable"):
    xsam_optax.gauss_newton_fn(*args)
