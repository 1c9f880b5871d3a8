"""X-SAM's correction: remove part of the gradient along the top eigenvector."""

from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from xsam_optax import _sam
from xsam_optax import _tracking
from xsam_optax import _tree
from xsam_optax import _validation

PyTree = Any


class EigenvectorCorrectionState(NamedTuple):
  """State of :func:`eigenvector_correction`.

  Attributes:
    count: int32, number of ``update`` calls so far.
    key: PRNG key that drew the initial eigenvector (kept so that a restored
      checkpoint carries everything the transform used).
    eigenvector: unit-norm estimate of the Hessian's top eigenvector, a pytree
      like the parameters (same dtypes).
    eigenvalue: the top-eigenvalue estimate of the last refresh (0 before the
      first). With ``method="lanczos"`` it is the Ritz value of
      ``eigenvector`` itself. With ``method="power"`` it is the Rayleigh
      quotient :math:`u^\\top H u` of the last iterate :math:`u` that was
      multiplied, i.e. of the vector one power step *before* ``eigenvector``
      (which is :math:`Hu / \\|Hu\\|`): the two belong to the same vector
      only once the iteration has converged.
    residual: :math:`\\|Hu - \\lambda u\\|` for that same vector (the Ritz
      residual for Lanczos) at the last refresh (``inf`` before the first or
      when unknown).
    cos_angle: cosine between the incoming gradient and ``eigenvector`` at
      the last step.
  """

  count: jax.Array
  key: jax.Array
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
  cos = _tree.vdot(unit, eigenvector).astype(jnp.result_type(norm))
  coefficient = alpha * (cos if sign_invariant else jnp.abs(cos))
  corrected = _tree.add_scaled(unit, -coefficient, eigenvector)
  if not normalize:
    corrected = jax.tree.map(
        lambda c: (c * jnp.where(_tree.is_usable(norm), norm, 0.0)
                   ).astype(c.dtype), corrected)
  return corrected, cos


def eigenvector_correction(
    alpha: Union[float, jax.Array] = 0.2,
    *,
    update_every: int = 5,
    num_iters: int = 4,
    method: str = "lanczos",
    sign_invariant: bool = False,
    normalize: bool = True,
    seed: int = 0,
    batch_axis_name: _sam.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Removes part of the gradient's component along the top Hessian eigenvector.

  Every ``update_every`` steps, starting at step 0, the stored eigenvector
  :math:`v` is refreshed by ``num_iters`` iterations of ``method`` on
  Hessian-vector products of ``grad_fn`` at ``params`` (the unperturbed
  parameters), warm-started from the stored vector (a random unit vector drawn
  from ``seed`` before the first refresh). Then, with
  :math:`\hat g = g/\|g\|` and :math:`c = \langle \hat g, v\rangle`:

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

  **Defaults: Lanczos, 4 products.** ``method="lanczos"`` converges to the
  algebraically largest eigenvalue, ``method="power"`` to the one of largest
  *magnitude* (possibly negative early in training). On the training CLI's
  conv net, 4 warm-started Lanczos products found the batch's top
  eigenvector at least as well as the reference's 5 power iterations (mean
  :math:`|\cos(v, v^*)|` 0.82-0.93 vs 0.72-0.90 over five trajectories) with
  4/5 of the products (``benchmarks/step_overhead.py``). Lanczos keeps its
  basis, so a refresh needs more memory (ResNet-18: SAM + 15x the parameters,
  against 5.9x for power 5). ``method="power", num_iters=5`` is the
  reference's schedule, and the lighter one in memory.

  **Choose refreshes on the host.** Without ``refresh``, ``update`` refreshes
  under ``lax.cond`` on the step count, which on XLA:CPU runs the
  Hessian-vector products' convolutions about ten times slower. Pass
  ``refresh=xsam_optax.refresh_due(step, update_every)`` (a Python bool) from
  the training loop to a step jitted with ``static_argnames="refresh"``: the
  two kinds of step compile separately and neither has a ``cond``.

  **Cheaper refreshes.** ``update`` accepts an optional ``hvp_grad_fn``: the
  Hessian-vector products of a refresh then differentiate it instead of
  ``grad_fn``, e.g. the gradient of the loss on a quarter of the mini-batch
  (about half the cost per product; ``benchmarks/step_overhead.py`` reports
  the price in eigenvector quality). The SAM ascent and the correction still
  use ``grad_fn`` and the incoming gradient. Or pass ``curvature_fn``, a
  function ``(params, v) -> product`` used instead of the Hessian, e.g.
  :func:`gauss_newton_fn` (positive semi-definite, about 2/3 of the cost per
  product).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> loss = lambda p: jnp.sum(jnp.array([10.0, 1.0]) * p["w"] ** 2)
    >>> params = {"w": jnp.array([1.0, 1.0])}
    >>> tx = xsam_optax.eigenvector_correction(0.2, update_every=5,
    ...                                        num_iters=20)
    >>> state = tx.init(params)
    >>> grad_fn = jax.grad(loss)
    >>> updates, state = tx.update(grad_fn(params), state, params,
    ...                            grad_fn=grad_fn)
    >>> round(float(optax.tree.get(state, "eigenvalue")), 3)
    20.0

  Args:
    alpha: correction strength in ``[0, 2]``; 0 only normalises.
    update_every: refresh period in steps (``>= 1``).
    num_iters: Hessian-vector products per refresh (``>= 1``; ``>= 2`` for
      Lanczos).
    method: ``"lanczos"`` or ``"power"``.
    sign_invariant: use the sign-invariant rule instead of the reference one.
    normalize: drop the gradient's magnitude, as the reference does.
    seed: seed of the initial random eigenvector.
    batch_axis_name: mapped axis over which to average Hessian-vector
      products (pmap / shard_map).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` needs
    ``params`` and the keyword argument ``grad_fn``, and accepts optional
    ``refresh``, ``hvp_grad_fn`` and ``curvature_fn``.

  References:
    Duan, Chen and Guan, `X-SAM: Boosting Sharpness-Aware Minimization with
    Dominant-Eigenvector Gradient Correction
    <https://arxiv.org/abs/2601.10251>`_, 2026.
  """
  _validation.check_float("alpha", alpha, minimum=0.0, maximum=2.0)
  _validation.check_bool("sign_invariant", sign_invariant)
  _validation.check_bool("normalize", normalize)
  schedule = _tracking.Schedule(update_every, num_iters, method,
                                batch_axis_name).validate()
  _validation.check_int("seed", seed, minimum=0)

  def init_fn(params):
    return EigenvectorCorrectionState(**_tracking.initial_fields(params, seed))

  def update_fn(updates, state, params=None, *, grad_fn=None, refresh=None,
                hvp_grad_fn=None, curvature_fn=None, **extra_args):
    del extra_args
    eigenvector, eigenvalue, residual = _tracking.track(
        state, params, grad_fn, schedule, refresh,
        owner="eigenvector_correction", hvp_grad_fn=hvp_grad_fn,
        curvature_fn=curvature_fn)
    corrected, cos = correct(updates, eigenvector, alpha,
                             sign_invariant=sign_invariant,
                             normalize=normalize)
    return corrected, EigenvectorCorrectionState(
        count=optax.safe_increment(state.count),
        key=state.key,
        eigenvector=eigenvector,
        eigenvalue=eigenvalue,
        residual=residual,
        cos_angle=cos.astype(state.cos_angle.dtype),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
