"""Gauss-Newton products: a positive semi-definite stand-in for the Hessian."""

from collections.abc import Callable
from typing import Any

import jax

from xsam_optax import _tree


def gauss_newton_fn(
    output_fn: Callable[[_tree.PyTree], Any],
    output_loss_fn: Callable[[Any], jax.Array],
) -> Callable[[_tree.PyTree, _tree.PyTree], _tree.PyTree]:
  r"""``(params, v) -> G v``, the Gauss-Newton matrix times ``v``.

  With :math:`z = f(\theta)` the model's outputs (``output_fn``) and
  :math:`\ell(z)` the loss as a function of them (``output_loss_fn``, a
  scalar), :math:`G = J^\top \nabla^2_z \ell\, J` where :math:`J` is the
  Jacobian of :math:`f`: the Hessian without the term that multiplies the
  model's second derivatives. One ``jvp`` of ``output_fn``, one of
  :math:`\nabla_z \ell` and one ``vjp``, about 2/3 of a Hessian-vector
  product's convolutions. :math:`G` is positive semi-definite when
  :math:`\ell` is convex in :math:`z` (cross-entropy, squared error), so its
  top eigenvalue is its largest in magnitude too.

  Pass the result as ``curvature_fn`` to the ``update`` of
  :func:`eigenvector_correction`, :func:`xsam` or :func:`eigen_sam_ascent`
  to refresh the eigenvector from :math:`G` instead of the Hessian.
  ``benchmarks/step_overhead.py`` reports its cost and how closely its top
  eigenvector follows the Hessian's.

  Args:
    output_fn: parameters -> the model's outputs on the current mini-batch
      (any pytree of arrays; with BatchNorm, the training-mode outputs, the
      statistics it computes discarded).
    output_loss_fn: outputs -> the scalar loss (labels closed over).

  Returns:
    A function ``(params, v) -> G v``; ``v`` and the result are pytrees like
    ``params``.

  Examples:
    For linear least squares the Gauss-Newton matrix is the Hessian:

    >>> import jax, jax.numpy as jnp
    >>> import xsam_optax
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> output_fn = lambda p: x @ p["w"]
    >>> output_loss_fn = lambda z: 0.5 * jnp.sum((z - 1.0) ** 2)
    >>> gn = xsam_optax.gauss_newton_fn(output_fn, output_loss_fn)
    >>> params, v = {"w": jnp.zeros(2)}, {"w": jnp.array([1.0, 0.0])}
    >>> gn(params, v)
    {'w': Array([10., 14.], dtype=float32)}
  """
  if not callable(output_fn):
    raise ValueError(f"output_fn must be callable, got {output_fn!r}.")
  if not callable(output_loss_fn):
    raise ValueError(
        f"output_loss_fn must be callable, got {output_loss_fn!r}.")

  def product(params: _tree.PyTree, v: _tree.PyTree) -> _tree.PyTree:
    outputs, jv = jax.jvp(output_fn, (params,), (v,))
    h_jv = jax.jvp(jax.grad(output_loss_fn), (outputs,), (jv,))[1]
    _, vjp = jax.vjp(output_fn, params)
    return vjp(h_jv)[0]

  return product
