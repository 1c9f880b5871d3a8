"""X-SAM with the Hessian taken at the SAM point, where one ``jax.jvp`` gives
the SAM gradient and a refresh's product together."""

from collections.abc import Callable
from typing import Any, Union

import jax
import optax

from xsam_optax import _ascent
from xsam_optax import _correction
from xsam_optax import _estimators
from xsam_optax import _sam
from xsam_optax import _tracking
from xsam_optax import _tree

PyTree = Any
OWNER = "xsam(hessian_at='sam_point')"


def _fused_refresh(grad_fn: Callable[[PyTree], PyTree], point: PyTree,
                   state, settings: _tracking.RefreshSettings):
  """A refresh at ``point`` whose products also return ``grad_fn(point)``.

  Every product is ``jax.jvp(grad_fn, (point,), (v,))``: its primal output
  is the SAM gradient, so the step needs no separate gradient there (XLA
  drops the primal of the other products). Only for estimators that call
  the product at the top level of the trace (named methods, unrolled).
  """
  primals = []

  def product(v):
    grads, tangent = jax.jvp(grad_fn, (point,), (v,))
    primals.append(grads)
    return tangent

  estimate = _tracking.refreshed(state, product, settings)
  return estimate, (primals[0] if primals else None)


def _estimate_and_sam_gradient(grad_fn, point, params, state, settings, *,
                               refresh, curvature_fn, fusable: bool,
                               batch_axis_name: _tree.AxisName):
  """This step's ``(eigenvector, eigenvalue, residual)`` and SAM gradient.

  Fused when the refresh runs at the top level of the trace with the
  Hessian of ``grad_fn``; otherwise :func:`_tracking.track` at the SAM
  point (``lax.cond`` for a traced choice) and a separate SAM gradient.
  """
  if (fusable and curvature_fn is None and jax.tree.leaves(params)
      and _tracking.resolve_refresh(state, refresh, settings) is True):
    _tree.check_same_structure(
        params, jax.eval_shape(grad_fn, params), what="grad_fn")
    estimate, sam_grads = _fused_refresh(grad_fn, point, state, settings)
    if sam_grads is not None:
      return estimate, _ascent.finish_sam_gradient(sam_grads, params,
                                                   batch_axis_name)
  else:
    estimate = _tracking.track(state, point, grad_fn, settings, refresh,
                               owner=OWNER, curvature_fn=curvature_fn)
  return estimate, _ascent.sam_gradient(grad_fn, point, params,
                                        batch_axis_name, owner=OWNER)


def xsam_at_sam_point(
    optimizer: optax.GradientTransformation,
    *,
    rho: Union[float, jax.Array],
    alpha: Union[float, jax.Array],
    update_every: int,
    num_iters: int,
    method: _tracking.Method,
    sign_invariant: bool,
    normalize: bool,
    adaptive: bool,
    seed: int,
    batch_axis_name: _tree.AxisName,
) -> optax.GradientTransformationExtraArgs:
  """:func:`xsam` whose refreshes multiply by the Hessian at the SAM point.

  State and arguments are those of ``xsam(..., hessian_at="params")`` (the
  same ``optax.chain`` state, so checkpoints and ``optax.tree.get`` work
  alike); only the point of the curvature products differs:
  :math:`H(\\theta + \\epsilon)` instead of :math:`H(\\theta)`, and a
  ``curvature_fn`` is called with the SAM point as its parameters.
  """
  chained = optax.chain(
      _sam.sam_ascent(rho, adaptive=adaptive, batch_axis_name=batch_axis_name),
      _correction.eigenvector_correction(
          alpha, update_every=update_every, num_iters=num_iters,
          method=method, sign_invariant=sign_invariant, normalize=normalize,
          seed=seed, batch_axis_name=batch_axis_name),
      optimizer,
  )
  settings = _tracking.refresh_settings(
      update_every, num_iters, method, batch_axis_name,
      owner=_correction.eigenvector_correction)
  # Named methods unroll up to UNROLL_UP_TO products: every product is then
  # traced at the top level, where its primal output can be used.
  fusable = isinstance(method, str) and num_iters <= _estimators.UNROLL_UP_TO
  base = optax.with_extra_args_support(optimizer)

  def update_fn(updates, state, params=None, **extra_args):
    grad_fn = extra_args.get("grad_fn")
    _tracking.reject_removed_extras(extra_args, owner=OWNER)
    params = _ascent.checked_call(updates, params, grad_fn,
                                  extra_args.get("check_incoming", False),
                                  batch_axis_name, owner=OWNER)
    sam_state, correction_state, base_state = state
    point = _ascent.sam_point(updates, params, rho, adaptive)
    estimate, sam_grads = _estimate_and_sam_gradient(
        grad_fn, point, params, correction_state, settings,
        refresh=extra_args.get("refresh"),
        curvature_fn=extra_args.get("curvature_fn"), fusable=fusable,
        batch_axis_name=batch_axis_name)
    corrected, correction_state = _correction.corrected_and_state(
        sam_grads, correction_state, estimate, alpha,
        sign_invariant=sign_invariant, normalize=normalize)
    updates, base_state = base.update(corrected, base_state, params,
                                      **extra_args)
    return updates, (sam_state, correction_state, base_state)

  return optax.GradientTransformationExtraArgs(chained.init, update_fn)
