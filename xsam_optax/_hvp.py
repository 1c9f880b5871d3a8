"""Hessian-vector products from a gradient function."""

from collections.abc import Callable

import jax

from xsam_optax import _tree


def hvp(grad_fn: Callable[[_tree.PyTree], _tree.PyTree], params: _tree.PyTree,
        v: _tree.PyTree) -> _tree.PyTree:
  r"""Hessian-vector product :math:`H(\theta) v`, forward-over-reverse.

  Computes the directional derivative of ``grad_fn`` at ``params`` along
  ``v`` with :func:`jax.jvp`: a few gradients' worth of work, and the Hessian
  is never formed. ``v`` must have the structure, shapes and dtypes of
  ``params``; the result has them too.

  Args:
    grad_fn: maps parameters to the gradient of the loss (same pytree).
    params: the point at which the Hessian is taken.
    v: the direction, a pytree like ``params``.

  Returns:
    :math:`H v`, a pytree like ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import xsam_optax
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> xsam_optax.hvp(jax.grad(loss), {"w": jnp.ones(2)}, {"w": jnp.ones(2)})
    {'w': Array([1., 3.], dtype=float32)}
  """
  return jax.jvp(grad_fn, (params,), (v,))[1]


def hessian_fn(
    grad_fn: Callable[[_tree.PyTree], _tree.PyTree],
) -> Callable[[_tree.PyTree, _tree.PyTree], _tree.PyTree]:
  r"""``(params, v) -> H v`` for the loss whose gradient is ``grad_fn``.

  A ``curvature_fn`` for the ``update`` of :func:`eigenvector_correction`,
  :func:`xsam` and :func:`eigen_sam_ascent`: refreshes then estimate the top
  eigenvector of this loss's Hessian instead of the Hessian of the ``grad_fn``
  that ``update`` gets. The common case is the gradient on a sub-batch, which
  makes each product cheaper but tracks the sub-batch's eigenvector; the SAM
  ascent and the correction still use the full ``grad_fn``. Without a
  ``curvature_fn``, refreshes use ``hessian_fn(grad_fn)`` of ``update``'s own
  ``grad_fn``.

  Args:
    grad_fn: maps parameters to the gradient of the loss whose Hessian the
      refreshes should use.

  Returns:
    A function ``(params, v) -> hvp(grad_fn, params, v)``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> x, y = jnp.linspace(-1.0, 1.0, 8), jnp.linspace(0.0, 1.0, 8)
    >>> loss = lambda p, n: jnp.mean((p["w"] * x[:n] - y[:n]) ** 2)
    >>> params = {"w": jnp.array(0.5)}
    >>> grad_fn = jax.grad(lambda p: loss(p, 8))
    >>> sub_batch = xsam_optax.hessian_fn(jax.grad(lambda p: loss(p, 2)))
    >>> tx = xsam_optax.xsam(optax.sgd(0.1))
    >>> updates, state = tx.update(grad_fn(params), tx.init(params), params,
    ...                            grad_fn=grad_fn, curvature_fn=sub_batch)
    >>> # The sub-batch's Hessian, 2 * mean(x[:2] ** 2), not the batch's.
    >>> round(float(optax.tree.get(state, "eigenvalue")), 4)
    1.5102
  """
  return lambda params, v: hvp(grad_fn, params, v)
