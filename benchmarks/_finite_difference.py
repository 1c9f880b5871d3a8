"""Finite-difference curvature products: one gradient each.

.. math::
  H v \\approx \\frac{\\nabla L(\\theta + h v) - g}{h}, \\quad g = \\nabla L(\\theta)

``g`` is the gradient the training step has already computed, so each
product costs one gradient (a forward-over-reverse product costs about two
to three). The step is ``h = SCALE * sqrt(eps) * max(1, ||theta||)`` for a
unit ``v`` (``eps`` of the parameters' dtype): a relative perturbation of the
parameters proportional to ``sqrt(eps)``, which balances truncation
(``O(h)``) against rounding (``O(eps / h)``) for a smooth loss. With ReLU
networks the gradient also jumps where a unit changes sign, and a larger
``h`` crosses more of those kinks: ``benchmarks/fd_accuracy.py`` found the
error against the exact product smallest around ``SCALE = 0.01`` in float32
and poor at every scale in bfloat16.

Plugs into the library through ``update``'s ``curvature_fn`` extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any
SCALE = 0.01


def step_size(params: PyTree, scale: float = SCALE) -> jax.Array:
  """``scale * sqrt(eps) * max(1, ||params||)``, ``eps`` of the widest leaf dtype."""
  eps = max(float(jnp.finfo(jnp.result_type(x)).eps)
            for x in jax.tree.leaves(params))
  norm = optax.tree.norm(params).astype(jnp.float32)
  return scale * eps ** 0.5 * jnp.maximum(1.0, norm)


def curvature_fn(grad_fn: Callable[[PyTree], PyTree], grads: PyTree, *,
                 scale: float = SCALE) -> Callable[[PyTree, PyTree], PyTree]:
  """``(params, v) -> (grad_fn(params + h v) - grads) / h`` (``grads`` at params)."""

  def product(params, v):
    h = step_size(params, scale)
    shifted = jax.tree.map(lambda p, u: (p + h * u).astype(p.dtype), params, v)
    return jax.tree.map(
        lambda a, b: ((a.astype(jnp.float32) - b.astype(jnp.float32)) / h
                      ).astype(a.dtype),
        grad_fn(shifted), grads)

  return product
