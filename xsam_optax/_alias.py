"""Whole optimizers built only by chaining the composable pieces."""

from collections.abc import Callable
from typing import Union

import jax
import optax

from xsam_optax import _correction
from xsam_optax import _float_leaves
from xsam_optax import _sam
from xsam_optax import _tracking
from xsam_optax import _tree
from xsam_optax import _validation



def sam(
    optimizer: optax.GradientTransformation,
    *,
    rho: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.05,
    adaptive: bool = False,
    batch_axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """SAM: ``optax.chain(sam_ascent(rho, ...), optimizer)``.

  Integer leaves of the parameters (a step counter) are left alone, as in
  :func:`xsam`: their update is a zero of their dtype, whatever their
  gradient (``float0`` from ``jax.grad(..., allow_int=True)`` included).

  The ascent replaces the gradient by one computed with ``grad_fn``: clip or
  decay inside ``optimizer`` (``sam(optax.chain(optax.clip_by_global_norm(1.0),
  optax.sgd(0.1)))``), never in a chain before ``sam(...)``, where it would
  only tilt the perturbation; see :func:`sam_ascent`.

  Args:
    optimizer: the base optimizer that receives the SAM gradient.
    rho: neighbourhood radius, or a schedule of the step count.
    adaptive: ASAM's scale-invariant neighbourhood.
    batch_axis_name: mapped axis over which ``grad_fn`` is averaged.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` needing ``grad_fn``.

  Examples:
    >>> import optax, xsam_optax
    >>> tx = xsam_optax.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
  """
  _validation.check_transformation("optimizer", optimizer)
  return optax.chain(
      _sam.sam_ascent(rho, adaptive=adaptive, batch_axis_name=batch_axis_name),
      _float_leaves.zero_integer_updates(optimizer),
  )


def xsam(
    optimizer: optax.GradientTransformation,
    *,
    rho: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.05,
    alpha: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.2,
    update_every: int = 2,
    num_iters: int = 1,
    method: _tracking.Method = "power",
    rule: Union[str, _correction.Rule] = "reference",
    normalize: bool = True,
    adaptive: bool = False,
    seed: int = 0,
    batch_axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """X-SAM: SAM ascent, eigenvector correction, then ``optimizer``.

  Exactly ``optax.chain(sam_ascent(rho, ...), eigenvector_correction(alpha,
  ...), optimizer)`` when every parameter leaf is a float (integer leaves:
  see *Composing*); see those two for the maths and the options.
  Diagnostics are read from the state by name:
  ``optax.tree.get(state, "eigenvalue")``, ``"cos_angle"``, ``"eigenvector"``.
  The defaults take one power step every 2 steps (the reference's schedule
  is ``method="power", num_iters=5, update_every=5``; one product on every
  step is ``update_every=1``). To pay for the products only on refresh
  steps, let the training loop choose them:
  ``tx.update(..., refresh=schedule(step))`` with ``schedule =
  xsam_optax.refresh_schedule(tx)`` (the period read from ``tx``), inside a
  step jitted with ``static_argnames="refresh"``; without
  ``refresh`` the transform follows the same schedule by itself (see
  :func:`eigenvector_correction`).

  **Composing.** The SAM ascent replaces the gradient by one computed with
  ``grad_fn``, so clipping and weight decay go inside ``optimizer``
  (``xsam(optax.chain(optax.clip_by_global_norm(1.0),
  optax.add_decayed_weights(5e-4), optax.sgd(0.1)))``), not in a chain
  before ``xsam(...)``; ``update(..., check_incoming=True)`` raises if
  something changed the gradient before the ascent. Accumulate micro-batches
  with :func:`accumulated_grad_fn` as ``grad_fn``, not with
  ``optax.MultiSteps``; perturb each group of the batch (each device) along
  its own gradient with :func:`grouped_grad_fn` as ``grad_fn``. With Flax Linen use
  :class:`xsam_optax.flax_utils.TrainState`, whose ``apply_gradients``
  forwards ``grad_fn``. Integer and boolean leaves of the parameters (a step
  counter) are left alone: the perturbation, the eigenvector, the norms and
  the correction use the float leaves only, ``optimizer`` gets a zero of the
  leaf's dtype for its gradient (``float0`` from ``jax.grad(...,
  allow_int=True)`` included), and the leaf's update is a zero of its dtype,
  so ``optax.apply_updates`` leaves it as it was. Complex leaves are refused with a ``ValueError`` that
  names the leaf: keep their real and imaginary parts as two real leaves.

  Args:
    optimizer: the base optimizer (the paper: SGD with momentum 0.9).
    rho: SAM radius, or a schedule of the step count (see
      :func:`sam_ascent`).
    alpha: correction strength in ``[0, 2]``, or a schedule of the step
      count.
    update_every: eigenvector refresh period in steps (default 2).
    num_iters: products per refresh of a named ``method``; leave it at its
      default with a callable ``method``.
    method: ``"power"`` (default; the reference's, which uses
      ``num_iters=5, update_every=5``), ``"lanczos"`` or a callable
      ``(matvec, v0) -> EigenResult``.
    rule: the correction rule: ``"reference"`` (the paper's),
      ``"sign_invariant"`` or a callable ``(cos, alpha) -> coefficient``
      (see :func:`eigenvector_correction`). With
      :func:`optax.inject_hyperparams`, name a callable ``method`` or
      ``rule`` in ``static_args``: it calls every other callable argument
      with the step count, as a schedule.
    normalize: drop the gradient magnitude before the base optimizer: it
      then receives a unit-length direction, so its learning rate is a step
      length, not a multiple of the gradient, and rates tuned for SGD or SAM
      do not carry over (tune the rate, or set ``normalize=False``).
    adaptive: ASAM neighbourhood.
    seed: seed of the initial eigenvector.
    batch_axis_name: mapped axis over which gradients and Hessian-vector
      products from ``grad_fn`` are averaged.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` needing ``grad_fn``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> loss = lambda p: jnp.sum(jnp.array([10.0, 1.0]) * p["w"] ** 2)
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> tx = xsam_optax.xsam(optax.sgd(0.01), rho=0.05, alpha=0.2)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(loss)
    >>> updates, state = tx.update(grad_fn(params), state, params,
    ...                            grad_fn=grad_fn)
    >>> params = optax.apply_updates(params, updates)
  """
  _validation.check_transformation("optimizer", optimizer)
  correction = _correction.eigenvector_correction(
      alpha,
      update_every=update_every,
      num_iters=num_iters,
      method=method,
      rule=rule,
      normalize=normalize,
      seed=seed,
      batch_axis_name=batch_axis_name,
  )
  return _tracking.with_schedule(optax.chain(
      _sam.sam_ascent(rho, adaptive=adaptive, batch_axis_name=batch_axis_name),
      correction,
      _float_leaves.zero_integer_updates(optimizer),
  ), _tracking.refresh_schedule(correction).update_every)
