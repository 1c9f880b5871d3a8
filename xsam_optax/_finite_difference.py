"""Finite-difference curvature products: one gradient per product."""

from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp

from xsam_optax import _tree
from xsam_optax import _validation

# Relative step in units of sqrt(eps): see finite_difference_fn. In float32
# h_rel = 3e-4 sqrt(eps) ~ 1.0e-7, below the step at which a ReLU unit of the
# benchmarks' networks changes sign along the top eigenvector.
STEP_SCALE = 3e-4
# A refresh whose product grows past this multiple of the last accepted one
# crossed a kink: see finite_difference_fn.
MAX_GROWTH = 2.0
# The attribute by which a product tells the refresh its acceptance bound.
GROWTH_ATTRIBUTE = "max_growth"


def finite_difference_step(params: _tree.PyTree, scale: float = STEP_SCALE) -> jax.Array:
  """``scale * sqrt(eps) * max(1, ||params||)``, ``eps`` of the coarsest float leaf dtype.

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
    max_growth: Optional[float] = MAX_GROWTH,
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

  **The step.** On a smooth loss the error is truncation (growing with
  :math:`h`) plus rounding (growing with :math:`\epsilon/h`). On networks with
  ReLU (and BatchNorm, which makes every unit depend on the whole batch) the
  gradient is only piecewise smooth: where a step of :math:`h` changes the
  sign of a pre-activation, the difference picks up the gradient's jump
  divided by :math:`h`, an error orders of magnitude larger than the product.
  How many units flip grows with :math:`h`, so the default step is as small
  as float32 rounding allows: a relative step :math:`h/\max(1,\|\theta\|)`
  of :math:`1.0\cdot 10^{-7}` in float32, which leaves products within a few
  percent of the exact ones where no unit flips (:math:`4.5\cdot 10^{-12}`
  in float64: relative rounding errors near :math:`10^{-4}` on a smooth
  loss; ``scale=0.01`` gives :math:`10^{-6}` there). At that step float32
  rounds :math:`\theta + h v` to its grid: a parameter of order one moves by
  about one unit in the last place, so the direction actually multiplied
  is :math:`v` plus a rounding error of comparable size, and the product is
  off by up to tens of percent where no eigenvalue dominates the Hessian;
  along a network's top eigenvector, which a refresh multiplies, the error
  stays small. In bfloat16 no step
  is both representable and below the kinks: keep exact products
  (:func:`hvp`) for half precision.

  **The guard.** A step that small still occasionally crosses a kink, and
  the product it returns is then far longer than the curvature allows. With
  ``max_growth`` set, the returned function carries it (as its attribute
  ``max_growth``) and the refreshes of :func:`eigenvector_correction`,
  :func:`xsam` and :func:`eigen_sam_ascent` reject a refresh whose last
  product is more than ``max_growth`` times as long as that of the last
  accepted refresh; they keep the previous eigenvector, as for a non-finite
  product. For a unit :math:`u` the product's length is
  :math:`\|Hu\| = \sqrt{\lambda^2 + r^2}` with the Rayleigh quotient
  :math:`\lambda` and residual :math:`r` that the state stores, so the guard
  needs no state of its own. A rejection marks the residual unknown and the
  next refresh is accepted whatever its length: a real rise of the curvature
  (the first refreshes from a random vector, sharpening) costs one refresh,
  never a lock-out. ``max_growth=None`` turns the guard off. A function
  wrapped around the product (a ``lambda``) drops the attribute and so the
  guard.

  ``benchmarks/fd_accuracy.py`` measures the products' error against the
  exact product over a range of steps, in float32 and bfloat16, and
  ``benchmarks/quality.py`` what the step and the guard do to eigenvector
  tracking.

  Pass the result as ``curvature_fn`` to the ``update`` of
  :func:`eigenvector_correction` or :func:`xsam`.

  Args:
    grad_fn: parameters -> gradient of the training loss on the mini-batch.
    grads: ``grad_fn(params)`` if already computed (saves a gradient).
    scale: the step in units of :math:`\sqrt{\epsilon}\max(1, \|\theta\|)`
      (``> 0``).
    max_growth: the refreshes reject a product longer than this multiple of
      the last accepted one (``> 1``), or ``None`` for no guard.

  Returns:
    A function ``(params, v) -> product``, pytrees like ``params``, with the
    attribute ``max_growth``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import xsam_optax
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> params = {"w": jnp.array([0.01, -0.01])}
    >>> fd = xsam_optax.finite_difference_fn(jax.grad(loss))
    >>> hv = fd(params, {"w": jnp.array([0.0, 1.0])})
    >>> [round(float(x), 1) for x in hv["w"]]
    [0.0, 3.0]
    >>> fd.max_growth
    2.0
  """
  if not callable(grad_fn):
    raise ValueError(f"grad_fn must be callable, got {grad_fn!r}.")
  _validation.check_float("scale", scale, minimum=0.0)
  if isinstance(scale, (int, float)) and scale <= 0:
    raise ValueError(f"scale must be > 0, got {scale}.")
  check_max_growth(max_growth)

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

  setattr(product, GROWTH_ATTRIBUTE, max_growth)
  return product


def check_max_growth(max_growth) -> None:
  """``None`` or a plain number ``> 1``: what a product may carry as its guard."""
  if max_growth is None:
    return
  if (isinstance(max_growth, bool) or not isinstance(max_growth, (int, float))
      or not max_growth > 1 or max_growth == float("inf")):
    raise ValueError(
        f"max_growth must be None or a finite number > 1, got {max_growth!r}.")
