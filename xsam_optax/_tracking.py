"""Tracking the Hessian's top eigenvector across steps.

Shared by :func:`eigenvector_correction` (X-SAM) and :func:`eigen_sam_ascent`
(Eigen-SAM): both keep ``count, key, eigenvector, eigenvalue, residual,
cos_angle`` in their state and refresh the eigenvector on a schedule.
"""

from collections.abc import Callable
import functools
import numbers
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from xsam_optax import _estimators
from xsam_optax import _hvp
from xsam_optax import _sam
from xsam_optax import _tree
from xsam_optax import _validation

PyTree = Any
METHODS = ("power", "lanczos")


class Schedule(NamedTuple):
  """Static settings of the refresh: how often, how many products, which."""

  update_every: int
  num_iters: int
  method: str
  batch_axis_name: _sam.AxisName

  def validate(self) -> "Schedule":
    _validation.check_int("update_every", self.update_every, minimum=1)
    _validation.check_int("num_iters", self.num_iters, minimum=1)
    _validation.check_choice("method", self.method, METHODS)
    if self.method == "lanczos" and self.num_iters < 2:
      raise ValueError(
          f"num_iters must be >= 2 with method='lanczos', got "
          f"{self.num_iters}: one product spans only the start vector, so "
          "the eigenvector would never change. Use method='power' for "
          "single-product refreshes.")
    _validation.check_axis_name("batch_axis_name", self.batch_axis_name)
    return self


def refresh_due(step: int, update_every: int = 5) -> bool:
  """Whether ``step`` is a refresh step: the host's copy of the schedule.

  ``True`` at steps ``0, update_every, 2 * update_every, ...``: the steps on
  which the transforms refresh when ``update`` gets no ``refresh`` (the state's
  ``count`` is the step). Pass the result as ``refresh=`` (a Python bool) to
  ``update`` inside a step jitted with ``static_argnames="refresh"``: the host
  then picks one of two compiled steps, and neither contains a ``lax.cond``.
  That is the fast way to run X-SAM: on XLA:CPU a refresh under ``lax.cond``
  runs its convolutions about ten times slower (``benchmarks/``).

  Examples:
    >>> import xsam_optax
    >>> [step for step in range(12) if xsam_optax.refresh_due(step, 5)]
    [0, 5, 10]

  Args:
    step: the host's step counter, a non-negative Python or NumPy int (the
      number of ``update`` calls before this one).
    update_every: the transform's refresh period.

  Returns:
    A Python bool.
  """
  _validation.check_int("update_every", update_every, minimum=1)
  if isinstance(step, jax.Array):
    try:
      step = np.asarray(step)
    except jax.errors.TracerArrayConversionError:
      raise ValueError(
          "refresh_due: step is traced (called inside jit); it is for the "
          "host loop. Inside a jitted step, leave update's refresh=None to "
          "follow the schedule under lax.cond.") from None
  if isinstance(step, np.ndarray) and step.shape == ():
    step = step.item()
  if (isinstance(step, bool) or not isinstance(step, numbers.Integral)
      or step < 0):
    raise ValueError(
        f"step must be a non-negative int (the host's step counter), got "
        f"{step!r}.")
  return int(step) % update_every == 0


def initial_fields(params: PyTree, seed: int) -> dict[str, Any]:
  """Fields of a fresh state: a random unit eigenvector drawn from ``seed``."""
  key, draw = jax.random.split(jax.random.PRNGKey(seed))
  scalar = _estimators.scalar_dtype(params)
  return dict(
      count=jnp.zeros((), jnp.int32),
      key=key,
      eigenvector=_tree.random_unit_like(draw, params),
      eigenvalue=jnp.zeros((), scalar),
      residual=jnp.full((), jnp.inf, scalar),
      cos_angle=jnp.zeros((), scalar),
  )


def _refreshed(state, product, schedule: Schedule):
  matvec = lambda v: _sam.batch_mean(product(v), schedule.batch_axis_name)
  if schedule.method == "power":
    result = _estimators.power_iteration(
        matvec, state.eigenvector, num_iters=schedule.num_iters)
  else:
    result = _estimators.lanczos(
        matvec, state.eigenvector, num_iters=schedule.num_iters)
  _, norm = _tree.safe_normalize(result.eigenvector)
  # The estimators report a failed product as a finite eigenvalue with an
  # infinite residual: keep the previous estimate then.
  ok = (jnp.isfinite(result.eigenvalue) & jnp.isfinite(result.residual)
        & _tree.is_usable(norm))
  return (
      _tree.select(ok, result.eigenvector, state.eigenvector),
      jnp.where(ok, result.eigenvalue, state.eigenvalue).astype(
          state.eigenvalue.dtype),
      jnp.where(ok, result.residual, jnp.inf).astype(state.residual.dtype),
  )


def _kept(state):
  return state.eigenvector, state.eigenvalue, state.residual


def track(
    state: NamedTuple,
    params: PyTree,
    grad_fn: Callable[[PyTree], PyTree],
    schedule: Schedule,
    refresh: Union[None, bool, jax.Array],
    *,
    owner: str,
    hvp_grad_fn: Optional[Callable[[PyTree], PyTree]] = None,
    curvature_fn: Optional[Callable[[PyTree, PyTree], PyTree]] = None,
) -> tuple[PyTree, jax.Array, jax.Array]:
  """The eigenvector, eigenvalue and residual to use at this step.

  ``refresh=None`` follows the schedule (``count % update_every == 0``,
  under ``lax.cond`` unless ``update_every == 1``); a Python or NumPy bool
  is the host's choice (no ``cond``, see :func:`refresh_due`); an array is a
  traced choice (``lax.cond``). A refresh multiplies by the Hessian of
  ``hvp_grad_fn`` when given (e.g. the gradient on a sub-batch), else of
  ``grad_fn``; or calls ``curvature_fn(params, v)`` when given (e.g.
  :func:`gauss_newton_fn`).
  """
  _sam.require_grad_fn(grad_fn, params, owner=owner)
  params = _sam.as_arrays(params)
  refresh = _validation.check_refresh(refresh)
  _tree.check_same_structure(
      params, jax.eval_shape(grad_fn, params), what="grad_fn")
  if hvp_grad_fn is not None and curvature_fn is not None:
    raise ValueError(
        f"{owner}: pass hvp_grad_fn or curvature_fn, not both: both say what "
        "a refresh multiplies by.")
  if curvature_fn is not None:
    if not callable(curvature_fn):
      raise ValueError(
          f"{owner}: curvature_fn must be callable ((params, v) -> product "
          f"pytree) or None, got {curvature_fn!r}.")
    _tree.check_same_structure(
        params, jax.eval_shape(curvature_fn, params, params),
        what="curvature_fn")
    product = lambda v: curvature_fn(params, v)
  else:
    if hvp_grad_fn is None:
      hvp_grad_fn = grad_fn
    elif not callable(hvp_grad_fn):
      raise ValueError(
          f"{owner}: hvp_grad_fn must be callable (params -> gradient "
          f"pytree) or None, got {hvp_grad_fn!r}.")
    else:
      _tree.check_same_structure(
          params, jax.eval_shape(hvp_grad_fn, params), what="hvp_grad_fn")
    product = functools.partial(_hvp.hvp, hvp_grad_fn, params)
  if not jax.tree.leaves(params):
    return _kept(state)  # Nothing to estimate.
  if refresh is None:
    # Every step refreshes when update_every == 1: no lax.cond needed.
    refresh = (True if schedule.update_every == 1
               else state.count % schedule.update_every == 0)
  if isinstance(refresh, jax.Array):
    # Called without jit the choice is known here; a lax.cond would be
    # traced and compiled anew at every call (seconds per step).
    try:
      refresh = bool(refresh)
    except jax.errors.ConcretizationTypeError:
      pass
  if isinstance(refresh, (bool, np.bool_)):
    if refresh:
      return _refreshed(state, product, schedule)
    return _kept(state)
  return jax.lax.cond(
      refresh,
      lambda s: _refreshed(s, product, schedule),
      _kept,
      state)
