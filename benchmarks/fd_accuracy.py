"""Finite-difference curvature products: accuracy against the exact product, and cost.

A refresh only needs products good enough to steer a warm-started
eigenvector, so what matters is how close ``(grad(theta + h v) - g) / h`` is
to the exact ``H v`` (``jax.jvp`` of ``jax.grad``) along the directions a
refresh multiplies: the current estimate of the top eigenvector (here: 20
exact power steps from a random start) and, for contrast, a random
direction. The products are the library's own
(``xsam_optax.finite_difference_fn``, the function users pass as
``curvature_fn``). Reported: the relative error ``||FD - Hv|| / ||Hv||`` and
``|cos(FD, Hv)|``, for step sizes ``h = scale * s0 * sqrt(eps) * max(1,
||theta||)`` over a range of ``scale`` (1 is the library's default step,
``s0`` = ``finite_difference_fn``'s default ``scale``), in float32 and in bfloat16 (parameters and
inputs cast; the exact product is then also computed in bfloat16 and both are
compared with the float32 one), at the start and at the end of a SAM run.

Cost: one training step of the CLI's protocol with an FD refresh
(``curvature_fn``), once with ``g`` handed in from the step's own gradient and
once recomputed as ``grad_fn(params)`` inside ``curvature_fn``: if XLA's
common-subexpression elimination merged the recomputed gradient with the
step's, both would compile to the same number of convolutions and time alike.

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

SCALES = (0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # x the library's default
# finite_difference_fn's default scale, read from its signature.
DEFAULT_SCALE = inspect.signature(
    xsam_optax.finite_difference_fn).parameters["scale"].default


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


def accuracy(problem, params, stats, x, y, seed, scales=SCALES):
  """Rows of (dtype, direction, scale, relative error, |cos|)."""
  grad_of = lambda p, s, xx: problem.grad_fn(s, xx, y)(p)
  exact = jax.jit(lambda p, s, xx, v: jax.jvp(
      lambda q: grad_of(q, s, xx), (p,), (v,))[1])
  fd = jax.jit(lambda p, s, xx, g, v, scale: xsam_optax.finite_difference_fn(
      lambda q: grad_of(q, s, xx), g, scale=scale * DEFAULT_SCALE)(p, v))
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
      for scale in scales:
        out = fd(p, s, xx, g, uu, jnp.asarray(scale, jnp.float32))
        rows.append((jnp.dtype(dtype).name, direction, scale,
                     _rel_err(out, reference), _abs_cos(out, reference)))
  return rows


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
  p.add_argument("--steps", type=int, default=100,
                 help="length of the SAM run whose start and end are measured")
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
  header = ("problem", "point", "dtype", "direction", "scale of h",
            "rel. error", "|cos|")
  table = []
  for name in args.problems:
    problem = _problems.load(name)
    traj = _trajectory.cached(problem, args.steps, 0, cache)
    rows = []
    points = (("end", args.steps - 1),) if args.smoke else (
        ("start", 0), ("end", args.steps - 1))
    for label, t in points:
      params, stats = traj.at(t)
      x, y = traj.batch(problem, t)
      for row in accuracy(problem, params, stats, x, y, seed=t,
                          scales=(1.0,) if args.smoke else SCALES):
        rows.append({"point": label, "step": t, "dtype": row[0],
                     "direction": row[1], "scale": row[2],
                     "relative_error": row[3], "abs_cos": row[4]})
        table.append((name, label) + row)
    params, stats = traj.at(args.steps - 1)
    x, y = traj.batch(problem, args.steps - 1)
    out[name] = {"accuracy": rows,
                 "cost": cost(problem, params, stats, x, y, args.rounds)}
  print(_common.format_table(header, table))
  for name, d in out.items():
    print(name, {k: (round(v["gradients"], 2), v["convolutions"])
                 for k, v in d["cost"].items()})
  if args.json:
    _common.write_json(args.json, {
        "benchmark": "fd_accuracy", "smoke": args.smoke,
        "command": _common.command("fd_accuracy", argv),
        "environment": env, "scales": SCALES,
        "step_size_rule": f"h = scale * {DEFAULT_SCALE} * sqrt(eps(dtype)) * "
                          "max(1, ||theta||)",
        "products": "xsam_optax.finite_difference_fn",
        "results": out})
  return 0


if __name__ == "__main__":
  sys.exit(main())
