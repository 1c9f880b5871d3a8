"""Eigen-SAM: SAM's ascent tilted towards the top Hessian eigenvector."""

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import optax

from xsam_optax import _ascent
from xsam_optax import _float_leaves
from xsam_optax import _groups
from xsam_optax import _tracking
from xsam_optax import _tree
from xsam_optax import _validation


def eigen_sam_ascent(
    rho: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.05,
    alpha: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.2,
    *,
    update_every: int = 100,
    num_iters: int = 5,
    method: _tracking.Method = "power",
    seed: int = 0,
    batch_axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Eigen-SAM's ascent: the perturbation leans towards the top eigenvector.

  With :math:`\hat g = g/\|g\|`, the tracked top eigenvector :math:`v` and
  :math:`v_\perp = v - \langle \hat g, v\rangle \hat g`:

  .. math::
    d = \hat g + \alpha\,\mathrm{sign}(\langle g, v\rangle)\, v_\perp, \qquad
    g_{adv} = \nabla L(\theta + \rho\, d / \|d\|).

  ``alpha=0`` is plain SAM. The eigenvector is tracked exactly as in
  :func:`eigenvector_correction` (refresh every ``update_every`` steps from
  step 0, by ``method``, warm-started), with the
  defaults of the Eigen-SAM paper. Chain it in front of the base optimizer:
  ``optax.chain(eigen_sam_ascent(), optax.sgd(0.1, momentum=0.9))``. Like
  :func:`sam_ascent` it replaces the gradient by one computed with
  ``grad_fn`` (put clipping and weight decay after it, in the base
  optimizer; ``update(..., check_incoming=True)`` checks the placement), and
  a gradient that is not finite at the SAM point becomes zeros. ``rho`` and
  ``alpha`` given as arrays (``optax.inject_hyperparams``) are not checked;
  a NaN or infinite one acts as 0 (``alpha``: plain SAM; ``rho``: the
  gradient at ``params``). Complex leaves in ``params`` are refused, as in
  :func:`eigenvector_correction`.

  ``rho`` and ``alpha`` may be schedules, callables of the step count (the
  state's ``count``), as optax's learning rates; a scheduled value below 0
  or not finite acts as 0. With ``grad_fn`` from :func:`grouped_grad_fn`
  each group's point uses its own gradient :math:`g_i` in the formula above
  (the same tracked :math:`v`, refreshed on the whole batch's Hessian) and
  :math:`g_{adv}` is the mean of the groups' gradients at their points; the
  state's ``cos_angle`` stays the incoming (whole-batch) gradient's.

  Args:
    rho: radius of the neighbourhood (``>= 0``), or a schedule.
    alpha: weight of the eigenvector component (``>= 0``), or a schedule.
    update_every: refresh period in steps.
    num_iters: products per refresh of a named ``method``; leave it at its
      default with a callable ``method``.
    method: ``"power"``, ``"lanczos"`` or a callable ``(matvec, v0) ->
      EigenResult`` (see :func:`eigenvector_correction`; with
      :func:`optax.inject_hyperparams`, name a callable in ``static_args``).
    seed: seed of the initial random eigenvector.
    batch_axis_name: mapped axis over which ``grad_fn``'s gradients and
      Hessian-vector products are averaged.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` needing ``params`` and
    ``grad_fn``; ``update`` accepts ``refresh`` and ``curvature_fn`` like
    :func:`eigenvector_correction`, and ``check_incoming`` like
    :func:`sam_ascent`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> curvature = jnp.array([10.0, 1.0])
    >>> grad_fn = jax.grad(lambda p: jnp.sum(curvature * p["w"] ** 2))
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> tx = optax.chain(xsam_optax.eigen_sam_ascent(0.05, 0.2), optax.sgd(0.01))
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grad_fn(params), opt_state, params,
    ...                                grad_fn=grad_fn)
    >>> ascent_state = opt_state[0]  # an EigenvectorState
    >>> round(float(ascent_state.eigenvalue), 3), int(ascent_state.count)
    (20.0, 1)

  References:
    Luo et al., `Explicit Eigenvalue Regularization Improves Sharpness-Aware
    Minimization <https://arxiv.org/abs/2501.12666>`_, NeurIPS 2024.
  """
  _validation.check_hyperparameter("rho", rho, minimum=0.0)
  _validation.check_hyperparameter("alpha", alpha, minimum=0.0)
  _validation.check_int("seed", seed, minimum=0)
  settings = _tracking.refresh_settings(
      update_every, num_iters, method, batch_axis_name, owner=eigen_sam_ascent)

  def init_fn(params):
    return _tracking.initial_state(params, seed)

  def update_fn(updates, state, params=None, *, grad_fn=None, refresh=None,
                curvature_fn=None, check_incoming=False, **extra_args):
    _tracking.reject_removed_extras(extra_args, owner="eigen_sam_ascent")
    del extra_args
    params = _ascent.checked_call(updates, params, grad_fn, check_incoming,
                                  batch_axis_name, owner="eigen_sam_ascent")
    eigenvector, eigenvalue, residual = _tracking.track(
        state, params, grad_fn, settings, refresh, owner="eigen_sam_ascent",
        curvature_fn=curvature_fn)
    # Arrays set at run time (optax.inject_hyperparams) are unchecked: a
    # non-finite one acts as 0, as the docstring says; so does a scheduled
    # value below 0.
    rho_now = _validation.value_at(rho, state.count)
    alpha_now = _validation.value_at(alpha, state.count)

    def point_of(g):
      unit, _ = _tree.safe_normalize(g)
      cos = _tree.vdot(unit, eigenvector).astype(state.cos_angle.dtype)
      perpendicular = _tree.add_scaled(eigenvector, -cos, unit)
      direction = _tree.add_scaled(unit, alpha_now * jnp.sign(cos),
                                   perpendicular)
      # A sum of unit vectors, entries at most 1 + 2 alpha: no scaling
      # needed (and none paid for) before its squares.
      direction, _ = _tree.safe_normalize(direction, scale=1.0)
      return _tree.add_scaled(params, rho_now, direction), cos

    if _groups.is_grouped(grad_fn):
      points, _ = _ascent.group_sam_points(grad_fn, params, point_of)
      cos = _tree.vdot(_tree.safe_normalize(updates)[0], eigenvector)
      adv_grads = _ascent.grouped_sam_gradient(grad_fn, points, params,
                                               batch_axis_name)
    else:
      point, cos = point_of(updates)
      adv_grads = _ascent.sam_gradient(grad_fn, point, params,
                                       batch_axis_name, owner="eigen_sam_ascent")
    return adv_grads, _tracking.next_state(
        state, (eigenvector, eigenvalue, residual),
        cos.astype(state.cos_angle.dtype))

  return _tracking.with_schedule(_float_leaves.on_float_leaves(
      optax.GradientTransformationExtraArgs(init_fn, update_fn),
      owner="eigen_sam_ascent"), settings.update_every)
