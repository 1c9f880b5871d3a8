"""X-SAM's correction: remove part of the gradient along the top eigenvector."""

from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp
import optax

from xsam_optax import _float_leaves
from xsam_optax import _tracking
from xsam_optax import _tree
from xsam_optax import _validation


# A correction rule maps (cos, alpha) to the coefficient of v to remove:
# g_new = g_hat - rule(cos, alpha) * v, with cos = <g_hat, v>. A new rule is
# one function here (or a callable passed as ``rule``).
Rule = Callable[[jax.Array, Union[float, jax.Array]], jax.Array]
RULES: dict[str, Rule] = {
    # The authors' rule, sign(<g, v>) <g_hat, v> = |<g_hat, v>|: it damps a
    # component along +v and amplifies one along -v.
    "reference": lambda cos, alpha: alpha * jnp.abs(cos),
    # Damps the component along v by 1 - alpha whatever v's sign.
    "sign_invariant": lambda cos, alpha: alpha * cos,
}


def resolve_rule(rule: Union[str, Rule]) -> Rule:
  """The rule's function: a name of ``RULES`` or a callable ``(cos, alpha) -> coefficient``."""
  if callable(rule):
    return rule
  _validation.check_choice("rule", rule, tuple(RULES),
                           also="or a callable (cos, alpha) -> coefficient")
  return RULES[rule]


def correct(updates: _tree.PyTree, eigenvector: _tree.PyTree, alpha, *,
            rule: Rule, normalize: bool) -> tuple[_tree.PyTree, jax.Array]:
  r"""Applies a correction rule to ``updates``; returns it and :math:`\cos(g, v)`.

  :math:`\hat g - r(c, \alpha)\, v` with :math:`c = \langle \hat g, v\rangle`;
  ``normalize=False`` multiplies back by :math:`\|g\|`.
  """
  unit, norm = _tree.safe_normalize(updates)
  # At least float32, as the state stores it: the norm of bf16 updates is bf16.
  cos = _tree.vdot(unit, eigenvector)
  coefficient = jnp.asarray(rule(cos, alpha))
  if coefficient.shape != ():
    raise ValueError(
        "rule must return a scalar coefficient of the eigenvector, got shape "
        f"{coefficient.shape}.")
  # A NaN alpha set at run time (optax.inject_hyperparams), or a rule's
  # non-finite coefficient, removes nothing rather than poisoning the update.
  coefficient = _validation.finite_or_zero(coefficient)
  corrected = _tree.add_scaled(unit, -coefficient, eigenvector)
  if not normalize:
    corrected = jax.tree.map(
        lambda c: (c * jnp.where(_tree.is_usable(norm), norm, 0.0)
                   ).astype(c.dtype), corrected)
  return corrected, cos


def eigenvector_correction(
    alpha: Union[float, jax.Array, Callable[[jax.Array], jax.Array]] = 0.2,
    *,
    update_every: int = 2,
    num_iters: int = 1,
    method: _tracking.Method = "power",
    rule: Union[str, Rule] = "reference",
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
  estimator happened to return. ``rule="sign_invariant"`` applies
  :math:`\hat g - \alpha c v`, which damps the component by :math:`1-\alpha`
  for either sign and gives the same update for :math:`v` and :math:`-v`.
  The reference rule stays the default for fidelity with the paper's code.
  ``rule`` also takes a callable ``(cos, alpha) -> coefficient``: the update
  is then :math:`\hat g - \mathrm{coefficient}\; v`.

  **Step 0.** The reference code first refreshes at step ``update_every`` and
  leaves earlier steps uncorrected; here the first refresh is at step 0, so
  no step is ever corrected along an unestimated random vector.

  **Defaults: one power step every 2 steps.** The correction at every step
  uses the stored :math:`v`, so what matters is how well that vector follows
  the loss's sharp direction at every step, not how well one refresh fits
  its own batch. Few warm-started power steps on many batches average over
  batches: one every 2 steps tracked the top eigenvector of both the step's
  batch Hessian and a large-batch Hessian as well as the reference's 5 power
  steps every 5 steps on every model of ``benchmarks/quality.py``, for about
  three quarters of its work (one product every 3 steps fell short on one
  model); converging harder on one batch did not help. ``update_every=1``
  refreshes on every step, and ``method="power", num_iters=5,
  update_every=5`` is the reference's schedule.

  **Estimators.** ``method="lanczos"`` (``num_iters`` products) converges to
  the algebraically largest eigenvalue and keeps its ``num_iters``-vector
  basis during a refresh; ``method="power"`` to the one of largest
  *magnitude* (possibly negative early in training), holding one vector.
  ``method="power", num_iters=5`` is the reference's schedule. Any callable
  ``(matvec, v0) -> EigenResult`` works as ``method`` too, e.g.
  ``functools.partial(xsam_optax.power_iteration, num_iters=3, tol=1e-3)``
  or one of your own: it gets the (batch-averaged) curvature product and the
  stored eigenvector, and must return one eigenpair as an
  :class:`EigenResult` with a finite residual (a non-finite eigenvalue or
  residual, or a zero or non-finite vector, keeps the previous eigenvector);
  its eigenvector is normalised before it is stored. The Performance page of
  the manual (docs/performance.md) compares the estimators' cost and quality.

  **Real parameters.** Complex leaves in ``params`` are refused (a
  ``ValueError`` naming the leaf, in ``init`` and ``update``): the cosine and
  the eigenvalue are those of a real vector space. Keep the real and
  imaginary parts as two real leaves and rebuild the complex value in the
  loss. Integer leaves are left alone (see :func:`xsam`).

  **alpha set at run time.** An ``alpha`` array (``optax.inject_hyperparams``)
  is not checked; a NaN or infinite one, like a callable ``rule``'s
  non-finite coefficient, removes nothing: the update is :math:`\hat g`
  (:math:`g` with ``normalize=False``).

  **alpha schedules.** ``alpha`` may be a schedule, a callable of the step
  count (the state's ``count``), as optax's learning rates; a scheduled
  value below 0 or not finite acts as 0.

  **Per-group perturbations.** After :func:`sam_ascent` with a ``grad_fn``
  from :func:`grouped_grad_fn`, the correction acts on the incoming
  (group-averaged) SAM gradient, and refreshes use the Hessian of
  ``grad_fn``, the whole batch's.

  **Periodic refreshes: choose them on the host.** With ``update_every > 1``
  and without ``refresh``, ``update`` follows the schedule on the step
  count inside one program: under ``lax.cond`` on accelerators, and on CPU
  (where XLA runs a conditional's convolutions in a slow layout) by
  computing the refresh at every step and keeping it on refresh steps, so
  it costs what refreshing every step costs. To pay only for the refresh
  steps everywhere, pass ``refresh=schedule(step)`` (a Python bool, with
  ``schedule = xsam_optax.refresh_schedule(tx)``, the period read from the
  transform) from the training loop to a step jitted with
  ``static_argnames="refresh"``: the two kinds of step compile separately
  and neither has a ``cond``.

  **What a refresh multiplies by.** ``update`` accepts an optional
  ``curvature_fn(params, v) -> product`` used instead of the Hessian of
  ``grad_fn``: :func:`hessian_fn` of another gradient (e.g. on a sub-batch,
  cheaper per product, tracking that sub-batch's eigenvector) or
  :func:`gauss_newton_fn` (positive semi-definite, cheaper per product) or
  :func:`finite_difference_fn` (one gradient per product, with a step small
  enough for ReLU networks and a guard the refresh applies against a product
  that crossed a kink; float32 and float64 only). The
  SAM ascent and the correction still use ``grad_fn`` and the incoming
  gradient.

  Args:
    alpha: correction strength in ``[0, 2]``; 0 only normalises. Or a
      schedule of the step count.
    update_every: refresh period in steps (``>= 1``; default every 2 steps).
    num_iters: products per refresh of a named ``method`` (``>= 1``; ``>= 2``
      for Lanczos); leave it at its default with a callable ``method``.
    method: ``"power"``, ``"lanczos"`` or a callable ``(matvec, v0) ->
      EigenResult`` (with :func:`optax.inject_hyperparams`, name a callable
      ``method`` in ``static_args``).
    rule: ``"reference"`` (:math:`\alpha |c|`), ``"sign_invariant"``
      (:math:`\alpha c`) or a callable ``(cos, alpha) -> coefficient`` of
      :math:`v` to remove (name a callable in ``static_args`` of
      :func:`optax.inject_hyperparams`, as for ``method``).
    normalize: drop the gradient's magnitude, as the reference does: the
      next transform gets a unit-length direction, so a base optimizer's
      learning rate becomes a step length and rates tuned for SGD or SAM do
      not carry over (tune it, or set ``normalize=False``).
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
  _validation.check_hyperparameter("alpha", alpha, minimum=0.0, maximum=2.0)
  rule_fn = resolve_rule(rule)
  _validation.check_bool("normalize", normalize)
  settings = _tracking.refresh_settings(
      update_every, num_iters, method, batch_axis_name, owner=eigenvector_correction)
  _validation.check_int("seed", seed, minimum=0)

  def init_fn(params):
    return _tracking.initial_state(params, seed)

  def update_fn(updates, state, params=None, *, grad_fn=None, refresh=None,
                curvature_fn=None, **extra_args):
    _tracking.reject_removed_extras(extra_args,
                                    owner="eigenvector_correction")
    del extra_args
    estimate = _tracking.track(
        state, params, grad_fn, settings, refresh,
        owner="eigenvector_correction", curvature_fn=curvature_fn)
    corrected, cos = correct(updates, estimate[0],
                             _validation.value_at(alpha, state.count),
                             rule=rule_fn, normalize=normalize)
    return corrected, _tracking.next_state(state, estimate, cos)

  return _tracking.with_schedule(_float_leaves.on_float_leaves(
      optax.GradientTransformationExtraArgs(init_fn, update_fn),
      owner="eigenvector_correction"), settings.update_every)
