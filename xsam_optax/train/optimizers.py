"""The optimizers the training protocol compares, built from the public API.

SGD with momentum and L2 weight decay is the base of every optimizer; SAM,
X-SAM and Eigen-SAM put their ascent (and X-SAM its correction) in front of
it. :func:`make_optimizer` returns the transform with what the training loop
must know to run it: the refresh period (for host-chosen refreshes) and what
the refreshes multiply by.

Example:
  >>> opt = make_optimizer("xsam", learning_rate=0.1, update_every=2,
  ...                      curvature="gauss-newton")
  >>> opt.refresh_every, opt.curvature
  (2, 'gauss-newton')
"""

from __future__ import annotations

from typing import NamedTuple

import optax

import xsam_optax

OPTIMIZERS = ("sgd", "sam", "xsam")
# Also accepted by `make_optimizer` (not by the CLI): Eigen-SAM's ascent in
# front of the same base.
EXTRA_OPTIMIZERS = ("eigensam",)

# What the eigenvector refreshes multiply by: the Hessian of the training
# loss (the transforms' default), or the Gauss-Newton matrix of the logits
# (positive semi-definite; the Hessian's curvature for a loss convex in the
# outputs, such as cross-entropy, without the second-order network terms), or
# one-gradient finite differences of the gradient (guarded against ReLU kinks).
CURVATURES = ("hessian", "gauss-newton", "finite-difference")

# What reaches the base optimizer, stated in the metrics config of each run.
GRADIENT_GIVEN = {
    "sgd": "raw mini-batch gradient g",
    "sam": "raw SAM gradient grad L(theta + rho g/||g||)",
    "xsam": "X-SAM corrected SAM gradient (unit norm when normalize=True)",
}


class Optimizer(NamedTuple):
  """What :func:`make_optimizer` builds: the transform and how to run it.

  Attributes:
    tx: the optax transform.
    refresh_every: the period of ``tx``'s eigenvector refreshes, so that the
      training loop can choose the refresh steps on the host
      (:func:`xsam_optax.refresh_due`); ``None`` when ``tx`` has none or
      refreshes on every step (no ``lax.cond`` then).
    curvature: what the refreshes multiply by, one of ``CURVATURES``; the
      training step builds the matching ``curvature_fn``.
    sam_groups: groups of the mini-batch perturbed each along its own
      gradient (:func:`xsam_optax.grouped_grad_fn`); 1 is the global
      perturbation. The training step builds the matching ``grad_fn``.
  """

  tx: optax.GradientTransformationExtraArgs
  refresh_every: int | None
  curvature: str = "hessian"
  sam_groups: int = 1


def make_optimizer(
    name: str,
    *,
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    rho: float = 0.05,
    alpha: float = 0.2,
    update_every: int = 2,
    num_iters: int = 1,
    method: str = "power",
    normalize: bool = True,
    rule: str = "reference",
    curvature: str = "hessian",
    seed: int = 0,
    sam_groups: int = 1,
) -> Optimizer:
  """SGD (momentum, weight decay, given schedule), alone or behind SAM, X-SAM or Eigen-SAM.

  ``name`` is one of ``OPTIMIZERS`` or ``EXTRA_OPTIMIZERS``. ``normalize`` and
  ``rule`` are X-SAM's (see :func:`xsam_optax.xsam`); ``"eigensam"`` chains
  :func:`xsam_optax.eigen_sam_ascent` (``rho``, ``alpha``, ``update_every``,
  ``num_iters``, ``method``, ``seed``) in front of the base optimizer.
  ``curvature="gauss-newton"`` makes the refreshes of X-SAM and Eigen-SAM
  multiply by the Gauss-Newton matrix of the logits instead of the Hessian:
  cheaper per product, positive semi-definite, and for a loss convex in the
  outputs the Hessian without its second-order network terms;
  ``"finite-difference"`` by one-gradient differences of the gradient
  (:func:`xsam_optax.finite_difference_fn`, from the step's own gradient),
  the cheapest product.
  ``sam_groups > 1`` perturbs each of that many equal groups of the
  mini-batch along its own gradient (m-sharpness, SAM as pods run it per
  device; see :func:`xsam_optax.grouped_grad_fn`). The returned
  :class:`Optimizer` carries the transform's period
  (:func:`xsam_optax.refresh_schedule`) as its ``refresh_every``, the one
  place the host's schedule comes from. The transforms validate their
  own settings.

  Example:
    >>> opt = make_optimizer("xsam", learning_rate=0.1, update_every=3)
    >>> isinstance(opt.tx, optax.GradientTransformationExtraArgs), opt.refresh_every
    (True, 3)
  """
  names = OPTIMIZERS + EXTRA_OPTIMIZERS
  if name not in names:
    raise ValueError(f"optimizer must be one of {names}, got {name!r}")
  if curvature not in CURVATURES:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
  if isinstance(sam_groups, bool) or not isinstance(sam_groups, int) or sam_groups < 1:
    raise ValueError(f"sam_groups must be an int >= 1, got {sam_groups!r}")
  base = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum),
  )
  tracking = dict(update_every=update_every, num_iters=num_iters, method=method,
                  seed=seed)
  if name == "sgd":
    return Optimizer(optax.with_extra_args_support(base), None)
  if name == "sam":
    return Optimizer(xsam_optax.sam(base, rho=rho), None, sam_groups=sam_groups)
  if name == "xsam":
    tx = xsam_optax.xsam(base, rho=rho, alpha=alpha, rule=rule, normalize=normalize,
                         **tracking)
    schedule = xsam_optax.refresh_schedule(tx)
  else:
    ascent = xsam_optax.eigen_sam_ascent(rho, alpha, **tracking)
    schedule = xsam_optax.refresh_schedule(ascent)
    tx = optax.chain(ascent, base)
  # The host's period is read from the transform, so the two cannot differ.
  # A refresh on every step leaves the host nothing to choose: one program,
  # no lax.cond either way.
  every = schedule.update_every
  return Optimizer(tx, every if every > 1 else None, curvature, sam_groups)
