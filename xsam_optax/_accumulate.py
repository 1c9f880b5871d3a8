"""Large batches: a ``grad_fn`` that accumulates over micro-batches."""

from collections.abc import Callable

import jax

from xsam_optax import _groups
from xsam_optax import _tree


def accumulated_grad_fn(
    loss_fn: Callable[[_tree.PyTree, _tree.PyTree], jax.Array],
    batch: _tree.PyTree,
    num_microbatches: int,
) -> Callable[[_tree.PyTree], _tree.PyTree]:
  r"""A ``grad_fn`` for a large batch, evaluated one micro-batch at a time.

  Splits every leaf of ``batch`` along its leading axis into
  ``num_microbatches`` equal micro-batches :math:`B_1, \dots, B_m` and returns

  .. math::
    \mathrm{grad\_fn}(\theta) = \frac{1}{m} \sum_{i=1}^m
    \nabla_\theta\, \mathrm{loss\_fn}(\theta, B_i),

  summed in a ``lax.scan``, so only one micro-batch's activations are alive
  at a time. When ``loss_fn`` is a mean over the examples of its batch (and
  uses no batch statistics, e.g. BatchNorm), this is the full-batch gradient,
  up to rounding. Every X-SAM transform only ever evaluates ``grad_fn``: the
  gradient at the SAM point, and each Hessian-vector product (a ``jax.jvp``
  through the scan), so all of them are accumulated the same way and the
  update equals the full-batch one. Sums are kept in at least float32 and
  cast back to the parameters' dtypes.

  This, not ``optax.MultiSteps(xsam(...))``, is gradient accumulation for
  X-SAM: ``MultiSteps`` runs a whole X-SAM update per micro-batch with that
  micro-batch's ``grad_fn`` (its running mean only sets the perturbation
  direction) and drops refreshes made on micro-steps whose update it does not
  emit. ``update(..., check_incoming=True)`` reports it.

  Args:
    loss_fn: ``loss_fn(params, microbatch) -> scalar``, the mean loss over
      the micro-batch.
    batch: a pytree of arrays sharing a leading (example) axis whose size is
      a multiple of ``num_microbatches``.
    num_microbatches: how many equal pieces to split ``batch`` into
      (``>= 1``).

  Returns:
    ``grad_fn(params) -> grads``, to pass as ``grad_fn=`` to ``update`` and to
    call for the incoming gradient.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(8, 1)
    >>> batch = (x, 2.0 * x[:, 0])
    >>> loss_fn = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
    >>> params = {"w": jnp.zeros(1)}
    >>> grad_fn = xsam_optax.accumulated_grad_fn(loss_fn, batch, 4)
    >>> full = jax.grad(loss_fn)(params, batch)
    >>> bool(jnp.allclose(grad_fn(params)["w"], full["w"]))
    True
    >>> tx = xsam_optax.xsam(optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grad_fn(params), state, params,
    ...                            grad_fn=grad_fn)
  """
  micro = _groups.split_leading(batch, num_microbatches,
                                name="num_microbatches")
  grad = jax.grad(loss_fn)
  return lambda params: _groups.scan_mean(grad, params, micro)
