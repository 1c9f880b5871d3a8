"""X-SAM for JAX: sharpness-aware minimisation with eigenvector correction.

Composable pieces (:func:`sam_ascent`, :func:`eigenvector_correction`,
Eigen-SAM's :func:`eigen_sam_ascent`), the estimators they accept as
``method`` (:func:`power_iteration`, :func:`lanczos`, or any callable
``(matvec, v0) -> EigenResult``), the curvature products a refresh
multiplies by (:func:`hvp`; :func:`hessian_fn` and :func:`gauss_newton_fn`
for ``curvature_fn``; :func:`finite_difference_fn`, one gradient per
product), a micro-batch gradient (:func:`accumulated_grad_fn`), per-group
perturbations, m-sharpness (:func:`grouped_grad_fn`), the state
both eigen-tracking transforms keep (:class:`EigenvectorState`),
the host's copy of a transform's refresh schedule (:func:`refresh_schedule`,
:func:`refresh_due`) and two
conveniences built only by chaining (:func:`sam`, :func:`xsam`).
"""

import importlib
import typing

# The public names, from the private modules that define them. They are
# imported on first use (PEP 562), so that `import xsam_optax.train.cli` (the
# xsam-train command) can parse its flags, print --help and reject bad flags
# before anything imports JAX.
_EXPORTS = {
    "accumulated_grad_fn": "xsam_optax._accumulate",
    "sam": "xsam_optax._alias",
    "xsam": "xsam_optax._alias",
    "eigenvector_correction": "xsam_optax._correction",
    "eigen_sam_ascent": "xsam_optax._eigen_sam",
    "EigenResult": "xsam_optax._estimators",
    "lanczos": "xsam_optax._estimators",
    "power_iteration": "xsam_optax._estimators",
    "finite_difference_fn": "xsam_optax._finite_difference",
    "gauss_newton_fn": "xsam_optax._gauss_newton",
    "grouped_grad_fn": "xsam_optax._groups",
    "hessian_fn": "xsam_optax._hvp",
    "hvp": "xsam_optax._hvp",
    "sam_ascent": "xsam_optax._sam",
    "EigenvectorState": "xsam_optax._tracking",
    "RefreshSchedule": "xsam_optax._tracking",
    "refresh_due": "xsam_optax._tracking",
    "refresh_schedule": "xsam_optax._tracking",
}

if typing.TYPE_CHECKING:  # What the names are, for type checkers and readers.
  from xsam_optax._accumulate import accumulated_grad_fn
  from xsam_optax._alias import sam
  from xsam_optax._alias import xsam
  from xsam_optax._correction import eigenvector_correction
  from xsam_optax._eigen_sam import eigen_sam_ascent
  from xsam_optax._estimators import EigenResult
  from xsam_optax._estimators import lanczos
  from xsam_optax._estimators import power_iteration
  from xsam_optax._finite_difference import finite_difference_fn
  from xsam_optax._gauss_newton import gauss_newton_fn
  from xsam_optax._groups import grouped_grad_fn
  from xsam_optax._hvp import hessian_fn
  from xsam_optax._hvp import hvp
  from xsam_optax._sam import sam_ascent
  from xsam_optax._tracking import EigenvectorState
  from xsam_optax._tracking import RefreshSchedule
  from xsam_optax._tracking import refresh_due
  from xsam_optax._tracking import refresh_schedule


def __getattr__(name: str):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # Later lookups skip __getattr__.
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.2.0"

__all__ = (
    "EigenResult",
    "EigenvectorState",
    "RefreshSchedule",
    "accumulated_grad_fn",
    "eigen_sam_ascent",
    "eigenvector_correction",
    "finite_difference_fn",
    "gauss_newton_fn",
    "grouped_grad_fn",
    "hessian_fn",
    "hvp",
    "lanczos",
    "power_iteration",
    "refresh_due",
    "refresh_schedule",
    "sam",
    "sam_ascent",
    "xsam",
)
