"""Eager checks of static settings, with errors that name the argument.

Floats are checked only when they are plain Python numbers, so that
``optax.inject_hyperparams`` (which passes arrays) keeps working.
"""

import inspect
import math
import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

GRAD_FN_HELP = (
    "Pass the gradient of the training loss on the current mini-batch as a "
    "keyword argument, e.g.\n"
    "  grad_fn = jax.grad(lambda p: loss(p, batch))\n"
    "  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)"
)
WRAPPERS_HELP = (
    "If you did pass grad_fn, something between your call and this "
    "transform dropped it: flax's TrainState.apply_gradients (use "
    "xsam_optax.flax_utils.TrainState, which forwards it) and optax.lookahead "
    "do not forward keyword arguments to tx.update (docs/guide.md, 'Composing "
    "with optax, Flax and Equinox', shows how to bind grad_fn for such "
    "wrappers)."
)
TRAIN_STATE_HELP = (
    "flax.training.train_state.TrainState.apply_gradients called tx.update "
    "without it: it passes extra keyword arguments (grad_fn=...) to "
    ".replace(), not to tx.update. Use xsam_optax.flax_utils.TrainState, "
    "whose apply_gradients forwards them:\n"
    "  from xsam_optax.flax_utils import TrainState\n"
    "  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)\n"
    "  state = state.apply_gradients(grads=grads, grad_fn=grad_fn)"
)
MASKED_HELP = (
    "params contains optax.MaskedNode leaves: this transform runs inside "
    "optax.masked or optax.multi_transform, which hide the other parameters "
    "from it, so grad_fn cannot be evaluated at the parameters the loss "
    "needs. To keep parameters frozen, give the X-SAM optimizer only the "
    "trainable ones and close the loss over the frozen ones:\n"
    "  grad_fn = jax.grad(lambda t: loss({**t, **frozen}, batch))\n"
    "  updates, state = tx.update(grad_fn(trainable), state, trainable, "
    "grad_fn=grad_fn)\n"
    "(docs/guide.md, 'Composing with optax, Flax and Equinox')."
)


def check_int(name: str, value: Any, *, minimum: int,
              maximum: Optional[int] = None,
              maximum_name: Optional[str] = None) -> None:
  """Requires a Python int in ``[minimum, maximum]``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    hint = "" if not hasattr(value, "shape") else (
        f" {name} is static, so it cannot be an array; with "
        "optax.inject_hyperparams name it in static_args, e.g. "
        "static_args=('update_every', 'num_iters', 'seed') for "
        "eigenvector_correction and xsam.")
    raise ValueError(f"{name} must be an int, got {value!r}.{hint}")
  bound = "" if maximum is None else (
      f" and <= {maximum_name} ({maximum})" if maximum_name else
      f" and <= {maximum}")
  if value < minimum or (maximum is not None and value > maximum):
    raise ValueError(f"{name} must be >= {minimum}{bound}, got {value}.")


def check_float(name: str, value: Any, *, minimum: float,
                maximum: Optional[float] = None) -> None:
  """Requires a finite ``minimum <= value <= maximum`` for a plain number.

  NaN and infinities are rejected even without an upper bound: ``rho=inf``
  would put every SAM point at infinity.
  """
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}.")
  if not isinstance(value, numbers.Real):
    return  # An array or tracer, e.g. from optax.inject_hyperparams.
  allowed = (f"in [{minimum}, {maximum}]" if maximum is not None
             else f">= {minimum}")
  if not (math.isfinite(value) and minimum <= value
          and (maximum is None or value <= maximum)):
    raise ValueError(f"{name} must be a finite number {allowed}, got {value}.")


def finite_or_zero(value: Any) -> Any:
  """A float hyperparameter as it is used at run time: 0 where not finite.

  Plain numbers were checked eagerly (:func:`check_float`); an array, e.g.
  set through ``optax.inject_hyperparams`` while training, reaches the
  transform unchecked, and a NaN or infinite value would reach the updates.
  """
  if isinstance(value, numbers.Real):
    return value
  return jnp.where(jnp.isfinite(value), value, jnp.zeros_like(value))


def check_hyperparameter(name: str, value: Any, *, minimum: float,
                         maximum: Optional[float] = None) -> None:
  """:func:`check_float`, or nothing for a schedule (a callable of the step count)."""
  if callable(value):
    return
  check_float(name, value, minimum=minimum, maximum=maximum)


def value_at(value: Any, count: Optional[jax.Array]) -> Any:
  """A hyperparameter's value at step ``count`` (as it is used at run time).

  A schedule (a callable of the step count, as optax's learning rates) is
  called with ``count``; a value below 0 or not finite acts as 0. A plain
  number is returned as it is and an array is :func:`finite_or_zero`.
  """
  if not callable(value):
    return finite_or_zero(value)
  now = jnp.asarray(value(count))
  real = (jnp.issubdtype(now.dtype, jnp.floating)
          or jnp.issubdtype(now.dtype, jnp.integer))
  if now.shape != () or not real:
    raise ValueError(
        "a schedule (rho or alpha) must return a real scalar for a step "
        f"count, got shape {now.shape} and dtype {now.dtype}.")
  now = now.astype(jnp.result_type(jnp.float32, now))
  return jnp.where(jnp.isfinite(now) & (now > 0), now, jnp.zeros_like(now))


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str], *,
                 also: str = "") -> None:
  """Requires one of the names ``choices``; ``also`` names what else is accepted."""
  if not (isinstance(value, str) and value in choices):
    alternatives = f" {also}" if also else ""
    hint = "" if not hasattr(value, "shape") else (
        f" optax.inject_hyperparams calls every callable argument with the "
        f"step count, as a schedule: name a callable {name} in static_args, "
        f"e.g. static_args=({name!r},).")
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, choices))}{alternatives}, "
        f"got {value!r}.{hint}")


def check_axis_name(name: str, value: Any) -> None:
  if value is not None and not isinstance(value, (str, tuple)):
    raise ValueError(
        f"{name} must be None, an axis name (str) or a tuple of them, "
        f"got {value!r}.")


def _called_from_flax_train_state() -> bool:
  """Whether flax's ``TrainState.apply_gradients`` is on the call stack."""
  suffix = os.path.join("flax", "training", "train_state.py")
  frame = inspect.currentframe()
  while frame is not None:
    code = frame.f_code
    if code.co_name == "apply_gradients" and code.co_filename.endswith(suffix):
      return True
    frame = frame.f_back
  return False


def _has_masked_node(tree: Any) -> bool:
  masked_node = optax.MaskedNode
  return any(isinstance(x, masked_node) for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, masked_node)))


def require_grad_fn(grad_fn: Optional[Callable[[Any], Any]], params: Any, *,
                    owner: str) -> None:
  """Clear errors for the two arguments every X-SAM transform needs.

  A missing ``grad_fn`` names the wrapper that dropped it when that is
  flax's ``TrainState.apply_gradients`` (found on the call stack), and the
  usual suspects otherwise; ``params`` with ``optax.MaskedNode`` leaves say
  that the transform runs inside ``optax.masked``.
  """
  if grad_fn is None:
    if _called_from_flax_train_state():
      raise ValueError(f"{owner}.update needs grad_fn, and "
                       f"{TRAIN_STATE_HELP}")
    raise ValueError(
        f"{owner}.update needs grad_fn. {GRAD_FN_HELP}\n{WRAPPERS_HELP}")
  if not callable(grad_fn):
    raise ValueError(f"{owner}: grad_fn must be callable, got {grad_fn!r}.")
  if params is None:
    raise ValueError(
        f"{owner}.update needs params (the current parameters): "
        "tx.update(grads, state, params, grad_fn=grad_fn).")
  if _has_masked_node(params):
    raise ValueError(f"{owner}: {MASKED_HELP}")


def reject_complex(tree: Any, *, what: str, owner: str) -> None:
  """Raises a ``ValueError`` naming the first complex leaf of ``tree``.

  The transforms' inner products do not conjugate, so a complex parameter
  would give a complex cosine and eigenvalue and a wrong direction, with no
  error: it is refused instead, with the way around it.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    # Leaves without a dtype (Python numbers; optax.MaskedNode, reported
    # later with its own message) are complex only as Python complex.
    dtype = getattr(leaf, "dtype", np.complex128 if isinstance(
        leaf, complex) else None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.complexfloating):
      where = jax.tree_util.keystr(path)
      raise ValueError(
          f"{owner}: {what}{where} is {jnp.dtype(dtype).name}; X-SAM works "
          "on real parameters (its inner products, cosine and eigenvalue are "
          "those of a real vector space). Keep the real and imaginary parts "
          "as two real leaves and rebuild the complex value in the loss, e.g. "
          "params = {'re': w.real, 'im': w.imag} and "
          "w = p['re'] + 1j * p['im'] inside loss(p).")


def check_transformation(name: str, value: Any) -> None:
  """Requires an object with ``init`` and ``update``, e.g. ``optax.sgd(0.1)``."""
  if not (callable(getattr(value, "init", None))
          and callable(getattr(value, "update", None))):
    raise ValueError(
        f"{name} must be an optax.GradientTransformation, e.g. "
        f"optax.sgd(0.1) (not the factory optax.sgd), got {value!r}.")


def check_refresh(refresh: Any) -> Union[None, bool, jax.Array]:
  """``update``'s ``refresh``: None, a bool, or a boolean scalar array.

  Returns a Python bool for every value known on the host (NumPy bools and
  0-d boolean NumPy arrays included), so that the caller needs no
  ``lax.cond`` for them, and a JAX boolean scalar (maybe traced) unchanged.
  An int is rejected rather than read as a bool: ``refresh=step % 5`` is a
  common slip for ``refresh=step % 5 == 0``.
  """
  if refresh is None or isinstance(refresh, bool):
    return refresh
  if isinstance(refresh, np.bool_):
    return bool(refresh)
  if (isinstance(refresh, (np.ndarray, jax.Array))
      and refresh.shape == () and refresh.dtype == np.bool_):
    return bool(refresh) if isinstance(refresh, np.ndarray) else refresh
  raise ValueError(
      "refresh must be None (follow the schedule in the state), a Python "
      "bool (the host's choice: xsam_optax.refresh_schedule(tx)(step), or "
      "xsam_optax.refresh_due(step, update_every)) "
      f"or a boolean scalar array, got {refresh!r} "
      f"({type(refresh).__name__}).")
