"""First-step compile time and optimised-HLO size against the parameter tree.

Why this score: before a training loop's first step runs, the user waits for
XLA to compile it, and for the eager ``tx.init``. That wait grows with the
parameter tree's structure (the number of leaves: transforms work leaf by
leaf, so the program has instructions per leaf) and hardly with its size.
Each candidate is a whole jitted training step, ``step(params, opt_state,
batch) -> (params, opt_state)``: the clean gradient, ``tx.update(...,
grad_fn=...)``, ``optax.apply_updates``. For each we record

* **compile s**: wall time of ``lowered.compile()`` alone (lowering and
  tracing excluded), on this machine, so it moves with the machine's load
  (the load average is printed at the start and the end);
* **HLO instructions**: the instructions of XLA's optimised program
  (``compiled.as_text()``), a deterministic proxy for the compile time that
  no load disturbs;
* XLA's FLOPs of the step (``cost_analysis()``), in the JSON;
* **init s**: wall time of an eager ``tx.init(params)``, each transform's
  after ``jax.clear_caches()`` (the eager operations it dispatches compile
  anew for the structure's shapes). The backend is warmed up once before,
  but the first init in a process may still pay one-time costs.

Structures: synthetic trees of N f32[4, 3] leaves (``--leaves``), and Flax
Linen models with tiny batches (``_structures.py``): CIFAR-style ResNet-18
and ResNet-50 with BatchNorm, a 12-layer transformer encoder. Ratios are to
``optax.contrib.sam``'s step on the same structure.

Usage, from the repository root::

  python benchmarks/compile_time.py --json benchmarks/results/compile-time-cpu2.json
  python benchmarks/compile_time.py --structures synthetic --leaves 30 300
  python benchmarks/compile_time.py --smoke

Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from collections.abc import Callable

STRUCTURES = ("synthetic", "resnet18", "resnet50", "transformer")
SMOKE_LEAVES = (3, 6)
SMOKE_STRUCTURES = ("synthetic",)


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str
  transform: str  # key of transforms(): candidates sharing it share an init
  update_kwargs: Callable[[Callable], dict]  # grad_fn -> tx.update kwargs


def transforms() -> dict[str, Callable]:
  import optax
  import xsam_optax

  return {
      "sgd": lambda: optax.sgd(0.1),
      "contrib.sam": lambda: optax.contrib.sam(
          optax.sgd(0.1), optax.sgd(0.05), opaque_mode=True),
      "sam": lambda: xsam_optax.sam(optax.sgd(0.1)),
      "xsam": lambda: xsam_optax.xsam(optax.sgd(0.1)),
      "eigen_sam_ascent": lambda: optax.chain(xsam_optax.eigen_sam_ascent(),
                                              optax.sgd(0.1)),
      "xsam lanczos": lambda: xsam_optax.xsam(
          optax.sgd(0.1), method="lanczos", num_iters=4),
      "unguarded": lambda: optax.chain(unguarded_xsam_refresh(),
                                       optax.sgd(0.1)),
  }


def unguarded_xsam_refresh():
  """An X-SAM refresh step's arithmetic written plainly, as a floor.

  One power step on the Hessian, SAM's gradient, the reference correction;
  no guards against zero or non-finite norms, no finiteness check, no
  structure checks. The step's own work (the gradient, the Hessian-vector
  product, the gradient at the SAM point) is the same as ``xsam``'s, so the
  difference between the two is what the library's guarantees cost to
  compile. Whole-tree sums are one reduction, as in the library.
  """
  import jax
  import jax.numpy as jnp
  import optax

  def total(parts):
    return jnp.sum(jax.lax.optimization_barrier(jnp.stack(parts)))

  def dot(x, y):
    return total([jnp.sum(a * b) for a, b in
                  zip(jax.tree.leaves(x), jax.tree.leaves(y))])

  def scaled(x, c):
    return jax.tree.map(lambda a: a * c, x)

  def init(params):
    ones = jax.tree.map(jnp.ones_like, params)
    return scaled(ones, 1 / jnp.sqrt(dot(ones, ones)))

  def update(g, v, params, *, grad_fn, **_):
    w = jax.jvp(grad_fn, (params,), (v,))[1]
    v = scaled(w, 1 / jnp.sqrt(dot(w, w)))
    point = jax.tree.map(lambda p, d: p + d,
                         params, scaled(g, 0.05 / jnp.sqrt(dot(g, g))))
    g_adv = grad_fn(point)
    unit = scaled(g_adv, 1 / jnp.sqrt(dot(g_adv, g_adv)))
    c = dot(unit, v)
    return jax.tree.map(lambda u, e: u - 0.2 * jnp.abs(c) * e, unit, v), v

  return optax.GradientTransformationExtraArgs(init, update)


CANDIDATES = (
    Candidate("sgd", "sgd", lambda g: {}),
    Candidate("contrib.sam", "contrib.sam",
              lambda g: {"grad_fn": lambda p, _: g(p)}),
    Candidate("sam", "sam", lambda g: {"grad_fn": g}),
    Candidate("xsam refresh (host)", "xsam",
              lambda g: {"grad_fn": g, "refresh": True}),
    Candidate("xsam plain (host)", "xsam",
              lambda g: {"grad_fn": g, "refresh": False}),
    Candidate("xsam refresh=None", "xsam", lambda g: {"grad_fn": g}),
    Candidate("eigen_sam_ascent refresh", "eigen_sam_ascent",
              lambda g: {"grad_fn": g, "refresh": True}),
    Candidate("xsam lanczos refresh", "xsam lanczos",
              lambda g: {"grad_fn": g, "refresh": True}),
    Candidate("unguarded X-SAM refresh", "unguarded",
              lambda g: {"grad_fn": g}),
)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--leaves", type=int, nargs="+", default=(30, 100, 300, 1000),
                 help="leaf counts of the synthetic trees")
  p.add_argument("--structures", nargs="+", choices=STRUCTURES,
                 default=STRUCTURES)
  p.add_argument("--only", default=None,
                 help="regex: keep the candidates whose name matches "
                      "(contrib.sam always runs: the ratios' reference)")
  p.add_argument("--smoke", action="store_true",
                 help=f"synthetic trees of {' and '.join(map(str, SMOKE_LEAVES))}"
                      " leaves only, to check the script end to end")
  p.add_argument("--json", default=None, help="write the measurements here")
  return p.parse_args(argv)


def build_structures(names, leaves):
  """The structures to measure, built lazily (one at a time in memory)."""
  import _structures

  for name in names:
    if name == "synthetic":
      for n in leaves:
        yield lambda n=n: _structures.synthetic(n)
    else:
      yield {"resnet18": _structures.resnet18_structure,
             "resnet50": _structures.resnet50_structure,
             "transformer": _structures.transformer_structure}[name]


def count_hlo_instructions(hlo_text: str) -> int:
  """Instructions (``%name = ...`` lines) inside the module's computations.

  Only lines between a computation's header (an unindented line ending in
  ``{``) and its closing ``}`` count, not the metadata tables.
  """
  count, inside = 0, False
  instruction = re.compile(r"\s+(ROOT\s+)?%?[\w.\-]+ = ")
  for line in hlo_text.splitlines():
    if not inside:
      inside = not line[:1].isspace() and line.rstrip().endswith("{")
    elif line.startswith("}"):
      inside = False
    elif instruction.match(line):
      count += 1
  return count


def time_inits(structure, needed) -> tuple[dict[str, float], dict]:
  """Eager ``tx.init`` wall time per transform, each after a cache clear."""
  import jax

  seconds, states = {}, {}
  for key, make in transforms().items():
    if key not in needed:
      continue
    tx = make()
    jax.clear_caches()
    t0 = time.perf_counter()
    states[key] = jax.block_until_ready(tx.init(structure.params))
    seconds[key] = time.perf_counter() - t0
  return seconds, states


def make_step(structure, tx, candidate):
  import jax
  import optax

  def step(params, opt_state, batch):
    grad_fn = structure.grad_fn(batch)
    updates, opt_state = tx.update(grad_fn(params), opt_state, params,
                                   **candidate.update_kwargs(grad_fn))
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def compile_step(structure, tx, candidate, state) -> dict:
  """Lowers, then times the compilation alone; counts the optimised HLO."""
  from _steps import flops

  t0 = time.perf_counter()
  lowered = make_step(structure, tx, candidate).lower(
      structure.params, state, structure.batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  return {"lower_s": lower_s, "compile_s": compile_s,
          "hlo_instructions": count_hlo_instructions(compiled.as_text()),
          "flops": flops(compiled)}


def measure_structure(structure, candidates) -> list[dict]:
  needed = {c.transform for c in candidates}
  init_s, states = time_inits(structure, needed)
  made = {key: make() for key, make in transforms().items() if key in needed}
  rows = []
  for c in candidates:
    m = compile_step(structure, made[c.transform], c, states[c.transform])
    rows.append({"structure": structure.name,
                 "leaves": structure.num_leaves,
                 "params": structure.num_params, "candidate": c.name,
                 "transform": c.transform, "init_s": init_s[c.transform], **m})
  reference = next(r for r in rows if r["candidate"] == "contrib.sam")
  for r in rows:
    r["compile_ratio"] = r["compile_s"] / reference["compile_s"]
    r["hlo_ratio"] = r["hlo_instructions"] / reference["hlo_instructions"]
  return rows


def table(rows) -> str:
  import _common

  return _common.format_table(
      ["candidate", "init s", "compile s", "compile / contrib.sam",
       "HLO instructions", "HLO / contrib.sam"],
      [[r["candidate"], r["init_s"], r["compile_s"], r["compile_ratio"],
        r["hlo_instructions"], r["hlo_ratio"]] for r in rows])


def main(argv=None) -> int:
  args = parse_args(argv)
  import jax

  # Compile for real, not from a persistent cache (restored for a caller); a
  # smoke run measures nothing and may use one.
  was_enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", was_enabled and args.smoke)
  try:
    run(args, sys.argv[1:] if argv is None else list(argv))
  finally:
    jax.config.update("jax_enable_compilation_cache", was_enabled)
  return 0


def run(args, argv) -> None:
  import jax
  import jax.numpy as jnp

  import _common

  leaves = SMOKE_LEAVES if args.smoke else args.leaves
  names = SMOKE_STRUCTURES if args.smoke else args.structures
  candidates = [c for c in CANDIDATES if c.name == "contrib.sam"
                or not args.only or re.search(args.only, c.name)]
  env = _common.environment()
  print(f"# jax {env['jax']} on {env['backend']} ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs, load {env['load_average_at_start']}",
        flush=True)
  jax.block_until_ready(jnp.zeros(1) + 1)  # the backend's one-time start
  t_start = time.perf_counter()
  all_rows, descriptions = [], {}
  for build in build_structures(names, leaves):
    structure = build()
    descriptions[structure.name] = structure.description
    print(f"\n## {structure.name}: {structure.num_leaves} parameter leaves, "
          f"{structure.num_params:,} parameters", flush=True)
    rows = measure_structure(structure, candidates)
    all_rows += rows
    print(table(rows), flush=True)
  env["load_average_at_end"] = _common.load_average()
  total_s = time.perf_counter() - t_start
  print(f"\n# {total_s:.0f} s in all; load at the end "
        f"{env['load_average_at_end']}")
  if args.json:
    _common.write_json(args.json, {
        "benchmark": "compile_time", "smoke": args.smoke,
        "command": _common.command("compile_time", argv),
        "environment": env, "structures": descriptions,
        "candidates": [c.name for c in candidates], "total_s": total_s,
        "rows": all_rows})


if __name__ == "__main__":
  sys.exit(main())
