"""Eager checks of static settings, with errors that name the argument.

Floats are checked only when they are plain Python numbers, so that
``optax.inject_hyperparams`` (which passes arrays) keeps working.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any, Optional

GRAD_FN_HELP = (
    "Pass the gradient of the training loss on the current mini-batch as a "
    "keyword argument, e.g.\n"
    "  grad_fn = jax.grad(lambda p: loss(p, batch))\n"
    "  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)"
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
  """Requires ``minimum <= value <= maximum`` when ``value`` is a number."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number, got {value!r}.")
  if not isinstance(value, numbers.Real):
    return  # An array or tracer, e.g. from optax.inject_hyperparams.
  allowed = (f"in [{minimum}, {maximum}]" if maximum is not None
             else f">= {minimum}")
  if not (minimum <= value and (maximum is None or value <= maximum)):
    raise ValueError(f"{name} must be {allowed}, got {value}.")


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(
        f"{name} must be one of {', '.join(map(repr, choices))}, "
        f"got {value!r}.")


def check_axis_name(name: str, value: Any) -> None:
  if value is not None and not isinstance(value, (str, tuple)):
    raise ValueError(
        f"{name} must be None, an axis name (str) or a tuple of them, "
        f"got {value!r}.")


def require_grad_fn(grad_fn: Optional[Callable[[Any], Any]], params: Any, *,
                    owner: str) -> None:
  """Clear errors for the two arguments every X-SAM transform needs."""
  if grad_fn is None:
    raise ValueError(f"{owner}.update needs grad_fn. {GRAD_FN_HELP}")
  if not callable(grad_fn):
    raise ValueError(f"{owner}: grad_fn must be callable, got {grad_fn!r}.")
  if params is None:
    raise ValueError(
        f"{owner}.update needs params (the current parameters): "
        "tx.update(grads, state, params, grad_fn=grad_fn).")
