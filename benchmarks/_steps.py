"""The training steps the cost benchmark compiles: ``xsam_optax.train.loop``'s own.

A :class:`Row` is one optimizer and, for X-SAM, one eigenvector schedule
(``_schedules.Schedule``) run on one of the two paths a user can take:

* ``"host"``: the host chooses, ``refresh=xsam_optax.refresh_due(step, k)``:
  two compiled steps (with and without the refresh), no ``lax.cond``;
* ``"none"``: ``refresh=None``, one compiled step that follows the schedule
  by itself, the path of ``nnx.Optimizer``, ``lax.scan`` loops and the
  docstring examples. On CPU the library computes the refresh at every step
  and keeps it on refresh steps only; elsewhere it runs it under
  ``lax.cond``;
* ``"cond"``: ``refresh=None`` with the refresh under ``lax.cond`` on CPU too
  (the library's program on other platforms, and on CPU before it chose the
  unconditional one), for comparison.

Every program is ``jax.jit(loop.make_train_step(...))`` with the state
donated (as a training loop would), lowered on a sample and compiled ahead of
time.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from xsam_optax import _tracking
from xsam_optax.train import loop, optimizers

import _schedules


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  optimizer: str  # "sgd" | "sam" | "xsam"
  schedule: Optional[_schedules.Schedule] = None
  path: str = "host"  # "host" | "none" | "cond"

  @property
  def period(self) -> int:
    return self.schedule.update_every if self.schedule else 1

  def programs(self) -> dict[str, tuple]:
    """``{role: program key}``: which compiled steps one period runs.

    Keys are shared between rows that compile to the same program: every
    host-chosen X-SAM row's step without refresh is the same.
    """
    if self.optimizer != "xsam":
      return {"step": (self.optimizer,)}
    s = self.schedule
    if s.update_every == 1:  # The refresh step, on every step.
      return {"step": ("xsam", s.program, True)}
    if self.path == "cond":
      return {"step": ("xsam", s, None, "cond")}
    if self.path == "none":
      return {"step": ("xsam", s, None)}
    return {"refresh": ("xsam", s.program, True),
            "plain": ("xsam", "plain", False)}


def optimizer(row: Row, learning_rate: float):
  """``optimizers.make_optimizer``'s transform for ``row``."""
  if row.optimizer != "xsam":
    opt = optimizers.make_optimizer(row.optimizer, learning_rate=learning_rate)
  else:
    s = row.schedule
    opt = optimizers.make_optimizer("xsam", learning_rate=learning_rate,
                                    update_every=s.update_every,
                                    num_iters=s.num_iters, method=s.method)
  return opt.tx


def lower(model, row: Row, key: tuple, state, x, y, learning_rate: float):
  """The lowered program ``key`` of ``row`` (see :meth:`Row.programs`)."""
  tx = optimizer(row, learning_rate)
  curvature = ("hessian" if row.schedule is None
               else _schedules.curvature(model, row.schedule))
  step = jax.jit(loop.make_train_step(model, tx, curvature=curvature),
                 static_argnames="refresh", donate_argnums=0)
  refresh = key[2] if row.optimizer == "xsam" else None
  with (refresh_under_cond() if key[-1] == "cond" else contextlib.nullcontext()):
    return step.lower(state, x, y, refresh=refresh)


@contextlib.contextmanager
def refresh_under_cond():
  """Traced refreshes under ``lax.cond`` on every platform while tracing."""
  saved = _tracking._EVERY_STEP_PLATFORMS
  _tracking._EVERY_STEP_PLATFORMS = ()
  try:
    yield
  finally:
    _tracking._EVERY_STEP_PLATFORMS = saved


def init_state(model, row: Row, x, *, seed: int, learning_rate: float,
               variables) -> loop.TrainState:
  return loop.init_state(model, optimizer(row, learning_rate), x, seed=seed,
                         variables=variables)


def period_runner(row: Row, exe: dict[tuple, Any], state, batches,
                  periods: int = 1):
  """A zero-argument callable running ``periods`` refresh periods of ``row``'s steps.

  Carries the state from call to call (it is donated), so the eigenvector
  refreshes from its previous value as in training; host-chosen rows refresh
  on the first step of the period and run the plain step after.
  """
  roles = row.programs()
  carry = {"state": jax.tree.map(jnp.copy, state), "i": 0}

  def run():
    s, i = carry["state"], carry["i"]
    for j in range(row.period * periods):
      x, y = batches[(i + j) % len(batches)]
      role = ("step" if "step" in roles else
              ("refresh" if j % row.period == 0 else "plain"))
      s, metrics = exe[roles[role]](s, x, y)
    carry["state"], carry["i"] = s, i + row.period * periods
    return metrics["loss"]

  return run


def gradient_fn(model):
  """``value_and_grad`` of the training-mode loss: the unit of cost."""
  loss_fn = loop.make_train_loss(model)
  return jax.jit(lambda p, s, x, y: jax.value_and_grad(
      loss_fn, has_aux=True)(p, s, x, y))


def hvp_fn(model):
  """One exact Hessian-vector product on the batch (jvp of grad)."""
  return jax.jit(lambda p, s, x, y, v: jax.jvp(
      loop.make_grad_fn(model, s, x, y), (p,), (v,))[1])


def gauss_newton_product_fn(model):
  """One Gauss-Newton product on the batch (``loop.make_gauss_newton_fn``)."""
  return jax.jit(lambda p, s, x, y, v: loop.make_gauss_newton_fn(
      model, s, x, y)(p, v))


def flops(compiled) -> Optional[float]:
  """XLA's FLOP count of a compiled program (``cost_analysis()["flops"]``).

  A ``lax.cond`` program's count includes every branch, so it is read only
  from programs without one.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def memory_breakdown(compiled) -> Optional[dict[str, int]]:
  """XLA's ``memory_analysis()`` fields, in bytes."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
          ("argument", "output", "alias", "temp", "generated_code")}


def xla_bytes(compiled) -> Optional[int]:
  """XLA's accounting of a compiled program: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


def param_bytes(params) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(params)))

