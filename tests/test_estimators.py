import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsam_optax
from _oracles import conv_problem, dense_hessian, flat, mlp_problem


def diagonal_operator(eigenvalues):
  """A pytree operator {"a": (2, 3), "b": (4,)} with a known spectrum."""
  d = jnp.asarray(eigenvalues)
  shapes = {"a": (2, 3), "b": (4,)}

  def matvec(v):
    return {"a": d[:6].reshape(2, 3) * v["a"], "b": d[6:] * v["b"]}

  def tree(x):
    x = jnp.asarray(x)
    return {"a": x[:6].reshape(shapes["a"]), "b": x[6:]}

  return matvec, tree


def abs_cos(a, b):
  a, b = flat(a), flat(b)
  return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.mark.parametrize("problem", [mlp_problem, conv_problem])
def test_lanczos_matches_dense_eigh(x64, problem):
  params, loss, batch = problem()
  objective = lambda p: loss(p, batch)
  hessian = dense_hessian(objective, params)
  values, vectors = np.linalg.eigh(hessian)
  dim = hessian.shape[0]
  grad_fn = jax.grad(objective)
  start = jax.tree.map(jnp.ones_like, params)
  result = jax.jit(lambda v: xsam_optax.lanczos(
      lambda u: xsam_optax.hvp(grad_fn, params, u), v,
      num_iters=min(dim, 60), k=3))(start)
  np.testing.assert_allclose(result.eigenvalue, values[::-1][:3], rtol=1e-6)
  for i in range(3):
    vector = jax.tree.map(lambda x: x[i], result.eigenvector)
    assert abs_cos(vector, vectors[:, -1 - i]) > 0.9999
    # The reported residual is the true one.
    true_residual = np.linalg.norm(hessian @ flat(vector)
                                   - result.eigenvalue[i] * flat(vector))
    np.testing.assert_allclose(result.residual[i], true_residual, atol=1e-7)


def test_lanczos_residual_is_truthful_before_convergence(x64):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(10, 10))
  a = a + a.T
  matvec, tree = diagonal_operator(np.zeros(10))
  as_tree = lambda x: tree(x)
  op = lambda v: as_tree(a @ flat(v))
  result = xsam_optax.lanczos(op, as_tree(np.ones(10)), num_iters=4)
  v = flat(result.eigenvector)
  true_residual = np.linalg.norm(a @ v - result.eigenvalue * v)
  assert true_residual > 1e-3  # not converged: the check below means something
  np.testing.assert_allclose(result.residual, true_residual, rtol=1e-8)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-12)


def test_power_iteration_converges_at_predicted_rate(x64):
  eigenvalues = np.array([4.0, 2.0, 1.0, -1.0, 0.5, 0.25, 0.1, 0.0, 0.0, 0.0])
  matvec, tree = diagonal_operator(eigenvalues)
  start = np.ones(10)
  for t in (1, 3, 6, 10):
    result = xsam_optax.power_iteration(matvec, tree(start), num_iters=t)
    # The returned vector is A^t v0 / ||A^t v0||: its tangent to e_1 is known.
    tangent = (np.linalg.norm((eigenvalues[1:] / 4.0) ** t * start[1:])
               / start[0])
    v = flat(result.eigenvector)
    np.testing.assert_allclose(np.hypot(*v[1:2], np.linalg.norm(v[2:]))
                               / abs(v[0]), tangent, rtol=1e-10)
    # The eigenvalue is the Rayleigh quotient of the previous iterate.
    previous = eigenvalues ** (t - 1) * start
    previous /= np.linalg.norm(previous)
    np.testing.assert_allclose(result.eigenvalue,
                               previous @ (eigenvalues * previous), rtol=1e-12)
    assert int(result.num_matvecs) == t


def test_power_iteration_finds_negative_dominant_eigenvalue(x64):
  eigenvalues = np.array([-5.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.1])
  matvec, tree = diagonal_operator(eigenvalues)
  start = tree(np.ones(10))
  power = xsam_optax.power_iteration(matvec, start, num_iters=200)
  np.testing.assert_allclose(power.eigenvalue, -5.0, rtol=1e-10)
  assert abs(flat(power.eigenvector)[0]) > 1 - 1e-10
  lanczos = xsam_optax.lanczos(matvec, start, num_iters=10)
  np.testing.assert_allclose(lanczos.eigenvalue, 3.0, rtol=1e-10)


def test_power_iteration_tolerance_stops_early(x64):
  eigenvalues = np.array([4.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
  matvec, tree = diagonal_operator(eigenvalues)
  result = jax.jit(lambda v: xsam_optax.power_iteration(
      matvec, v, num_iters=500, tol=1e-6))(tree(np.ones(10)))
  assert 5 < int(result.num_matvecs) < 100
  assert float(result.residual) <= 1e-6 * abs(float(result.eigenvalue))
  np.testing.assert_allclose(result.eigenvalue, 4.0, rtol=1e-6)


def test_power_iteration_tolerance_is_relative(x64):
  """The stop is ||Av - lambda v|| <= tol |lambda|: scaling the operator
  changes neither the number of products nor the direction."""
  eigenvalues = np.array([4.0, 1.0, 0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])
  results = []
  for scale in (1e-3, 1.0, 1e3):
    matvec, tree = diagonal_operator(scale * eigenvalues)
    results.append(xsam_optax.power_iteration(matvec, tree(np.ones(10)),
                                              num_iters=500, tol=1e-6))
  assert len({int(r.num_matvecs) for r in results}) == 1, [
      int(r.num_matvecs) for r in results]
  for r, scale in zip(results, (1e-3, 1.0, 1e3)):
    np.testing.assert_allclose(r.eigenvalue, 4.0 * scale, rtol=1e-6)
    np.testing.assert_allclose(flat(r.eigenvector), flat(results[1].eigenvector),
                               rtol=1e-9, atol=1e-12)


def test_lanczos_without_reorthogonalisation(x64):
  """The three-term recurrence alone: the same Ritz pairs as with full
  reorthogonalisation before any converges; once the top one has converged
  it comes back as a spurious copy (a "ghost"), which full
  reorthogonalisation prevents. Oracle: the dense spectrum."""
  n = 40
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  eigenvalues = np.r_[10.0, 9.0, np.linspace(0.0, 1.0, n - 2)]
  a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T)
  matvec = lambda v: {"x": a @ v["x"]}
  start = {"x": jnp.asarray(rng.normal(size=n))}
  run = lambda m, reorthogonalize: xsam_optax.lanczos(
      matvec, start, num_iters=m, k=3, reorthogonalize=reorthogonalize)

  plain, full = run(6, False), run(6, True)
  np.testing.assert_allclose(plain.eigenvalue, full.eigenvalue, rtol=1e-9)
  np.testing.assert_allclose(plain.eigenvalue[:2], [10.0, 9.0], rtol=1e-6)
  assert abs(np.asarray(plain.eigenvector["x"][0]) @ q[:, 0]) > 1 - 1e-5

  plain, full = run(20, False), run(20, True)
  np.testing.assert_allclose(full.eigenvalue[:2], [10.0, 9.0], rtol=1e-12)
  np.testing.assert_allclose(plain.eigenvalue[:3], [10.0, 10.0, 9.0], rtol=1e-6)


@pytest.mark.parametrize("estimator", [xsam_optax.power_iteration,
                                       xsam_optax.lanczos])
def test_result_keeps_structure_dtypes_and_unit_norm(estimator):
  v0 = {"a": jnp.ones((2, 3), jnp.float32), "b": [jnp.ones(4, jnp.bfloat16)]}
  scales = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.arange(4.0)]}
  matvec = lambda v: jax.tree.map(lambda s, x: (s * x).astype(x.dtype),
                                  scales, v)
  result = jax.jit(lambda v: estimator(matvec, v, num_iters=4))(v0)
  assert jax.tree.structure(result.eigenvector) == jax.tree.structure(v0)
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), result.eigenvector)
          == jax.tree.map(lambda x: (x.shape, x.dtype), v0))
  norm = np.sqrt(sum(float(jnp.sum(x.astype(jnp.float32) ** 2))
                     for x in jax.tree.leaves(result.eigenvector)))
  np.testing.assert_allclose(norm, 1.0, rtol=1e-2)


@pytest.mark.parametrize("estimator", [xsam_optax.power_iteration,
                                       xsam_optax.lanczos])
def test_jitted_estimator_does_not_recompile(estimator):
  matvec, tree = diagonal_operator(np.linspace(1.0, 2.0, 10))
  run = jax.jit(lambda v: estimator(matvec, v, num_iters=3))
  run(tree(np.ones(10, np.float32)))
  run(tree(np.arange(1.0, 11.0, dtype=np.float32)))
  assert run._cache_size() == 1


def test_lanczos_on_low_rank_operator_stops_at_invariant_subspace(x64):
  eigenvalues = np.array([-3.0, -2.0] + [0.0] * 8)
  matvec, tree = diagonal_operator(eigenvalues)
  start = tree(np.r_[1.0, 1.0, np.zeros(8)])  # no null-space component
  result = xsam_optax.lanczos(matvec, start, num_iters=6, k=3)
  np.testing.assert_allclose(result.eigenvalue[:2], [-2.0, -3.0], rtol=1e-12)
  assert np.isinf(result.residual[2])  # only two pairs exist here
  assert np.all(np.isfinite(flat(result.eigenvector)))


def test_zero_start_vector_and_zero_operator_give_finite_unit_vectors(x64):
  matvec = lambda v: jax.tree.map(jnp.zeros_like, v)
  zero = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
  for estimator in (xsam_optax.power_iteration, xsam_optax.lanczos):
    result = estimator(matvec, zero, num_iters=3)
    np.testing.assert_allclose(np.linalg.norm(flat(result.eigenvector)), 1.0)
    assert float(result.eigenvalue) == 0.0
    assert float(result.residual) == 0.0


def test_invalid_settings_name_the_argument():
  matvec, tree = diagonal_operator(np.ones(10))
  with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
    xsam_optax.power_iteration(matvec, tree(np.ones(10)), num_iters=0)
  with pytest.raises(ValueError, match=r"k must be >= 1 and <= num_iters \(3\)"):
    xsam_optax.lanczos(matvec, tree(np.ones(10)), num_iters=3, k=4)


def test_lanczos_memory_per_product_stays_below_a_basis_copy():
  """XLA's accounting of compiled Lanczos on a parameter-heavy model: each
  further product adds its basis row and a few parameter-sized temporaries
  (about 3 copies), not a copy of the whole basis (a tensordot over the basis
  did that: about 6 copies per product here)."""
  params = {"w1": jnp.zeros((400, 400)), "w2": jnp.zeros((400, 4))}
  x, y = jnp.ones((2, 400)), jnp.zeros((2, 4))
  grad_fn = jax.grad(lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2))
  copy = sum(a.nbytes for a in jax.tree.leaves(params))

  def footprint(num_iters):
    run = lambda p, v: xsam_optax.lanczos(
        lambda u: xsam_optax.hvp(grad_fn, p, u), v, num_iters=num_iters
    ).eigenvector
    m = jax.jit(run).lower(params, params).compile().memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes
            + m.temp_size_in_bytes - m.alias_size_in_bytes) / copy

  assert footprint(6) - footprint(2) <= 4 * 4.0, (footprint(2), footprint(6))
