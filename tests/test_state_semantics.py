"""Which vector the state's ``eigenvalue`` belongs to, as documented.

Oracle: the dense Hessian of a small MLP in float64 and the power/Lanczos
iterates restated on it.
"""

import jax
import numpy as np

import xsam_optax
from _oracles import dense_hessian
from _oracles import flat
from _oracles import mlp_problem


def test_eigenvalue_belongs_to_the_documented_vector(x64):
  params, loss, batch = mlp_problem()
  batch_loss = lambda p: loss(p, batch)
  grad_fn = jax.grad(batch_loss)
  txs = {method: xsam_optax.eigenvector_correction(
      0.2, update_every=1, num_iters=2, method=method)
         for method in ("power", "lanczos")}

  @jax.jit  # one program, not dozens of eager operations compiled one by one
  def run(params):
    start = txs["power"].init(params)  # both draw the same start vector
    states = {method: tx.update(grad_fn(params), start, params,
                                grad_fn=grad_fn)[1]
              for method, tx in txs.items()}
    return dense_hessian(batch_loss, params), start, states

  h, start, states = run(params)
  h = np.asarray(h)
  rayleigh = lambda u: float(u @ h @ u)

  # Lanczos: the Ritz value of the stored Ritz vector.
  lanczos = states["lanczos"]
  np.testing.assert_allclose(float(lanczos.eigenvalue),
                             rayleigh(np.asarray(flat(lanczos.eigenvector))),
                             rtol=1e-8)  # rounding of the compiled program

  # Power, two products from v0: u = H v0 / ||H v0|| is multiplied last, the
  # eigenvalue is u^T H u, and the stored vector is H u / ||H u||.
  power = states["power"]
  stored = np.asarray(flat(power.eigenvector))
  eigenvalue = float(power.eigenvalue)
  v0 = np.asarray(flat(start.eigenvector))
  u = h @ v0 / np.linalg.norm(h @ v0)
  np.testing.assert_allclose(stored, h @ u / np.linalg.norm(h @ u),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(eigenvalue, rayleigh(u), rtol=1e-10)
  np.testing.assert_allclose(float(power.residual),
                             np.linalg.norm(h @ u - eigenvalue * u),
                             rtol=1e-8)
  # Not yet converged: the stored vector's own quotient is another number.
  assert abs(rayleigh(stored) - eigenvalue) > 1e-3 * abs(eigenvalue)
