"""Finite-difference curvature products: accuracy against the exact product, and cost.

A refresh only needs products good enough to steer a warm-started
eigenvector, so what matters is how close ``(grad(theta + h v) - g) / h`` is
to the exact ``H v`` (``jax.jvp`` of ``jax.grad``) along the directions a
refresh multiplies. Two measurements, both with the library's own products
(``xsam_optax.finite_difference_fn``, the function users pass as
``curvature_fn``):

* **Sweep of the step.** Along the top eigenvector at that point (20 exact
  power steps from a random start) and, for contrast, a random direction:
  the relative error ``||FD - Hv|| / ||Hv||`` and ``|cos(FD, Hv)|`` for
  relative steps ``h / max(1, ||theta||)`` from 1e-8 to 1e-2, at the start,
  the middle and the end of a SAM run, in float32 and in bfloat16
  (parameters and inputs cast; the exact product is then also computed in
  bfloat16, and both are compared with the float32 one). The library's
  default is the row ``default``.
* **Along tracking.** The products a refresh actually multiplies: the
  default schedule of the cheap path (one guarded finite-difference power
  step every 2 steps, ``eigenvector_correction(...).update(...,
  curvature_fn=finite_difference_fn(...))``) streamed over the same run; at
  each refresh, the error of its product against the exact product of the
  same vector, and whether the refresh's guard (``max_growth``) rejected it.
  A product that crossed a ReLU kink has an error orders of magnitude above
  the rest; reported: how many there were, how many the guard rejected, and
  the largest error of an accepted product.

Cost (``--cost``): one training step of the CLI's protocol with an FD refresh
(``curvature_fn``), once with ``g`` handed in from the step's own gradient and
once recomputed as ``grad_fn(params)`` inside ``curvature_fn``: if XLA's
common-subexpression elimination merged the recomputed gradient with the
step's, both would compile to the same number of convolutions and time alike.
XLA's FLOP counts of the same steps are ``step_overhead.py``'s.

Usage, from the repository root::

  python benchmarks/fd_accuracy.py --json benchmarks/results/fd-accuracy-cpu2.json
  python benchmarks/fd_accuracy.py --smoke   # seconds: the first problem, 3 steps
"""

from __future__ import annotations

import argparse
import functools
import inspect
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_optax
from xsam_optax.train import loop

import _common
import _problems
import _trajectory

# Relative steps h / max(1, ||theta||) swept.
RELATIVE_STEPS = (1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
# finite_difference_fn's defaults, read from its signature.
_DEFAULTS = inspect.signature(xsam_optax.finite_difference_fn).parameters
DEFAULT_SCALE = _DEFAULTS["scale"].default
DEFAULT_MAX_GROWTH = _DEFAULTS["max_growth"].default
TRACKING_EVERY = 2  # the tracked schedule: power 1 every 2, guarded FD


def scale_of(relative_step: float, dtype) -> float:
  """``finite_difference_fn``'s ``scale`` for a relative step in ``dtype``."""
  return relative_step / float(jnp.finfo(dtype).eps) ** 0.5


def _cast(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype), tree)


def _rel_err(a, b):
  diff = optax.tree.norm(jax.tree.map(lambda u, w: u.astype(jnp.float32)
                                      - w.astype(jnp.float32), a, b))
  return float(diff / optax.tree.norm(_cast(b, jnp.float32)))


def _abs_cos(a, b):
  a, b = _cast(a, jnp.float32), _cast(b, jnp.float32)
  return float(abs(optax.tree.vdot(a, b))
               / (optax.tree.norm(a) * optax.tree.norm(b)))


def accuracy(problem, params, stats, x, y, seed, relative_steps=RELATIVE_STEPS):
  """Rows of (dtype, direction, scale, relative error, |cos|)."""
  grad_of = lambda p, s, xx: problem.grad_fn(s, xx, y)(p)
  exact = jax.jit(lambda p, s, xx, v: jax.jvp(
      lambda q: grad_of(q, s, xx), (p,), (v,))[1])
  fd = jax.jit(lambda p, s, xx, g, v, scale: xsam_optax.finite_difference_fn(
      lambda q: grad_of(q, s, xx), g, scale=scale)(p, v))
  grad = jax.jit(grad_of)
  v = xsam_optax.power_iteration(
      lambda u: exact(params, stats, x, u),
      jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(seed)
                                         .standard_normal(a.shape), a.dtype),
                   params), num_iters=20).eigenvector
  random = jax.tree.map(lambda a: jnp.asarray(
      np.random.default_rng(seed + 1).standard_normal(a.shape), a.dtype),
                        params)
  random = jax.tree.map(lambda a: a / optax.tree.norm(random), random)
  rows = []
  for direction, u in (("top eigenvector", v), ("random", random)):
    reference = exact(params, stats, x, u)
    for dtype in (jnp.float32, jnp.bfloat16):
      p, s, xx, uu = (_cast(params, dtype), _cast(stats, dtype),
                      x.astype(dtype), _cast(u, dtype))
      g = grad(p, s, xx)
      if dtype != jnp.float32:
        rows.append((jnp.dtype(dtype).name, direction, "exact jvp",
                     _rel_err(exact(p, s, xx, uu), reference),
                     _abs_cos(exact(p, s, xx, uu), reference)))
      steps = [(h, scale_of(h, dtype)) for h in relative_steps]
      steps.append(("default", DEFAULT_SCALE))
      for label, scale in steps:
        out = fd(p, s, xx, g, uu, jnp.asarray(scale, jnp.float32))
        rows.append((jnp.dtype(dtype).name, direction, label,
                     _rel_err(out, reference), _abs_cos(out, reference)))
  return rows


def tracking(problem, traj, seed):
  """Per refresh of guarded FD power 1 every ``TRACKING_EVERY``: error, rejected."""
  tx = xsam_optax.eigenvector_correction(update_every=1, seed=seed)
  grad_of = lambda p, s, x, y: problem.grad_fn(s, x, y)(p)

  @jax.jit
  def refresh(state, params, stats, x, y):
    grad_fn = problem.grad_fn(stats, x, y)
    g = grad_fn(params)
    fd = xsam_optax.finite_difference_fn(grad_fn, g)
    u = state.eigenvector
    err = _tree_rel_err(fd(params, u), jax.jvp(
        lambda q: grad_of(q, stats, x, y), (params,), (u,))[1])
    _, new = tx.update(g, state, params, grad_fn=grad_fn, refresh=True,
                       curvature_fn=fd)
    return new, err

  params, _ = traj.at(0)
  state = jax.jit(tx.init)(params)
  out = []
  for t in range(0, traj.steps, TRACKING_EVERY):
    params, stats = traj.at(t)
    x, y = traj.batch(problem, t)
    known = float(state.residual) >= 0
    state, err = refresh(state, params, stats, x, y)
    out.append({"step": t, "relative_error": float(err),
                "rejected": known and float(state.residual) < 0})
  return {"refreshes": out, "summary": tracking_summary(out)}


# A product this far off crossed a kink: the rest, the first product (from
# a random vector, whose shift float32 rounds coarsely) included, stay
# below 1.2 on every problem measured, crossings above 10.
CROSSED = 3.0


def tracking_summary(refreshes: list) -> dict:
  """Counts and error quantiles of :func:`tracking`'s refreshes."""
  errors = np.array([r["relative_error"] for r in refreshes])
  rejected = np.array([r["rejected"] for r in refreshes])
  crossed = errors > CROSSED
  later = np.arange(len(errors)) > 0
  largest = lambda a: float(a.max()) if a.size else None  # None: every one rejected
  return {
      "refreshes": len(refreshes), "median_error": float(np.median(errors)),
      "p90_error": float(np.quantile(errors, 0.9)),
      "crossed": int(crossed.sum()),
      "crossed_rejected": int((crossed & rejected).sum()),
      "rejected": int(rejected.sum()),
      "max_accepted_error": largest(errors[~rejected]),
      "max_accepted_error_after_first": largest(errors[~rejected & later])}


def _tree_rel_err(a, b):
  """``_rel_err`` inside jit (float32)."""
  diff = optax.tree.norm(jax.tree.map(lambda u, w: u.astype(jnp.float32)
                                      - w.astype(jnp.float32), a, b))
  return diff / optax.tree.norm(_cast(b, jnp.float32))


def cost(problem, params, stats, x, y, rounds):
  """Step times and convolution counts: g handed in vs recomputed."""
  tx = xsam_optax.xsam(optax.sgd(0.05), update_every=1, num_iters=1,
                       method="power")
  loss_fn = loop.make_train_loss(problem.model)

  def step(params, opt_state, x, y, recompute):
    (_, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats, x, y)
    grad_fn = problem.grad_fn(stats, x, y)
    g = grad_fn(params) if recompute else grads
    curvature = (None if recompute is None else
                 xsam_optax.finite_difference_fn(grad_fn, g))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn,
                                   refresh=True, curvature_fn=curvature)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  variants = {"fd, g from the step": False, "fd, g recomputed": True,
              "exact hvp (jvp of grad)": None}
  compiled, convs = {}, {}
  for name, recompute in variants.items():
    compiled[name] = jax.jit(functools.partial(step, recompute=recompute)
                             ).lower(params, opt_state, x, y).compile()
    convs[name] = len(re.findall(r"convolution\(", compiled[name].as_text()))
  grad_exe = jax.jit(lambda p: jax.grad(lambda q: loss_fn(q, stats, x, y)[0])(p)
                     ).lower(params).compile()
  timings = _common.time_interleaved(
      {**{k: functools.partial(c, params, opt_state, x, y)
          for k, c in compiled.items()},
       "gradient": functools.partial(grad_exe, params)}, rounds=rounds)
  grad_ms = timings["gradient"]["median_ms"]
  return {name: {"ms": timings[name]["median_ms"],
                 "gradients": timings[name]["median_ms"] / grad_ms,
                 "convolutions": convs.get(name)}
          for name in timings}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--problems", nargs="+", default=list(_problems.PROBLEMS))
  p.add_argument("--steps", type=int, default=140,
                 help="length of the SAM run whose start, middle and end are "
                      "measured (140: the quality benchmark's, sharing its "
                      "cached trajectories)")
  p.add_argument("--cost", action="store_true",
                 help="also time one step with each kind of product")
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--cache", default=None)
  p.add_argument("--smoke", action="store_true",
                 help="the first problem, a 3-step run, its end only, the "
                      "default step only, 1 round, a temporary cache: checks "
                      "the script end to end")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.smoke:  # Over the command's sizes.
    args.problems, args.steps, args.rounds = args.problems[:1], 3, 1
    args.cache = _common.smoke_dir()
  cache = args.cache or _common.cache_dir()
  env = _common.environment()
  out = {}
  header = ("problem", "point", "dtype", "direction", "h / max(1, |theta|)",
            "rel. error", "|cos|")
  table = []
  for name in args.problems:
    problem = _problems.load(name)
    traj = _trajectory.cached(problem, args.steps, 0, cache)
    rows = []
    points = (("end", args.steps - 1),) if args.smoke else (
        ("start", 0), ("middle", args.steps // 2), ("end", args.steps - 1))
    for label, t in points:
      params, stats = traj.at(t)
      x, y = traj.batch(problem, t)
      for row in accuracy(problem, params, stats, x, y, seed=t,
                          relative_steps=() if args.smoke else RELATIVE_STEPS):
        rows.append({"point": label, "step": t, "dtype": row[0],
                     "direction": row[1], "scale": row[2],
                     "relative_error": row[3], "abs_cos": row[4]})
        table.append((name, label) + row)
    out[name] = {"accuracy": rows, "tracking": tracking(problem, traj, 0)}
    if args.cost:
      params, stats = traj.at(args.steps - 1)
      x, y = traj.batch(problem, args.steps - 1)
      out[name]["cost"] = cost(problem, params, stats, x, y, args.rounds)
  print(_common.format_table(header, table))
  for name, d in out.items():
    print(name, "along tracking:", d["tracking"]["summary"])
    if "cost" in d:
      print(name, {k: (round(v["gradients"], 2), v["convolutions"])
                   for k, v in d["cost"].items()})
  if args.json:
    _common.write_json(args.json, {
        "benchmark": "fd_accuracy", "smoke": args.smoke,
        "command": _common.command("fd_accuracy", argv),
        "environment": env, "relative_steps": RELATIVE_STEPS,
        "step_size_rule": f"h = scale * sqrt(eps(dtype)) * max(1, ||theta||),"
                          f" default scale {DEFAULT_SCALE}",
        "default_max_growth": DEFAULT_MAX_GROWTH, "crossed": CROSSED,
        "tracking": f"power 1 every {TRACKING_EVERY}, guarded finite "
                    "differences, seed 0",
        "products": "xsam_optax.finite_difference_fn",
        "results": out})
  return 0


if __name__ == "__main__":
  sys.exit(main())
