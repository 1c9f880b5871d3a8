"""Top-eigenpair estimators for symmetric operators given as pytree matvecs.

Both estimators take ``matvec: pytree -> pytree`` (for example
``lambda v: xsam_optax.hvp(grad_fn, params, v)``) and a start vector ``v0``,
and never ravel the pytree: a Lanczos basis is kept as a list (unrolled) or a
stack (rolled loop) of pytrees.
With their settings bound (``functools.partial(lanczos, num_iters=4)``) they
are *estimators*, ``(matvec, v0) -> EigenResult``, the value the transforms'
``method`` argument accepts; a user-written function of that shape works too.

Loop construct: the iteration count is static and the loop is a
``lax.fori_loop``, fully unrolled by default when it has at most
``UNROLL_UP_TO`` iterations (the few products of an X-SAM refresh) and rolled
beyond, where unrolling would make compile time grow with the count. On
XLA:CPU, Hessian-vector products of a conv net inside a rolled loop or a
``lax.cond`` ran several times slower than the same products unrolled at top
level (backward convolutions stay in a slow layout there;
``benchmarks/estimators.py`` measures it); ``unroll=True`` or ``False``
overrides.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from xsam_optax import _tree
from xsam_optax import _validation

UNROLL_UP_TO = 10


class EigenResult(NamedTuple):
  """An estimated eigenpair (or the top ``k``) of a symmetric operator.

  Attributes:
    eigenvalue: scalar, or shape ``(k,)`` in descending order.
    eigenvector: unit-norm pytree like ``v0``; for ``k > 1`` the ``k`` vectors
      are stacked along a new leading axis of every leaf.
    residual: :math:`\\|A v - \\lambda v\\|`, shaped like ``eigenvalue``.
    num_matvecs: int32 scalar, how many products with the operator were used.
  """

  eigenvalue: jax.Array
  eigenvector: _tree.PyTree
  residual: jax.Array
  num_matvecs: jax.Array


# An eigenvector estimator: ``(matvec, v0) -> EigenResult``, settings bound.
Estimator = Callable[[Callable[[_tree.PyTree], _tree.PyTree], _tree.PyTree], EigenResult]


def _fixed_loop(num_iters: int, body, init, unroll: bool):
  """``lax.fori_loop(0, num_iters, body, init)``; unrolled as a Python loop.

  A Python loop leaves no loop or call in the program at all: XLA:CPU then
  gives every convolution its fast layout, which it did not for a one-trip
  ``fori_loop(..., unroll=True)``.
  """
  if not unroll:
    return jax.lax.fori_loop(0, num_iters, body, init)
  carry = init
  for i in range(num_iters):
    carry = body(i, carry)
  return carry


def _or_inf(ok: jax.Array, x: jax.Array) -> jax.Array:
  """``x`` where ``ok``, ``inf`` elsewhere; no ``inf`` computed where ``ok``.

  Not ``jnp.where(ok, x, jnp.inf)``: that materialises an ``inf`` constant
  on every call, which ``jax_debug_infs`` (and ``jax_debug_nans``' op by op
  rerun, which looks for the first bad value) reports in a healthy run.
  """
  return jnp.where(ok, x, 1 / jnp.where(ok, 1, 0).astype(x.dtype))


def _resolve_unroll(unroll: Optional[bool], num_iters: int) -> bool:
  if unroll is None:
    return num_iters <= UNROLL_UP_TO
  _validation.check_bool("unroll", unroll)
  return unroll


def _unit_start(v0: _tree.PyTree) -> _tree.PyTree:
  """``v0 / ||v0||``; a constant direction if ``v0`` is zero or non-finite."""
  unit, norm = _tree.safe_normalize(v0)
  fallback, _ = _tree.safe_normalize(jax.tree.map(jnp.ones_like, v0))
  return optax.tree.where(_tree.is_usable(norm), unit, fallback)


def power_iteration(
    matvec: Callable[[_tree.PyTree], _tree.PyTree],
    v0: _tree.PyTree,
    *,
    num_iters: int,
    tol: Optional[float] = None,
    unroll: Optional[bool] = None,
) -> EigenResult:
  r"""Power iteration: the eigenpair of **largest magnitude**.

  Repeats :math:`v \leftarrow A v / \|A v\|` starting from ``v0`` (a warm
  start: pass the previous estimate). It converges to the eigenvalue of largest
  absolute value, which can be negative (early in training the Hessian often
  has one): a negative ``eigenvalue`` says so. Use :func:`lanczos` for the
  algebraically largest. The error shrinks like
  :math:`|\lambda_2 / \lambda_1|^t` in the vector.

  ``eigenvalue`` is the Rayleigh quotient :math:`v^\top A v` and ``residual``
  :math:`\|Av - \lambda v\|` of the last iterate ``v`` to which ``matvec`` was
  applied; the returned ``eigenvector`` is that iterate's image
  :math:`Av/\|Av\|`, one power step further, at no extra product. A product
  that is zero or non-finite leaves the vector where it was, so the
  eigenvector is always finite and unit-norm.

  Args:
    matvec: a symmetric linear map from pytrees like ``v0`` to pytrees like
      ``v0``.
    v0: start vector (any nonzero real pytree; normalised here; complex
      leaves raise a ``ValueError``: the inner products do not conjugate).
    num_iters: number of products with ``matvec`` (static, ``>= 1``).
    tol: if set, stop early once the relative residual
      :math:`\|Av - \lambda v\| / |\lambda|` is at most ``tol``; the loop is
      then a ``lax.while_loop`` and ``num_matvecs`` says how many ran.
    unroll: fully unroll the fixed-count loop; default: when ``num_iters <=
      UNROLL_UP_TO`` (ignored when ``tol`` is set).

  Returns:
    An :class:`EigenResult`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xsam_optax
    >>> a = jnp.diag(jnp.array([3.0, 1.0, -0.5]))
    >>> res = xsam_optax.power_iteration(
    ...     lambda v: {"x": a @ v["x"]}, {"x": jnp.ones(3)}, num_iters=30)
    >>> round(float(res.eigenvalue), 4)
    3.0

  References:
    Golub and Van Loan, *Matrix Computations*, 4th ed., section 7.3.1.
  """
  _validation.check_int("num_iters", num_iters, minimum=1)
  _validation.reject_complex(v0, what="v0", owner="power_iteration")
  if tol is not None:
    _validation.check_float("tol", tol, minimum=0.0)
  return power_iteration_from_unit(matvec, _unit_start(v0),
                                   num_iters=num_iters, tol=tol, unroll=unroll)


def power_iteration_from_unit(matvec, v0: _tree.PyTree, *, num_iters: int,
                              tol: Optional[float] = None,
                              unroll: Optional[bool] = None) -> EigenResult:
  """:func:`power_iteration` from a start ``v0`` that is already a unit vector.

  The transforms' stored eigenvector is one: normalising it again would cost
  a reduction per leaf in every refresh step.
  """
  unroll = _resolve_unroll(unroll, num_iters)
  scalar = _tree.scalar_dtype(v0)

  def step(carry):
    count, v, _, _, _ = carry
    w = matvec(v)
    # The product scaled by a power of two (exactly) to a largest entry
    # near 1, once: its norm, the residual's (no larger than a few times
    # ||w||) and the Rayleigh quotient then neither overflow nor flush to
    # zero at any scale of the curvature.
    scale = _tree.unit_scale(w)
    w = jax.tree.map(lambda x: (x * scale).astype(x.dtype), w)
    eigenvalue = _tree.vdot(v, w).astype(scalar)
    residual = _tree.global_norm(_tree.add_scaled(w, -eigenvalue, v),
                                 scale=1.0)
    next_v, w_norm = _tree.safe_normalize(w, scale=1.0)
    ok = _tree.is_usable(w_norm) & jnp.isfinite(eigenvalue)
    next_v = optax.tree.where(ok, next_v, v)
    eigenvalue = jnp.where(jnp.isfinite(eigenvalue), eigenvalue / scale, 0.0)
    residual = _or_inf(jnp.isfinite(residual), residual / scale)
    converged = (
        residual <= tol * jnp.abs(eigenvalue) if tol is not None else False
    )
    return count + 1, next_v, eigenvalue, residual.astype(scalar), converged

  init = (
      jnp.zeros((), jnp.int32),
      v0,
      jnp.zeros((), scalar),
      # Never returned: the loop runs at least once.
      jnp.zeros((), scalar),
      jnp.zeros((), bool),
  )
  if tol is None:
    final = _fixed_loop(num_iters, lambda _, c: step(c), init, unroll)
  else:
    final = jax.lax.while_loop(
        lambda c: (c[0] < num_iters) & ~c[4], step, init
    )
  count, v, eigenvalue, residual, _ = final
  return EigenResult(eigenvalue, v, residual, count)


def lanczos(
    matvec: Callable[[_tree.PyTree], _tree.PyTree],
    v0: _tree.PyTree,
    *,
    num_iters: int,
    k: int = 1,
    reorthogonalize: bool = True,
    unroll: Optional[bool] = None,
) -> EigenResult:
  r"""Lanczos: the ``k`` **algebraically largest** eigenpairs.

  Builds an orthonormal basis :math:`Q` of the Krylov space
  :math:`\{v_0, A v_0, \dots, A^{m-1} v_0\}` (``m = num_iters`` products) and
  the tridiagonal :math:`T = Q^\top A Q`; the Ritz pairs of ``T`` approximate
  the extreme eigenpairs of ``A``. With a warm start ``v0`` close to the
  answer, few products suffice. The residual of each Ritz pair comes free as
  :math:`\beta_m |y_m|`, exact in exact arithmetic; in floating point it keeps
  falling below the attainable :math:`\|Av - \lambda v\|`, which is of
  order :math:`\epsilon \|A\|`.

  The basis is ``m`` pytrees like ``v0`` (memory: ``m`` copies of the
  parameters): a Python list when the loop is unrolled, a stack allocated up
  front when it is rolled. Full reorthogonalisation against the whole basis is on by
  default; it keeps the basis orthonormal in finite precision at the cost of
  ``m`` inner products per step, negligible next to a Hessian-vector product.
  Without it (``reorthogonalize=False``, the textbook three-term recurrence)
  the basis loses orthogonality once a Ritz pair converges, and converged
  eigenvalues reappear as spurious copies among the ``k`` returned.
  If the Krylov space is exhausted early (an invariant subspace, e.g. a
  low-rank or zero operator) or a product is non-finite, the iteration stops
  there and the Ritz pairs of the steps that ran are returned; if fewer than
  ``k`` exist, the extra pairs are marked with an infinite ``residual``.

  Args:
    matvec: a symmetric linear map from pytrees like ``v0`` to pytrees like
      ``v0``.
    v0: start vector (any nonzero real pytree; normalised here; complex
      leaves raise a ``ValueError``: the inner products do not conjugate).
    num_iters: Krylov dimension, i.e. number of products (static, ``>= k``).
    k: how many of the largest eigenpairs to return.
    reorthogonalize: full reorthogonalisation (recommended).
    unroll: fully unroll the loop; default: when ``num_iters <=
      UNROLL_UP_TO`` (see the module notes).

  Returns:
    An :class:`EigenResult`; for ``k > 1`` every field has a leading axis of
    size ``k``, in descending order of eigenvalue.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xsam_optax
    >>> a = jnp.diag(jnp.array([-5.0, 2.0, 1.0, 0.5]))
    >>> res = xsam_optax.lanczos(
    ...     lambda v: a @ v, jnp.ones(4), num_iters=4, k=2)
    >>> [round(float(x), 4) for x in res.eigenvalue]
    [2.0, 1.0]

  References:
    Golub and Van Loan, *Matrix Computations*, 4th ed., section 10.1.
  """
  _validation.check_int("num_iters", num_iters, minimum=1)
  _validation.check_int("k", k, minimum=1, maximum=num_iters,
                        maximum_name="num_iters")
  _validation.check_bool("reorthogonalize", reorthogonalize)
  _validation.reject_complex(v0, what="v0", owner="lanczos")
  return lanczos_from_unit(matvec, _unit_start(v0), num_iters=num_iters, k=k,
                           reorthogonalize=reorthogonalize, unroll=unroll)


def lanczos_from_unit(matvec, v0: _tree.PyTree, *, num_iters: int, k: int = 1,
                      reorthogonalize: bool = True,
                      unroll: Optional[bool] = None) -> EigenResult:
  """:func:`lanczos` from a start ``v0`` that is already a unit vector.

  A Ritz vector that cannot be normalised (zero or non-finite) is returned
  as zeros with an infinite ``residual``, so a caller that checks the
  residual need not check the vector's norm.
  """
  unroll = _resolve_unroll(unroll, num_iters)
  basis, alphas, betas, live = _lanczos_recurrence(
      matvec, v0, num_iters, reorthogonalize, unroll)
  values, coeffs, residuals = _ritz_pairs(alphas, betas, live, k)
  combine = _tree.list_combination if unroll else _tree.stacked_combination
  vectors = combine(coeffs.T, basis)  # leaves (k, ...)
  vectors, norms = jax.vmap(_tree.safe_normalize)(vectors)
  residuals = _or_inf(_tree.is_usable(norms), residuals)
  num_matvecs = jnp.asarray(num_iters, jnp.int32)
  if k == 1:
    vectors = jax.tree.map(lambda x: x[0], vectors)
    return EigenResult(values[0], vectors, residuals[0], num_matvecs)
  return EigenResult(values, vectors, residuals, num_matvecs)


def _lanczos_recurrence(matvec, q0: _tree.PyTree, m: int, reorthogonalize: bool,
                        unroll: bool):
  """``m`` Lanczos steps from the unit vector ``q0``.

  Returns the basis (unrolled: a Python list of ``m`` pytrees, with no
  stacked buffer or dynamic-update-slice, each vector its own arrays for XLA
  to place; rolled: leaves with a leading axis of size ``m``, as a loop carry
  must be allocated up front), the
  diagonal ``alphas`` and off-diagonal ``betas`` of the tridiagonal, and
  which steps ran (``live``): a breakdown or a non-finite product ends the
  recurrence, and later rows stay zero.
  """
  scalar = _tree.scalar_dtype(q0)
  eps = jnp.finfo(scalar).eps
  if unroll:
    append = lambda basis, j, q: basis + [q]
    dots, combine = _tree.list_dots, _tree.list_combination
    # Python list grows by one per unrolled step.
    empty = []
  else:
    append = lambda basis, j, q: jax.tree.map(
        lambda b, x: b.at[j].set(x), basis, q)
    dots, combine = _tree.stacked_dots, _tree.stacked_combination
    # Broadcast, not zeros: rows then carry the sharding of q0's leaves.
    empty = jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.zeros_like(x), (m,) + jnp.shape(x)), q0)

  def step(j, carry):
    basis, alphas, betas, live, q_prev, q, beta_prev, alive = carry
    basis = append(basis, j, q)
    w = matvec(q)
    alpha = _tree.vdot(q, w).astype(scalar)
    w = _tree.add_scaled(w, -alpha, q)
    w = _tree.add_scaled(w, -beta_prev, q_prev)
    if reorthogonalize:
      # Stacked rows past j are still zero, so they drop out.
      w = optax.tree.sub(w, combine(dots(basis, w), basis))
    next_q, beta = _tree.safe_normalize(w)
    beta = beta.astype(scalar)
    step_live = alive & jnp.isfinite(alpha) & jnp.isfinite(beta)
    # Breakdown: the Krylov space is invariant, nothing more to find.
    scale = jnp.abs(alpha) + beta_prev
    still_alive = step_live & (beta > 10 * eps * scale)
    alphas = alphas.at[j].set(jnp.where(step_live, alpha, 0.0))
    betas = betas.at[j].set(jnp.where(step_live, beta, 0.0))
    live = live.at[j].set(step_live)
    next_q = optax.tree.where(still_alive, next_q,
                              jax.tree.map(jnp.zeros_like, q))
    return (basis, alphas, betas, live, q, next_q,
            jnp.where(still_alive, beta, 0.0), still_alive)

  init = (
      empty,
      jnp.zeros((m,), scalar),
      jnp.zeros((m,), scalar),
      jnp.zeros((m,), bool),
      jax.tree.map(jnp.zeros_like, q0),
      q0,
      jnp.zeros((), scalar),
      jnp.ones((), bool),
  )
  basis, alphas, betas, live, *_ = _fixed_loop(m, step, init, unroll)
  return basis, alphas, betas, live


def _ritz_pairs(alphas: jax.Array, betas: jax.Array, live: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ``k`` largest Ritz values, their coefficients ``(m, k)`` in the
  basis, and their residuals ``|beta_last * y_last|`` (``inf`` for a pair
  that only the steps that did not run would span)."""
  m = alphas.shape[0]
  scalar = alphas.dtype
  # Decomposed at a largest entry near 1 (an exact power-of-two scaling): an
  # eigensolver squares entries, which at a curvature of 1e20 or 1e-20
  # overflow or flush to zero in float32. Rows of steps that did not run
  # are zero.
  scale = _tree.power_of_two_scale(
      jnp.max(jnp.abs(jnp.concatenate([alphas, betas]))))
  # Couplings to steps that did not run are dropped; the last live beta stays
  # for the residual. Dead steps get a diagonal below every live Ritz value
  # (Gershgorin bound), so they sort last.
  live_next = jnp.concatenate([live[1:], jnp.zeros((1,), bool)])
  couplings = jnp.where(live_next, betas * scale, 0.0)[:-1]
  scaled_alphas = alphas * scale
  radius = jnp.abs(jnp.concatenate([couplings, jnp.zeros((1,), scalar)]))
  radius = radius + jnp.abs(jnp.concatenate([jnp.zeros((1,), scalar),
                                             couplings]))
  # The largest finite number, not inf, where no step ran: an inf never
  # appears in a healthy step (jax_debug_infs).
  floor = jnp.min(jnp.where(live, scaled_alphas - radius,
                            jnp.finfo(scalar).max)) - 1.0
  floor = jnp.where(jnp.any(live), floor, 0.0)
  diagonal = jnp.where(live, scaled_alphas, floor)
  tridiagonal = (jnp.diag(diagonal) + jnp.diag(couplings, 1)
                 + jnp.diag(couplings, -1))
  ritz_values, ritz_coeffs = jnp.linalg.eigh(tridiagonal)
  ritz_values = ritz_values / scale
  top = jnp.arange(m - 1, m - 1 - k, -1)
  values = ritz_values[top]
  coeffs = ritz_coeffs[:, top]  # (m, k)
  last = jnp.sum(live) - 1
  residuals = jnp.abs(betas[last] * coeffs[last])
  is_real = live[jnp.argmax(jnp.abs(coeffs), axis=0)]
  residuals = _or_inf(is_real, residuals)
  return values, coeffs, residuals
