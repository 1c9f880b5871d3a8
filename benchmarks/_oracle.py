"""The reference top eigenvectors, from code that shares nothing with ours.

SciPy's ARPACK (``scipy.sparse.linalg.eigsh``, ``which="LA"``: the
algebraically largest eigenpairs) on a ``LinearOperator`` whose product is a
jitted forward-over-reverse Hessian-vector product written here
(``jax.jvp`` of ``jax.grad`` of the training-mode loss), not the library's
``hvp``, ``power_iteration`` or ``lanczos``. Vectors are ravelled into one
float64 NumPy array: fine in an oracle, never on the library's hot path.

Two operators per step ``t`` of a trajectory:

* ``batch``: the Hessian of step ``t``'s mini-batch loss, the matrix an
  X-SAM refresh at that step multiplies by;
* ``large``: the mean of the training-mode Hessians of ``num_chunks`` fixed
  batches of the training set (the loss's curvature, which the correction
  is meant to act on; see ``_problems.large_batch``).

Each solve is warm-started from the previous scored step's vector (ARPACK
still iterates to ``tol``). Results go to an ``.npz`` cache per problem, seed,
trajectory and operator, so a rerun of the sweep does not redo them.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
from scipy.sparse import linalg as sparse_linalg

import _problems
import _trajectory

TOL = 1e-3  # ARPACK's relative accuracy of the Ritz values
NCV = 10  # Lanczos vectors per ARPACK restart


class Eigenpairs(NamedTuple):
  """Top-2 eigenpairs at the scored steps (vectors ravelled, unit norm)."""

  steps: np.ndarray  # (S,)
  vectors: np.ndarray  # (S, n), the top eigenvector per step
  values: np.ndarray  # (S, 2), lambda_1 >= lambda_2
  matvecs: np.ndarray  # (S,), products ARPACK used
  seconds: float


def _hvp_flat(problem: _problems.Problem, unravel):
  def product(params, batch_stats, x, y, w):
    grad = jax.grad(lambda p: problem.loss(p, batch_stats, x, y))
    return ravel_pytree(jax.jvp(grad, (params,), (unravel(w),))[1])[0]

  return jax.jit(product)


def _operator(matvec, n: int) -> sparse_linalg.LinearOperator:
  count = [0]

  def mv(w):
    count[0] += 1
    out = matvec(jnp.asarray(np.ravel(w), jnp.float32))
    return np.asarray(out, np.float64)

  return sparse_linalg.LinearOperator((n, n), matvec=mv, dtype=np.float64), count


def _solve(matvec, n: int, v0: np.ndarray):
  op, count = _operator(matvec, n)
  values, vectors = sparse_linalg.eigsh(op, k=2, which="LA", v0=v0, tol=TOL,
                                        ncv=min(NCV, n - 1))
  order = np.argsort(values)[::-1]
  top = vectors[:, order[0]]
  return top / np.linalg.norm(top), values[order], count[0]


def compute(problem: _problems.Problem, trajectory: _trajectory.Trajectory,
            steps, kind: str, *, num_chunks: int, seed: int) -> Eigenpairs:
  """Top eigenpairs of the ``kind`` operator at each of ``steps``."""
  params0, _ = trajectory.at(0)
  flat0, unravel = ravel_pytree(params0)
  n = flat0.size
  hvp = _hvp_flat(problem, unravel)
  if kind == "large":
    xs, ys = _problems.large_batch(problem, num_chunks)
  v0 = np.random.default_rng(seed).standard_normal(n)
  out_vectors, out_values, out_matvecs = [], [], []
  t0 = time.perf_counter()
  for t in steps:
    params, stats = trajectory.at(t)
    if kind == "batch":
      x, y = trajectory.batch(problem, t)
      matvec = lambda w: hvp(params, stats, x, y, w)
    else:
      def matvec(w):
        total = hvp(params, stats, xs[0], ys[0], w)
        for c in range(1, xs.shape[0]):
          total = total + hvp(params, stats, xs[c], ys[c], w)
        return total / xs.shape[0]
    vector, values, count = _solve(matvec, n, v0)
    v0 = vector
    out_vectors.append(vector.astype(np.float32))
    out_values.append(values)
    out_matvecs.append(count)
  return Eigenpairs(np.asarray(steps), np.stack(out_vectors),
                    np.stack(out_values), np.asarray(out_matvecs),
                    time.perf_counter() - t0)


def cached(problem, trajectory, steps, kind: str, *, num_chunks: int,
           seed: int, cache_dir: str) -> Eigenpairs:
  """:func:`compute`, or its saved copy for the same steps and operator."""
  steps = np.asarray(steps)
  chunks = num_chunks if kind == "large" else 0
  path = os.path.join(
      cache_dir, f"oracle-{problem.name}-seed{seed}-steps{trajectory.steps}-"
                 f"{kind}{chunks or ''}-tol{TOL:g}.npz")
  if os.path.exists(path):
    with np.load(path) as f:
      if np.array_equal(f["steps"], steps):
        return Eigenpairs(f["steps"], f["vectors"], f["values"], f["matvecs"],
                          float(f["seconds"]))
  pairs = compute(problem, trajectory, steps, kind, num_chunks=num_chunks,
                  seed=seed)
  os.makedirs(cache_dir, exist_ok=True)
  np.savez(path, **pairs._asdict())
  return pairs
