"""Per-group perturbations (m-sharpness): a ``grad_fn`` that knows its groups."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xsam_optax import _tree
from xsam_optax import _validation


def split_leading(batch: _tree.PyTree, pieces: int, *, name: str) -> _tree.PyTree:
  """Every leaf of ``batch`` reshaped to ``(pieces, size // pieces, ...)``.

  Raises a ``ValueError`` naming ``name`` when ``pieces`` does not divide
  the leading size, and naming ``batch`` when its leaves share no leading
  (example) axis.
  """
  _validation.check_int(name, pieces, minimum=1)
  sizes = sorted({jnp.shape(x)[0] if jnp.ndim(x) else -1
                  for x in jax.tree.leaves(batch)})
  if len(sizes) != 1 or sizes[0] < 0:
    raise ValueError(
        "batch must be a pytree of arrays sharing a leading (example) axis, "
        f"got leading sizes {sizes} (-1: a scalar leaf).")
  size = sizes[0]
  if size % pieces:
    raise ValueError(f"{name} must divide the batch size {size}, got {pieces}.")
  return jax.tree.map(
      lambda x: jnp.reshape(x, (pieces, size // pieces) + jnp.shape(x)[1:]),
      batch)


def scan_mean(grad: Callable[[Any, Any], _tree.PyTree], params: _tree.PyTree,
              pieces: _tree.PyTree) -> _tree.PyTree:
  """``mean_i grad(params, pieces[i])``, summed in a ``lax.scan``.

  Sums are kept in at least float32 and cast back to the parameters' dtypes.
  """
  count = jax.tree.leaves(pieces)[0].shape[0]

  def accumulate(total, piece):
    g = grad(params, piece)
    return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, g), None

  zeros = jax.tree.map(
      lambda p: jnp.zeros_like(p, dtype=jnp.result_type(jnp.float32, p)),
      params)
  total, _ = jax.lax.scan(accumulate, zeros, pieces)
  return jax.tree.map(lambda t, p: (t / count).astype(jnp.result_type(p)),
                      total, params)


def group_mean(stacked: _tree.PyTree, params: _tree.PyTree) -> _tree.PyTree:
  """The mean over the leading (group) axis, in at least float32, in ``params``' dtypes."""
  return jax.tree.map(
      lambda g, p: jnp.mean(g.astype(jnp.result_type(jnp.float32, g)), axis=0
                            ).astype(jnp.result_type(p)), stacked, params)


class GroupedGradFn:
  """A ``grad_fn`` over ``num_groups`` equal groups of one batch.

  Called on ``params`` it is the whole batch's gradient, the mean of the
  groups' gradients; the SAM ascents also read its per-group form
  (:meth:`per_group`, :meth:`at`) to perturb each group with its own
  gradient. Built by :func:`xsam_optax.grouped_grad_fn`.
  """

  def __init__(self, group_grad: Callable[[Any, Any], _tree.PyTree],
               groups: _tree.PyTree, num_groups: int):
    self._group_grad = group_grad
    self._groups = groups
    self.num_groups = num_groups

  def per_group(self, params: _tree.PyTree) -> _tree.PyTree:
    """Each group's gradient at ``params``, stacked on a leading axis of ``num_groups``."""
    return jax.vmap(self._group_grad, in_axes=(None, 0))(params, self._groups)

  def at(self, points: _tree.PyTree) -> _tree.PyTree:
    """Group ``i``'s gradient at ``points[i]`` (leading axis ``num_groups``), stacked."""
    return jax.vmap(self._group_grad)(points, self._groups)

  def __call__(self, params: _tree.PyTree) -> _tree.PyTree:
    """The whole batch's gradient: the mean of :meth:`per_group`.

    One group is the plain gradient on the whole batch (no ``vmap``), so
    ``num_groups=1`` computes exactly what ``jax.grad`` does.
    """
    if self.num_groups == 1:
      return self._group_grad(params, jax.tree.map(lambda x: x[0], self._groups))
    return group_mean(self.per_group(params), params)


def is_grouped(grad_fn: Any) -> bool:
  """Whether the ascents perturb per group: a ``GroupedGradFn`` of 2 groups or more.

  With one group the ascents run as with any ``grad_fn`` (along the incoming
  gradient), so ``num_groups=1`` is exactly the global transform.
  """
  return isinstance(grad_fn, GroupedGradFn) and grad_fn.num_groups > 1


def grouped_grad_fn(
    loss_fn: Callable[[_tree.PyTree, _tree.PyTree], jax.Array],
    batch: _tree.PyTree,
    num_groups: int,
    *,
    num_microbatches: int = 1,
) -> GroupedGradFn:
  r"""A ``grad_fn`` whose SAM points are per group: m-sharpness.

  Splits every leaf of ``batch`` along its leading axis into ``num_groups``
  equal, contiguous groups :math:`B_1, \dots, B_m` (group ``i`` holds
  examples ``i * n/m`` to ``(i + 1) * n/m - 1``). Called on ``params`` it
  returns the whole batch's gradient,

  .. math::
    \mathrm{grad\_fn}(\theta) = \frac{1}{m} \sum_{i=1}^m g_i, \qquad
    g_i = \nabla_\theta\, \mathrm{loss\_fn}(\theta, B_i),

  so the incoming gradient, the Hessian-vector products of the eigenvector
  refresh and the correction work on the whole batch, as with a plain
  ``grad_fn``. Passed as ``grad_fn=`` to :func:`sam_ascent`, :func:`sam`,
  :func:`xsam` or :func:`eigen_sam_ascent`, it also makes their ascent per
  group: each group is perturbed along its own gradient and

  .. math::
    g_{adv} = \frac{1}{m} \sum_{i=1}^m
    \nabla_\theta\, \mathrm{loss\_fn}(\theta + \epsilon_i, B_i), \qquad
    \epsilon_i = \rho\, g_i / \|g_i\|,

  which is SAM as pods run it when each device holds one group (the
  perturbation is not synchronised across devices). The ascents take the
  groups' directions from this function, not from the incoming gradient;
  with ``num_groups=1`` they run exactly as with a plain ``grad_fn``
  (perturbing along the incoming gradient).

  The groups are a ``jax.vmap`` (not a scan): they run side by side, so on a
  mesh whose data axis shards ``batch``'s leading axis each device computes
  its own groups' points with no collective before their gradients, and the
  one-device program is as large as the global one. The whole-batch
  gradient and the ascent's group gradients are the same computation, which
  XLA computes once in a jitted step. ``num_microbatches`` splits each group
  further and sums its gradient over those pieces in a ``lax.scan`` (as
  :func:`accumulated_grad_fn` does for the whole batch), for memory; the
  result is the same up to rounding. With batch statistics (BatchNorm) each
  group's loss uses its own group's statistics, as per-device BatchNorm does.

  Args:
    loss_fn: ``loss_fn(params, group) -> scalar``, the mean loss over a
      group of examples.
    batch: a pytree of arrays sharing a leading (example) axis whose size is
      a multiple of ``num_groups * num_microbatches``.
    num_groups: how many groups ``m`` (``>= 1``).
    num_microbatches: micro-batches per group, accumulated in a scan
      (``>= 1``).

  Returns:
    A callable ``grad_fn(params) -> grads`` (the whole batch's mean
    gradient) with the per-group form the ascents use.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(8, 1)
    >>> batch = (x, 2.0 * x[:, 0] ** 2)
    >>> loss_fn = lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2)
    >>> params = {"w": jnp.ones(1)}
    >>> grad_fn = xsam_optax.grouped_grad_fn(loss_fn, batch, 4)
    >>> full = jax.grad(loss_fn)(params, batch)
    >>> bool(jnp.allclose(grad_fn(params)["w"], full["w"]))
    True
    >>> tx = xsam_optax.sam(optax.sgd(0.1), rho=0.05)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grad_fn(params), state, params,
    ...                            grad_fn=grad_fn)

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (Section 4,
    m-sharpness).
  """
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be a callable (params, batch) -> scalar, "
                     f"got {type(loss_fn).__name__}.")
  _validation.check_int("num_groups", num_groups, minimum=1)
  _validation.check_int("num_microbatches", num_microbatches, minimum=1)
  groups = split_leading(batch, num_groups, name="num_groups")
  grad = jax.grad(loss_fn)
  if num_microbatches == 1:
    return GroupedGradFn(grad, groups, num_groups)
  group_size = jax.tree.leaves(groups)[0].shape[1]
  if group_size % num_microbatches:
    raise ValueError(
        f"num_microbatches must divide the group size {group_size} (the batch "
        f"size over num_groups={num_groups}), got {num_microbatches}.")
  groups = jax.tree.map(
      lambda x: jnp.reshape(x, (num_groups, num_microbatches, -1) + x.shape[2:]),
      groups)
  return GroupedGradFn(
      lambda params, group: scan_mean(grad, params, group), groups, num_groups)
