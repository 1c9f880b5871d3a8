"""Finite-difference curvature products: one gradient per product."""

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from xsam_optax import _tree
from xsam_optax import _validation

# Relative step in units of sqrt(eps): see finite_difference_fn.
STEP_SCALE = 0.01


def finite_difference_step(params: _tree.PyTree, scale: float = STEP_SCALE) -> jax.Array:
  """``scale * sqrt(eps) * max(1, ||params||)``, ``eps`` of the widest leaf dtype.

  Over the float leaves only: integer leaves (a step counter) are no
  direction of the loss.
  """
  floats = [x for x in jax.tree.leaves(params) if _tree.is_float(x)]
  eps = max([float(jnp.finfo(jnp.result_type(x)).eps) for x in floats],
            default=float(jnp.finfo(jnp.float32).eps))
  norm = _tree.global_norm(floats)
  return scale * eps ** 0.5 * jnp.maximum(1.0, norm.astype(jnp.float32))


def finite_difference_fn(
    grad_fn: Callable[[_tree.PyTree], _tree.PyTree],
    grads: Optional[_tree.PyTree] = None,
    *,
    scale: float = STEP_SCALE,
) -> Callable[[_tree.PyTree, _tree.PyTree], _tree.PyTree]:
  r"""``(params, v) -> (grad_fn(params + h v) - g) / h``, a one-gradient :math:`Hv`.

  A one-sided difference of the gradient along ``v``:

  .. math::
    H v \approx \frac{\nabla L(\theta + h v) - \nabla L(\theta)}{h},
    \qquad h = s \sqrt{\epsilon}\,\max(1, \|\theta\|)

  for a unit ``v`` (the estimators only multiply unit vectors), with
  :math:`\epsilon` the machine epsilon of the parameters' dtype and
  :math:`s` = ``scale``. With ``grads`` (the gradient at ``params`` that the
  training step has already computed) each product costs one gradient,
  against about two to three for :func:`hvp`'s forward-over-reverse product.
  Without ``grads`` the product recomputes ``grad_fn(params)``; inside one
  jitted step XLA may merge that with the step's own gradient of the same
  function, but only the explicit ``grads`` guarantees it.

  Accuracy: truncation error grows with :math:`h` and rounding error with
  :math:`\epsilon/h`; with ReLU networks the gradient also jumps where a
  unit changes sign, and a larger :math:`h` crosses more of those kinks,
  which is why the default ``scale`` is well below 1. In bfloat16 the
  products are rough; ``benchmarks/fd_accuracy.py`` measures the error
  against the exact product in float32 and bfloat16, and
  ``benchmarks/quality.py`` what it does to eigenvector tracking.

  Pass the result as ``curvature_fn`` to the ``update`` of
  :func:`eigenvector_correction` or :func:`xsam`.

  Args:
    grad_fn: parameters -> gradient of the training loss on the mini-batch.
    grads: ``grad_fn(params)`` if already computed (saves a gradient).
    scale: the step in units of :math:`\sqrt{\epsilon}\max(1, \|\theta\|)`
      (``> 0``).

  Returns:
    A function ``(params, v) -> product``, pytrees like ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import xsam_optax
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> params = {"w": jnp.array([1.0, -1.0])}
    >>> fd = xsam_optax.finite_difference_fn(jax.grad(loss))
    >>> hv = fd(params, {"w": jnp.array([0.0, 1.0])})
    >>> [round(float(x), 1) for x in hv["w"]]
    [0.0, 3.0]
  """
  if not callable(grad_fn):
    raise ValueError(f"grad_fn must be callable, got {grad_fn!r}.")
  _validation.check_float("scale", scale, minimum=0.0)
  if isinstance(scale, (int, float)) and scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}.")

  def product(params: _tree.PyTree, v: _tree.PyTree) -> _tree.PyTree:
    h = finite_difference_step(params, scale)
    base = grad_fn(params) if grads is None else grads
    # Integer leaves stay where they are, and their (float0) gradients
    # pass through: they have no curvature to difference.
    shifted = jax.tree.map(
        lambda p, u: (p + h * u).astype(p.dtype) if _tree.is_float(p) else p,
        params, v)
    wide = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return jax.tree.map(
        lambda a, b: ((wide(a) - wide(b)) / h).astype(a.dtype)
        if _tree.is_float(a) else a, grad_fn(shifted), base)

  return product
