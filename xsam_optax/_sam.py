"""The SAM ascent step as an optax transform."""

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import optax

from xsam_optax import _ascent
from xsam_optax import _float_leaves
from xsam_optax import _groups
from xsam_optax import _tree
from xsam_optax import _validation



def sam_ascent(
    rho: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.05,
    *,
    adaptive: bool = False,
    batch_axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the gradient by the gradient at SAM's worst-case point.

  .. math::
    \epsilon = \rho \, g / \|g\|, \qquad
    g_{adv} = \nabla L(\theta + \epsilon).

  With ``adaptive=True`` (ASAM), the ball is scaled elementwise by
  :math:`T = |\theta|`: :math:`\epsilon = \rho\, T^2 g / \|T g\|`. A zero
  gradient gives :math:`\epsilon = 0`. The incoming ``g`` is the caller's
  (average it across devices yourself, as with ``optax.contrib.sam``); the
  gradients computed here with ``grad_fn`` are averaged over
  ``batch_axis_name`` when it is set.

  Chain it in front of any optimizer: ``optax.chain(sam_ascent(0.05),
  optax.sgd(0.1))`` is SAM with SGD.

  **Place it first; clip and decay after it.** The ascent *replaces* the
  gradient by one it computes with ``grad_fn``, so a transform chained
  before it (``optax.clip_by_global_norm``, ``optax.add_decayed_weights``,
  ...) only tilts the perturbation and is otherwise lost. Put such
  transforms after it, in the base optimizer:
  ``optax.chain(sam_ascent(0.05), optax.clip_by_global_norm(1.0),
  optax.sgd(0.1))``. ``update(..., check_incoming=True)`` verifies that the
  incoming gradient is ``grad_fn(params)`` and raises otherwise, and also
  catches ``optax.MultiSteps`` around the ascent (accumulate with
  :func:`accumulated_grad_fn` instead). It is off by default because it is
  not free: it evaluates ``grad_fn(params)`` once more, which XLA merges with
  your own only when, in the same jitted step, the incoming gradient is
  ``grad_fn(params)`` itself (not a ``value_and_grad`` of another function),
  and under ``jax.jit`` it reports through a host callback on every step.
  Turn it on while setting up a training loop, or for a few steps.

  **A loss not finite at the SAM point** (finite at :math:`\theta`, not at
  :math:`\theta + \epsilon`) gives a zero gradient to the base optimizer,
  never NaN. ``optax.apply_if_finite`` cannot catch this case, since the
  incoming gradient is finite.

  **Integer leaves** of ``params`` (a step counter) are no direction of the
  loss: their incoming updates pass through unchanged, and the perturbation
  and its norm use the float leaves. **Complex leaves** are refused (a
  ``ValueError`` naming the leaf, in ``init`` and ``update``): keep the real
  and imaginary parts as two real leaves and rebuild the complex value in
  the loss.

  **rho set at run time.** A ``rho`` array (``optax.inject_hyperparams``,
  or a value changed in its state while training) is not checked; a NaN or
  infinite one acts as 0, so the base optimizer gets the gradient at
  ``params`` itself.

  **rho schedules.** ``rho`` may be a schedule, a callable of the step count
  like optax's learning rates (``optax.linear_schedule(0.0, 0.05, 1000)``
  warms it up). The state then counts the steps
  (``optax.ScaleByScheduleState``; with a number it stays
  ``optax.EmptyState``, so existing checkpoints keep their structure). A
  scheduled value below 0 or not finite acts as 0.

  **Per-group perturbations (m-sharpness).** With ``grad_fn`` from
  :func:`grouped_grad_fn` each group of the batch is perturbed along its own
  gradient (its own norm and, with ``adaptive``, its own scaled ball) and
  the base optimizer gets the mean over groups of each group's gradient at
  its point; the incoming gradient is then not used.

  Args:
    rho: radius of the neighbourhood (``>= 0``), or a schedule of the step
      count.
    adaptive: ASAM's scale-invariant neighbourhood.
    batch_axis_name: mapped axis over which to average ``grad_fn``'s output.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs
    ``params`` and the keyword argument ``grad_fn``, and accepts
    ``check_incoming`` (a Python bool).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> loss = lambda p: jnp.sum(p["w"] ** 4)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax.chain(xsam_optax.sam_ascent(0.05), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(loss)
    >>> updates, state = tx.update(grad_fn(params), state, params,
    ...                            grad_fn=grad_fn)
    >>> params = optax.apply_updates(params, updates)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.
    Kwon et al., `ASAM <https://arxiv.org/abs/2102.11600>`_, 2021.
  """
  _validation.check_hyperparameter("rho", rho, minimum=0.0)
  _validation.check_bool("adaptive", adaptive)
  _validation.check_axis_name("batch_axis_name", batch_axis_name)
  scheduled = callable(rho)

  def init_fn(params):
    del params
    if scheduled:
      return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, grad_fn=None,
                check_incoming=False, **extra_args):
    del extra_args
    params = _ascent.checked_call(updates, params, grad_fn, check_incoming,
                                  batch_axis_name, owner="sam_ascent")
    rho_now = _validation.value_at(rho, state.count if scheduled else None)
    if scheduled:
      state = optax.ScaleByScheduleState(
          count=optax.safe_increment(state.count))
    point_of = lambda g: _ascent.sam_point(g, params, rho_now, adaptive)
    if _groups.is_grouped(grad_fn):
      points = _ascent.group_sam_points(grad_fn, params, point_of)
      return _ascent.grouped_sam_gradient(grad_fn, points, params,
                                          batch_axis_name), state
    return _ascent.sam_gradient(grad_fn, point_of(updates), params,
                                batch_axis_name, owner="sam_ascent"), state

  return _float_leaves.on_float_leaves(
      optax.GradientTransformationExtraArgs(init_fn, update_fn),
      owner="sam_ascent")
