"""Tracking the Hessian's top eigenvector across steps.

Shared by :func:`eigenvector_correction` (X-SAM) and :func:`eigen_sam_ascent`
(Eigen-SAM): both keep ``count, key, eigenvector, eigenvalue, residual,
cos_angle`` in their state and refresh the eigenvector on a schedule.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

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
    _validation.check_axis_name("batch_axis_name", self.batch_axis_name)
    return self


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


def _refreshed(state, params, grad_fn, schedule: Schedule):
  matvec = lambda v: _sam.batch_mean(_hvp.hvp(grad_fn, params, v),
                                     schedule.batch_axis_name)
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
) -> tuple[PyTree, jax.Array, jax.Array]:
  """The eigenvector, eigenvalue and residual to use at this step.

  ``refresh=None`` follows the schedule (``count % update_every == 0``,
  under ``lax.cond``); a Python bool is the host's choice (no ``cond``); an
  array is a traced choice (``lax.cond``). Hessian-vector products
  differentiate ``hvp_grad_fn`` when given (e.g. the gradient on a sub-batch),
  else ``grad_fn``.
  """
  _sam.require_grad_fn(grad_fn, params, owner=owner)
  _tree.check_same_structure(
      params, jax.eval_shape(grad_fn, params), what="grad_fn")
  if hvp_grad_fn is None:
    hvp_grad_fn = grad_fn
  else:
    if not callable(hvp_grad_fn):
      raise ValueError(
          f"{owner}: hvp_grad_fn must be callable (params -> gradient "
          f"pytree) or None, got {hvp_grad_fn!r}.")
    _tree.check_same_structure(
        params, jax.eval_shape(hvp_grad_fn, params), what="hvp_grad_fn")
  if refresh is None:
    refresh = state.count % schedule.update_every == 0
  if isinstance(refresh, bool):
    if refresh:
      return _refreshed(state, params, hvp_grad_fn, schedule)
    return _kept(state)
  return jax.lax.cond(
      refresh,
      lambda s: _refreshed(s, params, hvp_grad_fn, schedule),
      _kept,
      state)
