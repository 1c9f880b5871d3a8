"""What both SAM ascents (``sam_ascent`` and Eigen-SAM's) share: the
gradient at the SAM point, computed with ``grad_fn``, and the optional check
that the incoming gradient is ``grad_fn(params)``."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xsam_optax import _groups
from xsam_optax import _tree
from xsam_optax import _validation


INCOMING_HELP = (
    "X-SAM transforms recompute the gradient with grad_fn, so whatever "
    "changed it before them only tilts the SAM perturbation and is otherwise "
    "lost. Likely causes: a transform chained before sam_ascent / sam() / "
    "xsam() / eigen_sam_ascent (clipping, weight decay, ...: put it in the "
    "base optimizer, e.g. xsam(optax.chain(optax.clip_by_global_norm(1.0), "
    "optax.add_decayed_weights(5e-4), optax.sgd(0.1)))); optax.MultiSteps "
    "around it (it passes the running mean of micro-batch gradients, but "
    "grad_fn is the last micro-batch's: use "
    "xsam_optax.accumulated_grad_fn(loss_fn, batch, num_microbatches) as "
    "grad_fn instead); or a grad_fn of another loss or batch than the "
    "incoming gradient."
)


def call_grad_fn(grad_fn: Callable[[_tree.PyTree], _tree.PyTree], tree: _tree.PyTree, *,
                 owner: str) -> _tree.PyTree:
  """``grad_fn(tree)``; a failure gets a note saying what it was given."""
  try:
    return grad_fn(tree)
  except Exception as e:
    if hasattr(e, "add_note"):  # Python >= 3.11
      e.add_note(
          f"(grad_fn failed when xsam_optax.{owner} called it with one "
          "argument, parameters shaped like the params it received: "
          f"{jax.tree.structure(tree)}. grad_fn takes the parameters alone, "
          "e.g. jax.grad(lambda p: loss_fn(p, batch)). Inside an optax "
          "wrapper that changes the parameters' structure (optax.flatten, "
          "optax.masked, optax.multi_transform) it cannot work; see "
          "docs/guide.md, 'Composing with optax, Flax and Equinox'.)")
    raise


def checked_call(updates: _tree.PyTree, params: _tree.PyTree, grad_fn, check_incoming,
                 batch_axis_name: _tree.AxisName, *, owner: str) -> _tree.PyTree:
  """What every ascent's ``update`` checks first; returns ``params`` as arrays.

  ``grad_fn`` is required, ``check_incoming`` must be a Python bool and, when
  true, the incoming ``updates`` must be ``grad_fn(params)``
  (:func:`verify_incoming`).
  """
  _validation.require_grad_fn(grad_fn, params, owner=owner)
  params = _tree.as_arrays(params)
  _validation.check_bool("check_incoming", check_incoming)
  if check_incoming:
    verify_incoming(updates, params, grad_fn, batch_axis_name, owner=owner)
  return params


def sam_point(updates: _tree.PyTree, params: _tree.PyTree, rho, adaptive: bool) -> _tree.PyTree:
  """``params + eps``: SAM's worst-case point for the gradient ``updates``.

  ``eps = rho g / ||g||``; with ``adaptive`` (ASAM) the ball is scaled by
  ``|params|``: ``eps = rho T^2 g / ||T g||``, ``T = |params|``. A NaN or
  infinite ``rho`` array acts as 0: the point is ``params``.
  """
  rho = _validation.finite_or_zero(rho)
  if adaptive:
    scaled = jax.tree.map(lambda g, w: g * jnp.abs(w), updates, params)
    direction, _ = _tree.safe_normalize(scaled)
    direction = jax.tree.map(lambda d, w: d * jnp.abs(w), direction, params)
  else:
    direction, _ = _tree.safe_normalize(updates)
  return _tree.add_scaled(params, rho, direction)


def _one_group(stacked: _tree.PyTree) -> _tree.PyTree:
  """Shapes and dtypes of one group's tree (no slicing of a sharded group axis)."""
  return jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape[1:], g.dtype), stacked)


def group_sam_points(grad_fn: _groups.GroupedGradFn, params: _tree.PyTree,
                     point_of: Callable[[_tree.PyTree], _tree.PyTree]) -> _tree.PyTree:
  """Each group's SAM point, stacked: ``point_of(g_i)`` for its gradient ``g_i``.

  ``point_of`` maps one gradient (a tree like ``params``) to its point, or
  to a tuple of its point and per-group extras (Eigen-SAM's cosine), stacked
  alike; it is mapped over the groups, so each group's norm and direction
  are its own.
  """
  stacked = grad_fn.per_group(params)
  _tree.check_same_structure(params, _one_group(stacked), what="grad_fn.per_group")
  return jax.vmap(point_of)(stacked)


def grouped_sam_gradient(grad_fn: _groups.GroupedGradFn, points: _tree.PyTree,
                         params: _tree.PyTree, batch_axis_name: _tree.AxisName
                         ) -> _tree.PyTree:
  """The mean over groups of each group's gradient at its own point (finished)."""
  stacked = grad_fn.at(points)
  _tree.check_same_structure(params, _one_group(stacked), what="grad_fn.at")
  return finish_sam_gradient(_groups.group_mean(stacked, params), params,
                             batch_axis_name)


def finish_sam_gradient(grads: _tree.PyTree, params: _tree.PyTree,
                        batch_axis_name: _tree.AxisName) -> _tree.PyTree:
  """``grad_fn``'s output at the SAM point, averaged; zeros if not finite.

  A loss can be finite at ``params`` and not at ``params + eps``: the base
  optimizer then gets a zero gradient (as with X-SAM's normalisation), so
  no NaN reaches the parameters. ``optax.apply_if_finite`` cannot see this
  case: it checks the incoming gradient, which is finite.
  """
  _tree.check_same_structure(params, grads, what="grad_fn")
  grads = _tree.batch_mean(grads, batch_axis_name)
  finite = _tree.all_leaves(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
  return jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)),
                      grads)


def sam_gradient(grad_fn: Callable[[_tree.PyTree], _tree.PyTree], point: _tree.PyTree,
                 params: _tree.PyTree, batch_axis_name: _tree.AxisName, *,
                 owner: str) -> _tree.PyTree:
  """The gradient at the SAM point (:func:`finish_sam_gradient`)."""
  return finish_sam_gradient(call_grad_fn(grad_fn, point, owner=owner),
                             params, batch_axis_name)


def _raise_if_differ(owner: str, difference, reference, tolerance) -> None:
  difference, reference = float(difference), float(reference)
  if not (np.isfinite(difference) and np.isfinite(reference)):
    return  # A NaN/inf gradient is a numerical fault, not a composition one.
  if difference > tolerance * reference:
    relative = difference / reference if reference > 0 else float("inf")
    raise ValueError(
        f"{owner}: the incoming updates differ from grad_fn(params) "
        f"(relative difference {relative:.3g}, tolerance {tolerance:.2g}). "
        f"{INCOMING_HELP}")


def verify_incoming(updates: _tree.PyTree, params: _tree.PyTree,
                    grad_fn: Callable[[_tree.PyTree], _tree.PyTree],
                    batch_axis_name: _tree.AxisName, *, owner: str) -> None:
  """Raises if ``updates`` is not ``grad_fn(params)`` (costs one gradient).

  Eagerly the ``ValueError`` is raised here; in a traced step (``jax.jit``,
  ``lax.cond`` inside ``optax.MultiSteps``) it is raised on the host by a
  ``jax.debug.callback`` when the step runs, and arrives wrapped in JAX's
  runtime error. The tolerance is the square root of the machine epsilon of
  the least precise float dtype among the incoming leaves (bfloat16's in a
  bfloat16 / float32 tree), relative to ``||grad_fn(params)||``: rounding
  passes, a clip or a weight decay does not.
  """
  expected = _tree.batch_mean(call_grad_fn(grad_fn, params, owner=owner),
                              batch_axis_name)
  _tree.check_same_structure(params, expected, what="grad_fn")
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return
  tolerance = float(np.sqrt(max(
      jnp.finfo(jnp.result_type(x)).eps if _tree.is_float(x) else 0.0
      for x in leaves)))

  def leaf_difference(u, g):
    acc = jnp.result_type(jnp.float32, u, g)
    return jnp.asarray(u, acc) - jnp.asarray(g, acc)

  difference = jax.tree.map(leaf_difference, updates, expected)
  difference = _tree.global_norm(difference)
  reference = _tree.global_norm(expected)
  try:
    _raise_if_differ(owner, difference, reference, tolerance)
  except jax.errors.ConcretizationTypeError:
    jax.debug.callback(
        lambda d, r: _raise_if_differ(owner, d, r, tolerance),
        difference, reference)
