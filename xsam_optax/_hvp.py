"""Hessian-vector products from a gradient function."""

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


def hvp(grad_fn: Callable[[PyTree], PyTree], params: PyTree, v: PyTree) -> PyTree:
  r"""Hessian-vector product :math:`H(\theta) v`, forward-over-reverse.

  Computes the directional derivative of ``grad_fn`` at ``params`` along
  ``v`` with :func:`jax.jvp`, which costs about two to three gradients and
  never forms the Hessian. ``v`` must have the structure, shapes and dtypes of
  ``params``; the result has them too.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import xsam_optax
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> xsam_optax.hvp(jax.grad(loss), {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    {'w': Array([1., 3.], dtype=float32)}

  Args:
    grad_fn: maps parameters to the gradient of the loss (same pytree).
    params: the point at which the Hessian is taken.
    v: the direction, a pytree like ``params``.

  Returns:
    :math:`H v`, a pytree like ``params``.
  """
  return jax.jvp(grad_fn, (params,), (v,))[1]


def hvp_fn(
    grad_fn: Callable[[PyTree], PyTree], params: PyTree
) -> Callable[[PyTree], PyTree]:
  """``v -> hvp(grad_fn, params, v)``: the Hessian at ``params`` as a matvec."""
  return lambda v: hvp(grad_fn, params, v)
