"""Eigenvector schedules and how one is streamed over a fixed trajectory.

A :class:`Schedule` is everything that decides the vector X-SAM's correction
uses: the estimator (``method``), products per refresh (``num_iters``), the
refresh period (``update_every``), which batch the products see (the leading
``fraction`` of the step's mini-batch) and what a product is (``"hvp"``: the
exact forward-over-reverse Hessian-vector product; ``"gn"``: a Gauss-Newton
product of the training-mode logits, ``xsam_optax.gauss_newton_fn`` through
``loop.make_gauss_newton_fn``; ``"fd"``: a one-gradient finite difference,
``xsam_optax.finite_difference_fn`` with the step's own gradient, guarded by
its default ``max_growth`` unless ``max_growth`` says otherwise). All of it
reaches the library through its public API: ``eigenvector_correction(method=,
num_iters=)`` and ``update(..., refresh=True, curvature_fn=...)``, so the
vectors scored are exactly the ones the library's correction would use.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np

import xsam_optax
from xsam_optax.train import loop

import _problems

PRODUCTS = {"hvp": "", "gn": ", Gauss-Newton", "fd": ", finite differences"}
# finite_difference_fn's default guard, read from its signature.
FD_MAX_GROWTH = inspect.signature(
    xsam_optax.finite_difference_fn).parameters["max_growth"].default


@dataclasses.dataclass(frozen=True)
class Schedule:
  method: str  # "power" | "lanczos"
  num_iters: int
  update_every: int
  fraction: float = 1.0
  product: str = "hvp"  # "hvp" | "gn" | "fd"
  # The finite-difference products' guard (finite_difference_fn's
  # max_growth; None: unguarded); ignored by the other products.
  max_growth: float | None = FD_MAX_GROWTH

  @property
  def name(self) -> str:
    out = f"{self.method} {self.num_iters} every {self.update_every}"
    if self.fraction < 1:
      out += f", 1/{round(1 / self.fraction)} batch"
    out += PRODUCTS[self.product]
    if self.product == "fd" and self.max_growth != FD_MAX_GROWTH:
      out += (", no guard" if self.max_growth is None
              else f", growth <= {self.max_growth:g}")
    return out

  @property
  def products_per_step(self) -> float:
    """Products per step, in full-batch products."""
    return self.num_iters * self.fraction / self.update_every

  @property
  def program(self) -> tuple:
    """What a refresh step compiles to (the period plays no part in it)."""
    return (self.method, self.num_iters, self.fraction, self.product,
            self.max_growth if self.product == "fd" else None)


REFERENCE = Schedule("power", 5, 5)  # the paper's code
OLD_DEFAULTS = Schedule("lanczos", 4, 5)  # the library's before issue 15


def sweep() -> list[Schedule]:
  """The settings compared: cheap schedules around the reference's budget, and controls.

  Sized for a 2-core machine (each distinct refresh program compiles once per
  problem): power with 1 product on the whole, half or a quarter of the batch
  every 1, 2, 3 or 5 steps; power 2 on the whole or half batch; Lanczos 2 and
  4; one-gradient finite-difference products (power 1 and 2; power 1 every
  1, 2, 3 steps also unguarded and with a looser guard); the reference
  (power 5 every 5), the old defaults (Lanczos 4 every 5) and power 10 every
  5, to see whether converging harder on one batch helps; and every
  whole-batch Hessian schedule with Gauss-Newton products.
  """
  out = []
  for k in (1, 2, 3, 5):
    for f in (1.0, 0.5, 0.25):
      out.append(Schedule("power", 1, k, f))
    out.append(Schedule("power", 1, k, product="fd"))
    if k <= 3:
      # The guard's share: none, and a looser bound.
      out += [Schedule("power", 1, k, product="fd", max_growth=None),
              Schedule("power", 1, k, product="fd", max_growth=8.0)]
  for k in (2, 3, 5):
    out += [Schedule("power", 2, k), Schedule("power", 2, k, 0.5),
            Schedule("power", 2, k, product="fd"), Schedule("lanczos", 2, k),
            Schedule("lanczos", 4, k, 0.5)]
  out += [Schedule("power", 2, 1, 0.5), Schedule("lanczos", 4, 2, 0.5),
          REFERENCE, OLD_DEFAULTS, Schedule("power", 10, 5)]
  # Every whole-batch Hessian schedule again with Gauss-Newton products.
  out += [dataclasses.replace(s, product="gn") for s in out
          if s.product == "hvp" and s.fraction == 1.0]
  return list(dict.fromkeys(out))


def curvature(model, schedule: Schedule):
  """What ``loop.make_train_step(curvature=...)`` needs for ``schedule``'s products.

  ``"hessian"`` for exact products on the whole batch (the library's own
  ``hvp`` of ``grad_fn``), ``"gauss-newton"`` for Gauss-Newton products on
  the whole batch (``loop.make_gauss_newton_fn``); otherwise
  ``(batch_stats, x, y, grads) -> curvature_fn``: exact products on the
  leading sub-batch, or finite differences from the step's clean gradient
  ``grads``.
  """
  if schedule.fraction >= 1 and schedule.product == "hvp":
    return "hessian"
  if schedule.product == "gn":
    if schedule.fraction < 1:
      raise ValueError("Gauss-Newton schedules use the whole batch")
    return "gauss-newton"

  def make(batch_stats, x, y, grads):
    if schedule.product == "fd":
      return xsam_optax.finite_difference_fn(
          loop.make_grad_fn(model, batch_stats, x, y), grads,
          max_growth=schedule.max_growth)
    sub = loop.make_grad_fn(model, batch_stats,
                            *_problems.sub_batch(x, y, schedule.fraction))
    return lambda p, v: xsam_optax.hvp(sub, p, v)

  return make


def make_refresh(problem: _problems.Problem, program: tuple):
  """Jitted ``(opt_state, params, stats, x, y, grads) -> opt_state``: one refresh."""
  method, num_iters, fraction, product, max_growth = program
  tx = xsam_optax.eigenvector_correction(method=method, num_iters=num_iters)
  make = curvature(problem.model, Schedule(method, num_iters, 1, fraction,
                                           product, max_growth))

  def refresh(opt_state, params, stats, x, y, grads):
    if make == "hessian":
      extra = {}
    elif make == "gauss-newton":
      extra = {"curvature_fn": loop.make_gauss_newton_fn(
          problem.model, stats, x, y)}
    else:
      extra = {"curvature_fn": make(stats, x, y, grads)}
    _, opt_state = tx.update(grads, opt_state, params,
                             grad_fn=problem.grad_fn(stats, x, y),
                             refresh=True, **extra)
    return opt_state

  return jax.jit(refresh)


def programs_for(problem, schedules) -> dict:
  """``{program: refresh}`` for every distinct refresh program of ``schedules``."""
  out = {}
  for s in schedules:
    if s.program not in out:
      out[s.program] = make_refresh(problem, s.program)
  return out


def stream(problem, trajectory, schedules, score_steps, *, seed: int,
           programs: dict):
  """Each schedule's vector at each of ``score_steps`` (ravelled, float32).

  At every step of the trajectory, each schedule due to refresh
  (``step % update_every == 0``, as ``refresh_due``) refreshes from its own
  previous vector at the trajectory's parameters and batch; all start from
  the same random vector (``seed``). The vector scored at step ``t`` is the
  one the correction of step ``t`` would use (after that step's refresh).

  Returns ``{schedule: array (len(score_steps), n)}``.
  """
  from jax.flatten_util import ravel_pytree

  params, _ = trajectory.at(0)
  init = jax.jit(xsam_optax.eigenvector_correction(seed=seed).init)(params)
  states = {s: init for s in schedules}
  flat = jax.jit(lambda st: ravel_pytree(st.eigenvector)[0])
  grad = jax.jit(lambda p, st, x, y: problem.grad_fn(st, x, y)(p))
  score = {int(t): i for i, t in enumerate(score_steps)}
  out = {s: [] for s in schedules}
  for t in range(max(score_steps) + 1):
    params, stats = trajectory.at(t)
    x, y = trajectory.batch(problem, t)
    due = [s for s in schedules if t % s.update_every == 0]
    grads = grad(params, stats, x, y) if due else None
    for s in due:
      states[s] = programs[s.program](states[s], params, stats, x, y, grads)
    if t in score:
      for s in schedules:
        out[s].append(flat(states[s]))
  return {s: np.asarray(jnp.stack(v)) for s, v in out.items()}
