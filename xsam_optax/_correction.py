"""X-SAM's correction: remove part of the gradient along the top eigenvector."""

from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from xsam_optax import _tracking
from xsam_optax import _tree
from xsam_optax import _validation

PyTree = Any


class EigenvectorCorrectionState(NamedTuple):
  """State of :func:`eigenvector_correction`.

  Attributes:
    count: int32, number of ``update`` calls so far.
    eigenvector: unit-norm estimate of the Hessian's top eigenvector, a pytree
      like the parameters (same dtypes).
    eigenvalue: the top-eigenvalue estimate of the last refresh (0 before the
      first). With ``method="lanczos"`` it is the Ritz value of
      ``eigenvector`` itself. With ``method="power"`` it is the Rayleigh
      quotient :math:`u^\\top H u` of the last iterate :math:`u` that was
      multiplied, i.e. of the vector one power step *before* ``eigenvector``
      (which is :math:`Hu / \\|Hu\\|`): the two belong to the same vector
      only once the iteration has converged. With a callable ``method``, the
      ``eigenvalue`` of its :class:`EigenResult`.
    residual: :math:`\\|Hu - \\lambda u\\|` for that same vector (the Ritz
      residual for Lanczos) at the last refresh (``inf`` before the first or
      when unknown).
    cos_angle: cosine between the incoming gradient and ``eigenvector`` at
      the last step.
  """

  count: jax.Array
  eigenvector: PyTree
  eigenvalue: jax.Array
  residual: jax.Array
  cos_angle: jax.Array


def correct(updates: PyTree, eigenvector: PyTree, alpha, *,
            sign_invariant: bool, normalize: bool) -> tuple[PyTree, jax.Array]:
  r"""Applies X-SAM's rule to ``updates``; returns it and :math:`\cos(g, v)`.

  Reference rule: :math:`\hat g - \alpha\,\mathrm{sign}(\langle g, v\rangle)
  \langle \hat g, v\rangle v`; sign-invariant rule: :math:`\hat g - \alpha
  \langle \hat g, v\rangle v`. ``normalize=False`` multiplies back by
  :math:`\|g\|`.
  """
  unit, norm = _tree.safe_normalize(updates)
  # At least float32, as the state stores it: the norm of bf16 updates is bf16.
  cos = _tree.vdot(unit, eigenvector)
  coefficient = alpha * (cos if sign_invariant else jnp.abs(cos))
  corrected = _tree.add_scaled(unit, -coefficient, eigenvector)
  if not normalize:
    corrected = jax.tree.map(
        lambda c: (c * jnp.where(_tree.is_usable(norm), norm, 0.0)
                   ).astype(c.dtype), corrected)
  return corrected, cos


def corrected_and_state(updates: PyTree, state: EigenvectorCorrectionState,
                        estimate: tuple, alpha, *, sign_invariant: bool,
                        normalize: bool):
  """``updates`` corrected along this step's eigenvector, and the next state.

  ``estimate``: the ``(eigenvector, eigenvalue, residual)`` to use at this
  step (refreshed or kept).
  """
  eigenvector, eigenvalue, residual = estimate
  corrected, cos = correct(updates, eigenvector, alpha,
                           sign_invariant=sign_invariant, normalize=normalize)
  return corrected, EigenvectorCorrectionState(
      count=optax.safe_increment(state.count),
      eigenvector=eigenvector,
      eigenvalue=eigenvalue,
      residual=residual,
      cos_angle=cos.astype(state.cos_angle.dtype),
  )


def eigenvector_correction(
    alpha: Union[float, jax.Array] = 0.2,
    *,
    update_every: int = 1,
    num_iters: int = 1,
    method: _tracking.Method = "power",
    sign_invariant: bool = False,
    normalize: bool = True,
    seed: int = 0,
    batch_axis_name: _tree.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Removes part of the gradient's component along the top Hessian eigenvector.

  Every ``update_every`` steps, starting at step 0, the stored eigenvector
  :math:`v` is refreshed by ``method`` on Hessian-vector products of
  ``grad_fn`` at ``params`` (the unperturbed parameters), warm-started from
  the stored vector (a random unit vector drawn from ``seed`` before the first
  refresh). Then, with :math:`\hat g = g/\|g\|` and
  :math:`c = \langle \hat g, v\rangle`:

  .. math::
    g_{new} = \hat g - \alpha\,\mathrm{sign}(\langle g, v\rangle)\, c\, v
            = \hat g - \alpha |c| v \quad \text{(reference rule)}

  **Sign dependence of the reference rule.** :math:`v` is defined only up to
  sign, and the rule is not invariant under :math:`v \to -v`: with
  :math:`c > 0` the component along :math:`v` is damped to
  :math:`(1-\alpha)c`, with :math:`c < 0` it is amplified to
  :math:`(1+\alpha)c`, so the correction drifts along whichever sign the
  estimator happened to return. ``sign_invariant=True`` applies
  :math:`\hat g - \alpha c v`, which damps the component by :math:`1-\alpha`
  for either sign and gives the same update for :math:`v` and :math:`-v`.
  The reference rule stays the default for fidelity with the paper's code.

  **Step 0.** The reference code first refreshes at step ``update_every`` and
  leaves earlier steps uncorrected; here the first refresh is at step 0, so
  no step is ever corrected along an unestimated random vector.

  **Defaults: one power step on every step.** The correction at every step
  uses the stored :math:`v`, so what matters is how well that vector follows
  the loss's sharp direction at every step, not how well one refresh fits
  its own batch. A single warm-started power step on each step's batch
  averages over batches and tracked the top eigenvector of both the step's
  batch Hessian and a large-batch Hessian better than the reference's 5
  power steps every 5 steps, for the same number of products
  (``benchmarks/quality.py``); converging harder on one batch did not help.
  Refreshing on every step also means ``update`` needs no ``lax.cond``,
  whether or not the host passes ``refresh``.

  **Estimators.** ``method="lanczos"`` (``num_iters`` products) converges to
  the algebraically largest eigenvalue and keeps its ``num_iters``-vector
  basis during a refresh; ``method="power"`` to the one of largest
  *magnitude* (possibly negative early in training), holding one vector.
  ``method="power", num_iters=5`` is the reference's schedule. Any callable
  ``(matvec, v0) -> EigenResult`` works as ``method`` too, e.g.
  ``functools.partial(xsam_optax.power_iteration, num_iters=3, tol=1e-3)``
  or one of your own: it gets the (batch-averaged) curvature product and the
  stored eigenvector, and must return one eigenpair with a finite residual
  (a non-finite eigenvalue or residual keeps the previous eigenvector). The
  README's Performance section compares the estimators' cost and quality.

  **Periodic refreshes: choose them on the host.** With ``update_every > 1``
  and without ``refresh``, ``update`` refreshes under ``lax.cond`` on the
  step count, which on XLA:CPU runs the
  Hessian-vector products' convolutions in a slow layout. Pass
  ``refresh=xsam_optax.refresh_due(step, update_every)`` (a Python bool) from
  the training loop to a step jitted with ``static_argnames="refresh"``: the
  two kinds of step compile separately and neither has a ``cond``.

  **What a refresh multiplies by.** ``update`` accepts an optional
  ``curvature_fn(params, v) -> product`` used instead of the Hessian of
  ``grad_fn``: :func:`hessian_fn` of another gradient (e.g. on a sub-batch,
  cheaper per product, tracking that sub-batch's eigenvector) or
  :func:`gauss_newton_fn` (positive semi-definite, cheaper per product) or
  :func:`finite_difference_fn` (one gradient per product, but inaccurate on
  networks with ReLU and BatchNorm, see ``benchmarks/quality.py``). The
  SAM ascent and the correction still use ``grad_fn`` and the incoming
  gradient.

  Args:
    alpha: correction strength in ``[0, 2]``; 0 only normalises.
    update_every: refresh period in steps (``>= 1``; default every step).
    num_iters: products per refresh of a named ``method`` (``>= 1``; ``>= 2``
      for Lanczos); leave it at its default with a callable ``method``.
    method: ``"power"``, ``"lanczos"`` or a callable ``(matvec, v0) ->
      EigenResult`` (with :func:`optax.inject_hyperparams`, name a callable
      ``method`` in ``static_args``).
    sign_invariant: use the sign-invariant rule instead of the reference one.
    normalize: drop the gradient's magnitude, as the reference does.
    seed: seed of the initial random eigenvector.
    batch_axis_name: mapped axis over which to average the curvature
      products (pmap / shard_map).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
    ``params`` and the keyword argument ``grad_fn``, and accepts optional
    ``refresh`` and ``curvature_fn``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> loss = lambda p: jnp.sum(jnp.array([10.0, 1.0]) * p["w"] ** 2)
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> tx = xsam_optax.eigenvector_correction(0.2, num_iters=20)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(loss)
    >>> updates, state = tx.update(grad_fn(params), state, params,
    ...                            grad_fn=grad_fn)
    >>> round(float(optax.tree.get(state, "eigenvalue")), 3)
    20.0

  References:
    Duan, Chen and Guan, `X-SAM: Boosting Sharpness-Aware Minimization with
    Dominant-Eigenvector Gradient Correction
    <https://arxiv.org/abs/2601.10251>`_, 2026.
  """
  _validation.check_float("alpha", alpha, minimum=0.0, maximum=2.0)
  _validation.check_bool("sign_invariant", sign_invariant)
  _validation.check_bool("normalize", normalize)
  settings = _tracking.refresh_settings(
      update_every, num_iters, method, batch_axis_name, owner=eigenvector_correction)
  _validation.check_int("seed", seed, minimum=0)

  def init_fn(params):
    return EigenvectorCorrectionState(**_tracking.initial_fields(params, seed))

  def update_fn(updates, state, params=None, *, grad_fn=None, refresh=None,
                curvature_fn=None, **extra_args):
    _tracking.reject_removed_extras(extra_args,
                                    owner="eigenvector_correction")
    del extra_args
    estimate = _tracking.track(
        state, params, grad_fn, settings, refresh,
        owner="eigenvector_correction", curvature_fn=curvature_fn)
    return corrected_and_state(updates, state, estimate, alpha,
                               sign_invariant=sign_invariant,
                               normalize=normalize)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
