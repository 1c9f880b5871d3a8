"""Cost of the estimators, in gradients, and of the loop constructs around them.

Prints, side by side in one process, on the training CLI's small conv net
(3 Conv+BatchNorm blocks, training-mode BatchNorm, MNIST-1D-shaped synthetic
batch): the time of one gradient, of one Hessian-vector product (HVP), and of
one estimator call with 5 matvecs, for power iteration and Lanczos, each with
its loop unrolled and rolled (``unroll=True/False``; rolled is a
``lax.fori_loop`` with a static trip count, i.e. a ``scan``), and inside
``lax.cond`` (as the transform's default schedule runs a refresh); also one
HVP inside ``lax.cond``, and 5 power steps (alone, and after a gradient) with
and without sharing one linearisation (``jax.linearize`` of ``grad_fn``).
Memory: XLA's accounting of each compiled program (arguments + outputs +
temporaries - aliased). Times are medians of
interleaved repeats, reported as ratios to the gradient measured alongside.

"x plain twin" compares a row with the same work at top level, unrolled,
with plain HVPs (``jvp`` of ``grad_fn`` each time). "slow-layout convs"
counts the convolutions of the compiled program that XLA left in a
non-canonical layout: on XLA:CPU those of the backward pass are rewritten to
the canonical (fast, library-call) layout at top level but not inside a
``lax.cond`` branch or a loop body, which is why control flow around HVPs
costs about ten times more there.

Usage, from the repository root::

  python benchmarks/estimators.py                      # CPU, a minute or two
  python benchmarks/estimators.py --json benchmarks/results/estimators-cpu.json
  python benchmarks/estimators.py --smoke              # tiny: seconds

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time

import jax
import jax.numpy as jnp

import xsam_optax
from xsam_optax import _tree
from xsam_optax.train import loop
from xsam_optax.train import models

import _common

NUM_MATVECS = 5


# --smoke: one candidate of each kind (top level, rolled in lax.cond) and the
# CLI's CNN cut to one block of 4 channels.
SMOKE_CANDIDATES = ("gradient", "hvp", f"power({NUM_MATVECS}) unroll=True",
                    f"power({NUM_MATVECS}) unroll=False, in lax.cond")


def build(batch_size: int, length: int, seed: int = 0, smoke: bool = False):
  """The CLI's CNN on a synthetic MNIST-1D-shaped batch, training-mode loss."""
  model = (models.CNN(num_classes=10, features=(4,)) if smoke
           else models.make_model("cnn", num_classes=10))
  kx, ky, kp, kv = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(kx, (batch_size, length, 1))
  y = jax.random.randint(ky, (batch_size,), 0, 10)
  variables = model.init(kp, x)
  params, batch_stats = variables["params"], variables["batch_stats"]
  v0 = _tree.random_unit_like(kv, params)
  train_loss = loop.make_train_loss(model)

  def grad_fn_of(batch_stats, x, y):
    return jax.grad(lambda p: train_loss(p, batch_stats, x, y)[0])

  return params, batch_stats, x, y, v0, grad_fn_of


def conv_layouts(compiled) -> tuple[int, int]:
  """(convolutions XLA left in a non-canonical layout, all convolutions).

  XLA:CPU runs a convolution as a fast library call only in its canonical
  layout (batch first, features last, kernel ``...io``); its
  canonicalisation rewrites the others at top level, so a count above zero
  means some convolutions run through the slow generic emitter.
  """
  labels = re.findall(r"convolution\(.*?dim_labels=([^,\s]+)",
                      compiled.as_text())

  def canonical(label):
    lhs, rest = label.split("_", 1)
    kernel, out = rest.split("->")
    return (lhs[0] == "b" and lhs[-1] == "f" and kernel.endswith("io")
            and out[0] == "b" and out[-1] == "f")

  return sum(not canonical(l) for l in labels), len(labels)


def candidates(grad_fn_of):
  """name -> function(params, batch_stats, x, y, v, pred) to be jitted."""

  def gradient(p, bs, x, y, v, pred):
    del v, pred
    return grad_fn_of(bs, x, y)(p)

  def hvp(p, bs, x, y, v, pred):
    del pred
    return xsam_optax.hvp(grad_fn_of(bs, x, y), p, v)

  def hvp_in_cond(p, bs, x, y, v, pred):
    gf = grad_fn_of(bs, x, y)
    return jax.lax.cond(pred, lambda u: xsam_optax.hvp(gf, p, u),
                        lambda u: u, v)

  def estimator(method, unroll, in_cond, p, bs, x, y, v, pred):
    gf = grad_fn_of(bs, x, y)
    run = functools.partial(
        xsam_optax.power_iteration if method == "power" else xsam_optax.lanczos,
        lambda u: xsam_optax.hvp(gf, p, u), num_iters=NUM_MATVECS,
        unroll=unroll)
    if not in_cond:
      return run(v).eigenvector
    return jax.lax.cond(pred, lambda u: run(u).eigenvector, lambda u: u, v)

  def grad_plus_power(p, bs, x, y, v, pred):
    del pred
    gf = grad_fn_of(bs, x, y)
    g = gf(p)
    res = xsam_optax.power_iteration(lambda u: xsam_optax.hvp(gf, p, u), v,
                                     num_iters=NUM_MATVECS, unroll=True)
    return g, res.eigenvector

  def power_linearized(p, bs, x, y, v, pred):
    del pred
    _, matvec = jax.linearize(grad_fn_of(bs, x, y), p)
    return xsam_optax.power_iteration(matvec, v, num_iters=NUM_MATVECS,
                                      unroll=True).eigenvector

  def grad_plus_power_linearized(p, bs, x, y, v, pred):
    del pred
    g, matvec = jax.linearize(grad_fn_of(bs, x, y), p)
    res = xsam_optax.power_iteration(matvec, v, num_iters=NUM_MATVECS,
                                     unroll=True)
    return g, res.eigenvector

  out = {
      "gradient": (gradient, 1, "one gradient (training-mode loss)"),
      "hvp": (hvp, 1, "one HVP, jvp of grad, top level"),
      "hvp in lax.cond": (hvp_in_cond, 1, "one HVP, the true branch of lax.cond"),
  }
  for method in ("power", "lanczos"):
    for unroll, in_cond, label in ((True, False, "unroll=True"),
                                   (False, False, "unroll=False"),
                                   (True, True, "unroll=True, in lax.cond"),
                                   (False, True, "unroll=False, in lax.cond")):
      out[f"{method}({NUM_MATVECS}) {label}"] = (
          functools.partial(estimator, method, unroll, in_cond),
          NUM_MATVECS, f"{method} iteration, {NUM_MATVECS} matvecs, {label}")
  out[f"power({NUM_MATVECS}) unroll=True, linearize"] = (
      power_linearized, NUM_MATVECS,
      "matvec = jax.linearize(grad_fn)[1]: primal pass shared by the 5 HVPs")
  out[f"gradient + power({NUM_MATVECS})"] = (
      grad_plus_power, NUM_MATVECS, "gradient, then 5 HVPs of grad_fn")
  out[f"gradient + power({NUM_MATVECS}), linearize"] = (
      grad_plus_power_linearized, NUM_MATVECS,
      "jax.linearize(grad_fn): gradient and a reused jvp")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--length", type=int, default=40,
                 help="input length (MNIST-1D: 40)")
  p.add_argument("--rounds", type=int, default=15,
                 help="interleaved samples per candidate")
  p.add_argument("--smoke", action="store_true",
                 help="batch 4, 1 round, a one-block CNN, 4 candidates: checks "
                      "the script end to end")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)
  if args.smoke:  # Over the command's sizes.
    args.batch_size, args.rounds = 4, 1

  env = _common.environment()
  params, batch_stats, x, y, v0, grad_fn_of = build(args.batch_size, args.length,
                                                     smoke=args.smoke)
  pred = jnp.asarray(True)
  inputs = (params, batch_stats, x, y, v0, pred)
  print(f"# jax {env['jax']} on {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, load {env['load_average_at_start']}; "
        f"CNN {sum(a.size for a in jax.tree.leaves(params))} params, "
        f"batch {args.batch_size}x{args.length}x1", flush=True)

  specs = candidates(grad_fn_of)
  if args.smoke:
    specs = {name: specs[name] for name in SMOKE_CANDIDATES}
  compiled, compile_s = {}, {}
  for name, (fn, _, _) in specs.items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(*inputs).compile()
    compile_s[name] = time.perf_counter() - t0
  timings = _common.time_interleaved(
      {name: functools.partial(c, *inputs) for name, c in compiled.items()},
      rounds=args.rounds)

  grad_ms = timings["gradient"]["median_ms"]
  hvp_ms = timings["hvp"]["median_ms"]
  header = ("what", "ms", "x gradient", "per matvec, x gradient",
            "x plain twin", "compile s", "MiB (XLA)", "slow-layout convs")
  rows, results = [], {}
  for name, (_, matvecs, what) in specs.items():
    ms = timings[name]["median_ms"]
    if "cond" in name or "unroll=False" in name or name.endswith("linearize"):
      base = name.replace(", in lax.cond", "").replace(" in lax.cond", "")
      base = base.replace("unroll=False", "unroll=True")
      base = base.replace(", linearize", "")
      vs_top = ms / timings[base]["median_ms"]
    else:
      vs_top = None
    per_matvec = None
    if matvecs > 1:
      # Gradient + power: the per-matvec figure excludes the gradient.
      extra = grad_ms if name.startswith("gradient +") else 0.0
      per_matvec = (ms - extra) / matvecs / grad_ms
    mem = compiled[name].memory_analysis()
    mem_bytes = (None if mem is None else
                 mem.argument_size_in_bytes + mem.output_size_in_bytes
                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    slow, convs = conv_layouts(compiled[name])
    rows.append((name, ms, ms / grad_ms, per_matvec, vs_top, compile_s[name],
                 None if mem_bytes is None else mem_bytes / 2**20,
                 f"{slow}/{convs}"))
    results[name] = {
        "description": what, "matvecs": matvecs,
        **timings[name], "ratio_to_gradient": ms / grad_ms,
        "per_matvec_ratio_to_gradient": per_matvec,
        "ratio_to_top_level_unrolled": vs_top,
        "compile_s": compile_s[name], "memory_bytes_xla": mem_bytes,
        "convolutions": convs, "non_canonical_convolutions": slow}
  print(_common.format_table(header, rows))
  print(f"gradient {grad_ms:.2f} ms, one HVP {hvp_ms / grad_ms:.2f} gradients; "
        f"load average at end {_common.load_average()}")

  if args.json:
    env["load_average_at_end"] = _common.load_average()
    _common.write_json(args.json, {
        "benchmark": "estimators", "smoke": args.smoke,
        "command": _common.command("estimators", argv),
        "environment": env,
        "config": {"model": "xsam_optax.train.models.CNN (3x Conv+BatchNorm, 32 ch)",
                   "batch": [args.batch_size, args.length, 1],
                   "num_matvecs": NUM_MATVECS, "rounds": args.rounds,
                   "params": int(sum(a.size for a in jax.tree.leaves(params)))},
        "results": results})
  return 0


if __name__ == "__main__":
  sys.exit(main())
