"""The SAM ascent step as an optax transform, and what every X-SAM transform
checks about ``update``'s arguments."""

from collections.abc import Callable
import inspect
import os
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_optax import _tree
from xsam_optax import _validation

PyTree = Any
AxisName = Optional[Union[str, tuple[str, ...]]]

GRAD_FN_HELP = (
    "Pass the gradient of the training loss on the current mini-batch as a "
    "keyword argument, e.g.\n"
    "  grad_fn = jax.grad(lambda p: loss(p, batch))\n"
    "  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)"
)
WRAPPERS_HELP = (
    "If you did pass grad_fn, something between your call and this "
    "transform dropped it: flax's TrainState.apply_gradients (use "
    "xsam_optax.flax_utils.TrainState, which forwards it) and optax.lookahead "
    "do not forward keyword arguments to tx.update (README, 'Composing with "
    "optax and Flax', shows how to bind grad_fn for such wrappers)."
)
TRAIN_STATE_HELP = (
    "flax.training.train_state.TrainState.apply_gradients called tx.update "
    "without it: it passes extra keyword arguments (grad_fn=...) to "
    ".replace(), not to tx.update. Use xsam_optax.flax_utils.TrainState, "
    "whose apply_gradients forwards them:\n"
    "  from xsam_optax.flax_utils import TrainState\n"
    "  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)\n"
    "  state = state.apply_gradients(grads=grads, grad_fn=grad_fn)"
)
MASKED_HELP = (
    "params contains optax.MaskedNode leaves: this transform runs inside "
    "optax.masked or optax.multi_transform, which hide the other parameters "
    "from it, so grad_fn cannot be evaluated at the parameters the loss "
    "needs. To keep parameters frozen, give the X-SAM optimizer only the "
    "trainable ones and close the loss over the frozen ones:\n"
    "  grad_fn = jax.grad(lambda t: loss({**t, **frozen}, batch))\n"
    "  updates, state = tx.update(grad_fn(trainable), state, trainable, "
    "grad_fn=grad_fn)\n"
    "(README, 'Composing with optax and Flax')."
)
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


class SamAscentState(NamedTuple):
  """``sam_ascent`` keeps no state."""


def _called_from_flax_train_state() -> bool:
  """Whether flax's ``TrainState.apply_gradients`` is on the call stack."""
  suffix = os.path.join("flax", "training", "train_state.py")
  frame = inspect.currentframe()
  while frame is not None:
    code = frame.f_code
    if code.co_name == "apply_gradients" and code.co_filename.endswith(suffix):
      return True
    frame = frame.f_back
  return False


def _has_masked_node(tree: PyTree) -> bool:
  masked_node = optax.MaskedNode
  return any(isinstance(x, masked_node) for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, masked_node)))


def require_grad_fn(grad_fn: Optional[Callable[[PyTree], PyTree]],
                    params: Optional[PyTree], *, owner: str) -> None:
  """Clear errors for the two arguments every X-SAM transform needs."""
  if grad_fn is None:
    if _called_from_flax_train_state():
      raise ValueError(f"{owner}.update needs grad_fn, and "
                       f"{TRAIN_STATE_HELP}")
    raise ValueError(
        f"{owner}.update needs grad_fn. {GRAD_FN_HELP}\n{WRAPPERS_HELP}")
  if not callable(grad_fn):
    raise ValueError(f"{owner}: grad_fn must be callable, got {grad_fn!r}.")
  if params is None:
    raise ValueError(
        f"{owner}.update needs params (the current parameters): "
        "tx.update(grads, state, params, grad_fn=grad_fn).")
  if _has_masked_node(params):
    raise ValueError(f"{owner}: {MASKED_HELP}")


def as_arrays(params: PyTree) -> PyTree:
  """Python and NumPy scalar leaves as JAX arrays; other leaves untouched.

  ``jax.grad`` accepts a Python float parameter, so users write them; the
  transforms' arithmetic needs a ``dtype`` on every leaf.
  """
  scalar = (int, float, complex, np.generic)
  return jax.tree.map(
      lambda x: jnp.asarray(x) if isinstance(x, scalar) else x, params)


def call_grad_fn(grad_fn: Callable[[PyTree], PyTree], tree: PyTree, *,
                 owner: str) -> PyTree:
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
          "optax.masked, optax.multi_transform) it cannot work; see the "
          "README, 'Composing with optax and Flax'.)")
    raise


def batch_mean(tree: PyTree, batch_axis_name: AxisName) -> PyTree:
  """Averages over the named mapped axis (pmap / shard_map), if any."""
  if batch_axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name=batch_axis_name)


def sam_gradient(grad_fn: Callable[[PyTree], PyTree], point: PyTree,
                 params: PyTree, batch_axis_name: AxisName, *,
                 owner: str) -> PyTree:
  """The gradient at the SAM point, averaged; zeros if it is not finite.

  A loss can be finite at ``params`` and not at ``params + eps``: the base
  optimizer then gets a zero gradient (as with X-SAM's normalisation), so
  no NaN reaches the parameters. ``optax.apply_if_finite`` cannot see this
  case: it checks the incoming gradient, which is finite.
  """
  grads = call_grad_fn(grad_fn, point, owner=owner)
  _tree.check_same_structure(params, grads, what="grad_fn")
  grads = batch_mean(grads, batch_axis_name)
  finite = jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
      or [jnp.array(True)]))
  return jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)),
                      grads)


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


def verify_incoming(updates: PyTree, params: PyTree,
                   grad_fn: Callable[[PyTree], PyTree],
                   batch_axis_name: AxisName, *, owner: str) -> None:
  """Raises if ``updates`` is not ``grad_fn(params)`` (costs one gradient).

  Eagerly the ``ValueError`` is raised here; in a traced step (``jax.jit``,
  ``lax.cond`` inside ``optax.MultiSteps``) it is raised on the host by a
  ``jax.debug.callback`` when the step runs, and arrives wrapped in JAX's
  runtime error. The tolerance is the square root of the incoming dtype's
  machine epsilon, relative to ``||grad_fn(params)||``: rounding passes,
  a clip or a weight decay does not.
  """
  expected = batch_mean(call_grad_fn(grad_fn, params, owner=owner),
                        batch_axis_name)
  _tree.check_same_structure(params, expected, what="grad_fn")
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return
  tolerance = float(np.sqrt(max(
      jnp.finfo(jnp.result_type(x)).eps if jnp.issubdtype(
          jnp.result_type(x), jnp.inexact) else 0.0 for x in leaves)))
  def leaf_difference(u, g):
    acc = jnp.result_type(jnp.float32, u, g)
    return jnp.asarray(u, acc) - jnp.asarray(g, acc)

  difference = jax.tree.map(leaf_difference, updates, expected)
  difference = jnp.sqrt(_tree.vdot(difference, difference))
  reference = jnp.sqrt(_tree.vdot(expected, expected))
  try:
    _raise_if_differ(owner, difference, reference, tolerance)
  except jax.errors.ConcretizationTypeError:
    jax.debug.callback(
        lambda d, r: _raise_if_differ(owner, d, r, tolerance),
        difference, reference)


def sam_ascent(
    rho: Union[float, jax.Array] = 0.05,
    *,
    adaptive: bool = False,
    batch_axis_name: AxisName = None,
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
  incoming gradient is ``grad_fn(params)`` and raises otherwise; it costs one
  more gradient (under ``jax.jit``, XLA can merge it with your own
  ``grad_fn(params)``), and also catches ``optax.MultiSteps`` around the
  ascent (accumulate with :func:`accumulated_grad_fn` instead).

  **A loss not finite at the SAM point** (finite at :math:`\theta`, not at
  :math:`\theta + \epsilon`) gives a zero gradient to the base optimizer,
  never NaN. ``optax.apply_if_finite`` cannot catch this case, since the
  incoming gradient is finite.

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

  Args:
    rho: radius of the neighbourhood (``>= 0``).
    adaptive: ASAM's scale-invariant neighbourhood.
    batch_axis_name: mapped axis over which to average ``grad_fn``'s output.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its ``update`` needs
    ``params`` and the keyword argument ``grad_fn``, and accepts
    ``check_incoming`` (a Python bool).

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021.
    Kwon et al., `ASAM <https://arxiv.org/abs/2102.11600>`_, 2021.
  """
  _validation.check_float("rho", rho, minimum=0.0)
  _validation.check_bool("adaptive", adaptive)
  _validation.check_axis_name("batch_axis_name", batch_axis_name)

  def init_fn(params):
    del params
    return SamAscentState()

  def update_fn(updates, state, params=None, *, grad_fn=None,
                check_incoming=False, **extra_args):
    del extra_args
    require_grad_fn(grad_fn, params, owner="sam_ascent")
    params = as_arrays(params)
    _validation.check_bool("check_incoming", check_incoming)
    if check_incoming:
      verify_incoming(updates, params, grad_fn, batch_axis_name,
                      owner="sam_ascent")
    if adaptive:
      scaled = jax.tree.map(lambda g, w: g * jnp.abs(w), updates, params)
      direction, _ = _tree.safe_normalize(scaled)
      direction = jax.tree.map(lambda d, w: d * jnp.abs(w), direction, params)
    else:
      direction, _ = _tree.safe_normalize(updates)
    perturbed = _tree.add_scaled(params, rho, direction)
    return sam_gradient(grad_fn, perturbed, params, batch_axis_name,
                        owner="sam_ascent"), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
