"""Memory of one eigenvector refresh, from XLA's accounting of the compiled program.

Why this score: a refresh's extra memory is what decides whether X-SAM fits
next to SAM on a large model; it is dominated by copies of the parameters
(the estimator's vectors: for Lanczos its basis) and by the products'
tangent activations. This compiles ``eigenvector_correction``'s refresh
(``update(..., refresh=True)``) on an MLP with about a million parameters
(dense layers: compiles in seconds, and parameter copies dominate) for each
estimator, and reports XLA's ``memory_analysis()`` (arguments + outputs +
temporaries - aliased) minus the same program without a refresh, in units of
the parameters' size. Running it against another checkout of the library
(``PYTHONPATH=...``) compares implementations.

Usage, from the repository root::

  python benchmarks/refresh_memory.py --json benchmarks/results/refresh-memory-cpu2.json
  python benchmarks/refresh_memory.py --smoke   # width 16, batch 4, 2 estimators
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import optax

import xsam_optax

import _common

ESTIMATORS = (("power", 1), ("power", 2), ("power", 5), ("lanczos", 2),
              ("lanczos", 4), ("lanczos", 8))
# Lanczos 4 in its other forms: the basis' share of the memory.
VARIANTS = {
    "lanczos 4, no reorthogonalisation": functools.partial(
        xsam_optax.lanczos, num_iters=4, reorthogonalize=False),
    "lanczos 4, rolled (unroll=False)": functools.partial(
        xsam_optax.lanczos, num_iters=4, unroll=False),
}


def problem(width: int, batch: int):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"w1": jax.random.normal(k1, (width, width)) / width ** 0.5,
            "w2": jax.random.normal(k2, (width, 10)) / width ** 0.5}
  x = jax.random.normal(k3, (batch, width))
  y = jax.random.randint(k4, (batch,), 0, 10)

  def loss(p):
    logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, jax.grad(loss)


def refresh_bytes(params, grad_fn, method, num_iters, refresh):
  named = {"num_iters": num_iters} if isinstance(method, str) else {}
  tx = xsam_optax.eigenvector_correction(method=method, **named)

  def step(params, state):
    return tx.update(grad_fn(params), state, params, grad_fn=grad_fn,
                     refresh=refresh)

  m = jax.jit(step).lower(params, tx.init(params)).compile().memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes
          + m.temp_size_in_bytes - m.alias_size_in_bytes)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--width", type=int, default=1000)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--smoke", action="store_true",
                 help="width 16, batch 4, two of the estimators: checks the "
                      "script end to end")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.smoke:  # Over the command's sizes.
    args.width, args.batch = 16, 4
  params, grad_fn = problem(args.width, args.batch)
  size = sum(a.nbytes for a in jax.tree.leaves(params))
  plain = refresh_bytes(params, grad_fn, "power", 1, False)
  rows, out = [], {}
  runs = [(f"{m} {n}", m, n) for m, n in ESTIMATORS]
  runs += [(name, method, None) for name, method in VARIANTS.items()]
  if args.smoke:  # A named estimator and a callable one.
    runs = [runs[0], runs[-1]]
  for name, method, n in runs:
    extra = (refresh_bytes(params, grad_fn, method, n, True) - plain) / size
    rows.append((name, extra))
    out[name] = extra
  print(_common.format_table(("refresh", "memory - no refresh, x params"), rows))
  if args.json:
    _common.write_json(args.json, {
        "benchmark": "refresh_memory", "smoke": args.smoke,
        "command": _common.command("refresh_memory", argv),
        "environment": _common.environment(),
        "config": {"width": args.width, "batch": args.batch,
                   "param_bytes": int(size)},
        "results": out})
  return 0


if __name__ == "__main__":
  sys.exit(main())
