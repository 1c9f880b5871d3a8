"""Tracking the Hessian's top eigenvector across steps.

Shared by :func:`eigenvector_correction` (X-SAM) and :func:`eigen_sam_ascent`
(Eigen-SAM): both keep ``count, eigenvector, eigenvalue, residual, cos_angle``
in their state and refresh the eigenvector on a schedule, with an estimator
(a callable ``(matvec, v0) -> EigenResult``) applied to a curvature product
(``curvature_fn(params, v)``, by default the Hessian of ``grad_fn``).
"""

from collections.abc import Callable
import functools
import inspect
import numbers
from typing import Any, NamedTuple, Optional, Union
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_optax import _estimators
from xsam_optax import _finite_difference
from xsam_optax import _hvp
from xsam_optax import _tree
from xsam_optax import _validation

Method = Union[str, _estimators.Estimator]

# The named methods: estimator, and the fewest products with which a
# warm-started refresh can move the vector (one Lanczos product spans only
# the start vector). Every list of method names derives from this one.
# Their ``_from_unit`` forms start from the stored eigenvector as it is (a
# unit vector) and return a unit vector or a non-finite residual, so a
# refresh with them needs no normalisation of its own: each would be one
# more reduction per parameter leaf in the compiled step.
METHODS: dict[str, tuple[Callable[..., _estimators.EigenResult], int]] = {
    "power": (_estimators.power_iteration_from_unit, 1),
    "lanczos": (_estimators.lanczos_from_unit, 2),
}


class RefreshSettings(NamedTuple):
  """Static settings of the refresh: how often, with what, over which axis.

  ``checks_vector``: whether a refresh normalises the estimator's vector and
  checks its norm (a callable ``method``'s; the named ones need not).
  """

  update_every: int
  estimator: _estimators.Estimator
  batch_axis_name: _tree.AxisName
  checks_vector: bool = True


def refresh_settings(update_every: int, num_iters: int, method: Method,
                     batch_axis_name: _tree.AxisName, *,
                     owner: Callable[..., Any]) -> RefreshSettings:
  """Validates the settings and binds a named ``method`` to ``num_iters``.

  A callable ``method`` carries its own settings, so ``num_iters`` must keep
  its default then (read from ``owner``'s signature, the one place it is
  written): a different value would be silently unused.
  """
  default_num_iters = inspect.signature(owner).parameters["num_iters"].default
  _validation.check_int("update_every", update_every, minimum=1)
  _validation.check_axis_name("batch_axis_name", batch_axis_name)
  _validation.check_int("num_iters", num_iters, minimum=1)
  if callable(method):
    if num_iters != default_num_iters:
      raise ValueError(
          f"num_iters sets the products of a named method; a callable "
          f"method carries its own settings, got num_iters={num_iters} "
          f"with method={method!r}. Bind them in the callable instead, e.g. "
          "functools.partial(xsam_optax.lanczos, num_iters=...).")
    return RefreshSettings(update_every, method, batch_axis_name)
  _validation.check_choice("method", method, tuple(METHODS),
                           also="or a callable (matvec, v0) -> EigenResult")
  estimator, fewest = METHODS[method]
  if num_iters < fewest:
    raise ValueError(
        f"num_iters must be >= {fewest} with method={method!r}, got "
        f"{num_iters}: fewer products never move the warm-started "
        "eigenvector. Use method='power' for single-product refreshes.")
  return RefreshSettings(
      update_every, functools.partial(estimator, num_iters=num_iters),
      batch_axis_name, checks_vector=False)


def refresh_due(step: int, update_every: Optional[int] = None) -> bool:
  """Whether ``step`` is a refresh step of a transform with period ``update_every``.

  ``True`` at steps ``0, update_every, 2 * update_every, ...``: the steps on
  which the transforms refresh when ``update`` gets no ``refresh`` (the state's
  ``count`` is the step). Pass the result as ``refresh=`` (a Python bool) to
  ``update`` inside a step jitted with ``static_argnames="refresh"``: the host
  then picks one of two compiled steps, and neither contains a ``lax.cond``.
  That is the way to pay for products only on refresh steps on every
  platform: without it, a step on CPU computes the refresh at every step
  (XLA:CPU runs a conditional's convolutions in a slow layout), and
  accelerators run it under ``lax.cond`` (docs/performance.md).

  ``update_every`` must be the transform's own period, which
  :func:`refresh_schedule` reads from the transform:
  ``refresh_schedule(tx)(step)`` is this function with the right period, and
  cannot disagree with ``tx``.

  Args:
    step: the host's step counter, a non-negative Python or NumPy int (the
      number of ``update`` calls before this one).
    update_every: the transform's refresh period. Leaving it out is
      deprecated (a ``DeprecationWarning``): it then means 2, the transforms'
      default, which silently disagrees with a transform built with another
      ``update_every``.

  Returns:
    A Python bool.

  Examples:
    >>> import xsam_optax
    >>> [step for step in range(12) if xsam_optax.refresh_due(step, 5)]
    [0, 5, 10]
  """
  if update_every is None:
    warnings.warn(
        "refresh_due(step) without update_every is deprecated: it assumes "
        "period 2, whatever the transform's update_every. Use "
        "xsam_optax.refresh_schedule(tx)(step), which reads the period from "
        "the transform, or pass update_every.",
        DeprecationWarning, stacklevel=2)
    update_every = DEFAULT_UPDATE_EVERY
  _validation.check_int("update_every", update_every, minimum=1)
  if isinstance(step, jax.Array):
    try:
      step = np.asarray(step)
    except jax.errors.TracerArrayConversionError:
      raise ValueError(
          "refresh_due: step is traced (called inside jit); it is for the "
          "host loop. Inside a jitted step, leave update's refresh=None to "
          "follow the schedule under lax.cond.") from None
  if isinstance(step, np.ndarray) and step.shape == ():
    step = step.item()
  if (isinstance(step, bool) or not isinstance(step, numbers.Integral)
      or step < 0):
    raise ValueError(
        f"step must be a non-negative int (the host's step counter), got "
        f"{step!r}.")
  return int(step) % update_every == 0


# The transforms' default refresh period (the signatures' default; the
# deprecated default of refresh_due).
DEFAULT_UPDATE_EVERY = 2


class RefreshSchedule(NamedTuple):
  """The host's copy of a transform's refresh schedule (:func:`refresh_schedule`).

  Calling it with the host's step counter gives ``refresh_due(step,
  update_every)``.

  Attributes:
    update_every: the transform's refresh period.
  """

  update_every: int

  def __call__(self, step: int) -> bool:
    return refresh_due(step, self.update_every)


# The refresh period of each transform built by eigenvector_correction,
# eigen_sam_ascent or xsam, keyed by the transform's update function (static
# settings, as a docstring is, not state: the state pytree holds arrays only,
# and a period there would be traced under jit). Weak keys: an entry goes
# with its transform.
_PERIODS: "weakref.WeakKeyDictionary[Callable[..., Any], int]" = (
    weakref.WeakKeyDictionary())


def with_schedule(tx: optax.GradientTransformationExtraArgs,
                  update_every: int) -> optax.GradientTransformationExtraArgs:
  """``tx``, its refresh period recorded for :func:`refresh_schedule`."""
  _PERIODS[tx.update] = update_every
  return tx


def refresh_schedule(tx: optax.GradientTransformation) -> RefreshSchedule:
  """The host's refresh schedule of ``tx``, read from ``tx`` itself.

  ``schedule = refresh_schedule(tx)``, then ``refresh=schedule(step)`` in the
  training loop: the host refreshes exactly where ``tx`` would by itself,
  whatever ``update_every`` it was built with, so the two cannot disagree
  (``refresh_due(step)`` without the period assumes 2).

  Args:
    tx: a transform returned by :func:`xsam`, :func:`eigenvector_correction`
      or :func:`eigen_sam_ascent`, not wrapped or chained further. For a chain
      of your own, take the schedule of the eigen-tracking piece before
      chaining it.

  Returns:
    A :class:`RefreshSchedule`: ``schedule(step)`` is a Python bool, and
    ``schedule.update_every`` the period.

  Raises:
    ValueError: if ``tx`` is not such a transform (its period is unknown).

  Examples:
    >>> import optax, xsam_optax
    >>> tx = xsam_optax.xsam(optax.sgd(0.1), update_every=5)
    >>> schedule = xsam_optax.refresh_schedule(tx)
    >>> [step for step in range(12) if schedule(step)]
    [0, 5, 10]
  """
  update = getattr(tx, "update", None)
  try:
    period = _PERIODS.get(update) if update is not None else None
  except TypeError:  # an update that cannot be weakly referenced
    period = None
  if period is None:
    raise ValueError(
        "tx must be a transform returned by xsam_optax.xsam, "
        "eigenvector_correction or eigen_sam_ascent (not wrapped or chained "
        f"further), got {type(tx).__name__}: its refresh period is unknown. "
        "Take the schedule of the eigen-tracking piece before chaining it, "
        "e.g. schedule = refresh_schedule(correction) with correction = "
        "eigenvector_correction(...), or pass the period yourself: "
        "refresh_due(step, update_every).")
  return RefreshSchedule(period)


# The state's residual when there is none: negative, as no norm is, and
# finite, so that jax_debug_infs can watch a healthy run from init on.
UNKNOWN_RESIDUAL = -1.0


class EigenvectorState(NamedTuple):
  """State of :func:`eigenvector_correction` and :func:`eigen_sam_ascent`.

  Attributes:
    count: int32, number of ``update`` calls so far.
    eigenvector: unit-norm estimate of the Hessian's top eigenvector, a pytree
      like the parameters (same dtypes; ``None`` at integer leaves, which are
      no direction of the loss).
    eigenvalue: the top-eigenvalue estimate of the last refresh (0 before the
      first). With ``method="lanczos"`` it is the Ritz value of
      ``eigenvector`` itself. With ``method="power"`` it is the Rayleigh
      quotient :math:`u^\\top H u` of the last iterate :math:`u` that was
      multiplied, i.e. of the vector one power step *before* ``eigenvector``
      (which is :math:`Hu / \\|Hu\\|`): the two belong to the same vector
      only once the iteration has converged. With a callable ``method``, the
      ``eigenvalue`` of its :class:`EigenResult`.
    residual: :math:`\\|Hu - \\lambda u\\|` for that same vector (the Ritz
      residual for Lanczos) at the last refresh; ``-1`` (any negative value)
      when unknown: before the first refresh, and after a refresh that failed
      and kept the previous eigenvector. Not ``inf``, which would stop a run
      under ``jax_debug_infs`` at ``init``.
    cos_angle: the signed cosine between the incoming gradient and
      ``eigenvector`` at the last step (its sign is the one the reference rule
      discards).

  Examples:
    >>> import jax.numpy as jnp, xsam_optax
    >>> state = xsam_optax.eigenvector_correction().init({"w": jnp.ones(3)})
    >>> type(state).__name__, int(state.count), float(state.residual)
    ('EigenvectorState', 0, -1.0)
  """

  count: jax.Array
  eigenvector: _tree.PyTree
  eigenvalue: jax.Array
  residual: jax.Array
  cos_angle: jax.Array


@jax.jit
def _start_key(seed) -> jax.Array:
  """The key of the start vector: one program (run eagerly, the two random
  calls would compile one each)."""
  return jax.random.split(jax.random.PRNGKey(seed))[1]


def initial_state(params: _tree.PyTree, seed: int) -> EigenvectorState:
  """A fresh state: a random unit eigenvector drawn from ``seed``."""
  draw = _start_key(seed)
  scalar = _tree.scalar_dtype(params)
  return EigenvectorState(
      count=jnp.zeros((), jnp.int32),
      eigenvector=_tree.random_unit_like(draw, params),
      eigenvalue=jnp.zeros((), scalar),
      residual=jnp.full((), UNKNOWN_RESIDUAL, scalar),
      cos_angle=jnp.zeros((), scalar),
  )


def next_state(state: EigenvectorState, estimate: tuple,
               cos: jax.Array) -> EigenvectorState:
  """The state after one step that used ``estimate`` and measured ``cos``."""
  eigenvector, eigenvalue, residual = estimate
  return EigenvectorState(
      count=optax.safe_increment(state.count),
      eigenvector=eigenvector,
      eigenvalue=eigenvalue,
      residual=residual,
      cos_angle=cos.astype(state.cos_angle.dtype),
  )


def reject_removed_extras(extra_args: dict[str, Any], *, owner: str) -> None:
  """A clear error for ``hvp_grad_fn``, which 0.2 replaced by a helper.

  Unknown extras are ignored, as optax transforms do; this one would be
  ignored silently while the caller expects it to change the refreshes.
  """
  if "hvp_grad_fn" in extra_args:
    raise ValueError(
        f"{owner}: hvp_grad_fn was replaced by curvature_fn; pass "
        "curvature_fn=xsam_optax.hessian_fn(g) for hvp_grad_fn=g.")


def _checked_result(result, eigenvector: _tree.PyTree):
  """The estimator's eigenpair, its eigenvector in the stored dtypes.

  Shapes are compared leaf by leaf, not as two ``tree.map`` results: a
  registered pytree class without ``__eq__`` compares by identity.
  """
  if not all(hasattr(result, field)
             for field in ("eigenvalue", "eigenvector", "residual")):
    raise ValueError(
        "method must return an xsam_optax.EigenResult(eigenvalue, "
        "eigenvector, residual, num_matvecs), got "
        f"{_describe(result)}. A method of your own can end with "
        "return xsam_optax.EigenResult(value, vector, residual, "
        "jnp.asarray(num_products, jnp.int32)).")
  if jax.tree.structure(result.eigenvector) != jax.tree.structure(eigenvector):
    raise ValueError(
        "method must return an eigenvector with the parameters' tree "
        f"structure {jax.tree.structure(eigenvector)}, got "
        f"{jax.tree.structure(result.eigenvector)}.")
  shapes = lambda tree: [jnp.shape(x) for x in jax.tree.leaves(tree)]
  if (jnp.shape(result.eigenvalue) != ()
      or shapes(result.eigenvector) != shapes(eigenvector)):
    raise ValueError(
        "method must return one eigenpair, a scalar eigenvalue and an "
        "eigenvector shaped like the parameters (for lanczos: k=1), got an "
        f"eigenvalue of shape {jnp.shape(result.eigenvalue)} and eigenvector "
        f"leaves of shapes {shapes(result.eigenvector)} for parameters of "
        f"shapes {shapes(eigenvector)}.")
  vector = jax.tree.map(lambda new, old: new.astype(old.dtype),
                        result.eigenvector, eigenvector)
  return vector, result.eigenvalue, result.residual


def _describe(value) -> str:
  """``value``'s type, and its length for a sequence, for an error message."""
  kind = type(value).__name__
  if isinstance(value, (tuple, list)):
    return f"a {kind} of length {len(value)}"
  return f"a value of type {kind}"


def refreshed(state, product, settings: RefreshSettings,
              max_growth: Optional[float] = None):
  """The refreshed eigenvector, eigenvalue and residual (previous ones if it failed).

  ``product(v)`` is the curvature product on this replica; the estimator
  gets it averaged over ``batch_axis_name``. With ``max_growth`` (a
  finite-difference product's guard), a refresh whose last product is
  longer than ``max_growth`` times the last accepted one's fails too.
  """
  matvec = lambda v: _tree.batch_mean(product(v), settings.batch_axis_name)
  vector, value, residual = _checked_result(
      settings.estimator(matvec, state.eigenvector), state.eigenvector)
  # A failed product shows as a non-finite eigenvalue or residual (the
  # built-in estimators report it as a finite eigenvalue with an infinite
  # residual): keep the previous estimate then.
  ok = jnp.isfinite(value) & jnp.isfinite(residual)
  if max_growth is not None:
    ok = ok & ~_grew_too_much(state, value, residual, max_growth)
  if settings.checks_vector:
    # The state promises a unit vector, and the correction's size depends on
    # it: a method's vector of another norm is normalised here, and a zero
    # or non-finite one keeps the previous estimate.
    vector, norm = _tree.safe_normalize(vector)
    ok = ok & _tree.is_usable(norm)
  return (
      optax.tree.where(ok, vector, state.eigenvector),
      jnp.where(ok, value, state.eigenvalue).astype(state.eigenvalue.dtype),
      jnp.where(ok, residual, UNKNOWN_RESIDUAL).astype(state.residual.dtype),
  )


def _grew_too_much(state, value, residual, max_growth: float) -> jax.Array:
  """Whether the product outgrew the last accepted one by more than ``max_growth``.

  For a unit ``u`` and its product ``w``, ``||w||^2 = (u.w)^2 + ||w - (u.w)
  u||^2``: the eigenvalue and residual an estimator reports give the length
  of its last product (of the Ritz vector's, for Lanczos), and the state's
  those of the last accepted refresh. Unknown (a negative residual: before
  the first refresh, after a rejected one) never rejects, so a real rise of
  the curvature costs one refresh and cannot lock the vector in.
  """
  previous = jnp.hypot(state.eigenvalue, state.residual)
  length = jnp.hypot(value, residual).astype(previous.dtype)
  return (state.residual >= 0) & (length > max_growth * previous)


def _kept(state):
  return state.eigenvector, state.eigenvalue, state.residual


def _curvature_product(params, grad_fn, curvature_fn, owner: str):
  """``(v -> curvature_fn(params, v), max_growth)``: by default the Hessian
  of grad_fn, unguarded; ``max_growth`` is the guard a product carries
  (:func:`finite_difference_fn`'s)."""
  if curvature_fn is None:
    return functools.partial(_hvp.hessian_fn(grad_fn), params), None
  if not callable(curvature_fn):
    raise ValueError(
        f"{owner}: curvature_fn must be callable ((params, v) -> product "
        f"pytree) or None, got {curvature_fn!r}.")
  _tree.check_same_structure(
      params, jax.eval_shape(curvature_fn, params, params),
      what="curvature_fn")
  max_growth = getattr(curvature_fn, _finite_difference.GROWTH_ATTRIBUTE, None)
  _finite_difference.check_max_growth(max_growth)
  return functools.partial(curvature_fn, params), max_growth


def resolve_refresh(state: NamedTuple, refresh, settings: RefreshSettings):
  """Whether this step refreshes: a Python bool when known while tracing.

  ``refresh=None`` follows the schedule (always ``True`` when
  ``update_every == 1``); otherwise a traced boolean scalar, for
  ``lax.cond``. A concrete array (an eager, un-jitted call) becomes a bool:
  a ``lax.cond`` would be traced and compiled anew at every call.
  """
  refresh = _validation.check_refresh(refresh)
  if refresh is None:
    # Every step refreshes when update_every == 1: no lax.cond needed.
    refresh = (True if settings.update_every == 1
               else state.count % settings.update_every == 0)
  if isinstance(refresh, jax.Array):
    try:
      refresh = bool(refresh)
    except jax.errors.ConcretizationTypeError:
      return refresh
  return bool(refresh)


def track(
    state: NamedTuple,
    params: _tree.PyTree,
    grad_fn: Callable[[_tree.PyTree], _tree.PyTree],
    settings: RefreshSettings,
    refresh: Union[None, bool, jax.Array],
    *,
    owner: str,
    curvature_fn: Optional[Callable[[_tree.PyTree, _tree.PyTree], _tree.PyTree]] = None,
) -> tuple[_tree.PyTree, jax.Array, jax.Array]:
  """The eigenvector, eigenvalue and residual to use at this step.

  ``refresh=None`` follows the schedule (``count % update_every == 0``, a
  traced choice unless ``update_every == 1``); a Python or NumPy bool is the
  host's choice (one of two programs, see :func:`refresh_due`); an array is
  a traced choice. A traced choice runs the refresh under ``lax.cond``,
  except on CPU, where the refresh is computed at every step and kept on
  refresh steps only (``_EVERY_STEP_PLATFORMS``): both give the same
  eigenvector, eigenvalue and residual. A refresh runs the estimator on
  ``v -> curvature_fn(params, v)`` (default: the Hessian of ``grad_fn``),
  averaged over ``batch_axis_name``.
  """
  _validation.require_grad_fn(grad_fn, params, owner=owner)
  params = _tree.as_arrays(params)
  _validation.check_refresh(refresh)
  _tree.check_same_structure(
      params, jax.eval_shape(grad_fn, params), what="grad_fn")
  product, max_growth = _curvature_product(params, grad_fn, curvature_fn,
                                           owner)
  if not jax.tree.leaves(params):
    return _kept(state)  # Nothing to estimate.
  refresh = resolve_refresh(state, refresh, settings)
  if isinstance(refresh, bool):
    if refresh:
      return refreshed(state, product, settings, max_growth)
    return _kept(state)
  every_step = functools.partial(_refresh_every_step, product=product,
                                 settings=settings, max_growth=max_growth)
  under_cond = functools.partial(_refresh_under_cond, product=product,
                                 settings=settings, max_growth=max_growth)
  return jax.lax.platform_dependent(
      refresh, state, default=under_cond,
      **{platform: every_step for platform in _EVERY_STEP_PLATFORMS})


# Where a traced refresh (a periodic schedule under refresh=None) computes the
# refresh at every step and keeps it on refresh steps only, instead of under
# lax.cond. XLA:CPU runs the convolutions of a product inside a conditional
# several times slower than at top level, so there a refresh every k steps
# under lax.cond cost more than refreshing every step; the unconditional
# program never does. Elsewhere lax.cond skips the work. The choice is made
# when the step is lowered for its platform (lax.platform_dependent), so the
# compiled program holds one of the two and no conditional on the platform.
_EVERY_STEP_PLATFORMS = ("cpu",)


def _refresh_every_step(refresh, state, *, product, settings, max_growth):
  """The refresh computed unconditionally, kept only where ``refresh``."""
  return optax.tree.where(
      refresh, refreshed(state, product, settings, max_growth), _kept(state))


def _refresh_under_cond(refresh, state, *, product, settings, max_growth):
  """The refresh under ``lax.cond``: computed only where ``refresh``."""
  return jax.lax.cond(
      refresh,
      lambda s: refreshed(s, product, settings, max_growth),
      _kept,
      state)
