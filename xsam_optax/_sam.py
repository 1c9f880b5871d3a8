"""The SAM ascent step as an optax transform."""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
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


class SamAscentState(NamedTuple):
  """``sam_ascent`` keeps no state."""


def require_grad_fn(grad_fn: Optional[Callable[[PyTree], PyTree]],
                    params: Optional[PyTree], *, owner: str) -> None:
  """Clear errors for the two arguments every X-SAM transform needs."""
  if grad_fn is None:
    raise ValueError(f"{owner}.update needs grad_fn. {GRAD_FN_HELP}")
  if not callable(grad_fn):
    raise ValueError(f"{owner}: grad_fn must be callable, got {grad_fn!r}.")
  if params is None:
    raise ValueError(
        f"{owner}.update needs params (the current parameters): "
        "tx.update(grads, state, params, grad_fn=grad_fn).")


def batch_mean(tree: PyTree, batch_axis_name: AxisName) -> PyTree:
  """Averages over the named mapped axis (pmap / shard_map), if any."""
  if batch_axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name=batch_axis_name)


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
    ``params`` and the keyword argument ``grad_fn``.

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

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    require_grad_fn(grad_fn, params, owner="sam_ascent")
    if adaptive:
      scaled = jax.tree.map(lambda g, w: g * jnp.abs(w), updates, params)
      direction, _ = _tree.safe_normalize(scaled)
      direction = jax.tree.map(lambda d, w: d * jnp.abs(w), direction, params)
    else:
      direction, _ = _tree.safe_normalize(updates)
    perturbed = _tree.add_scaled(params, rho, direction)
    adv_grads = grad_fn(perturbed)
    _tree.check_same_structure(params, adv_grads, what="grad_fn")
    return batch_mean(adv_grads, batch_axis_name), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
