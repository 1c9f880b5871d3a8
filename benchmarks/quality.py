"""How well each eigenvector schedule tracks the loss's sharp direction, at every step.

Why this score: X-SAM's correction at step ``t`` removes the gradient's
component along the vector ``v_t`` it holds at that step, whether or not the
step refreshed it. What the user's outcome depends on is therefore ``v_t`` at
*every* step, measured against the direction the correction is meant to act
on: the top eigenvector of the loss's Hessian (a large batch, ``large``), and,
as a second view, of step ``t``'s own mini-batch Hessian (``batch``).
Scoring only refresh steps against the refresh batch's own eigenvector (the
earlier benchmark) rewards converging hard on one batch, and chose defaults
that were worse on this score.

Protocol: one fixed SAM trajectory per problem and seed (``_trajectory``),
every schedule of ``_schedules.sweep()`` streamed over it from the same
random start vector, ``|cos(v_t, u_t)|`` with ``u_t`` from SciPy's ARPACK on
jitted Hessian-vector products written independently of the library
(``_oracle``). The oracles run at every 7th step (``t = 6, 13, 20, ...``):
7 is coprime with every refresh period in the sweep (1, 2, 3, 5), so every
phase of every schedule (steps since its last refresh) is sampled equally
often. Per schedule: the mean over scored steps for each seed, then the mean
over seeds and the range over seeds. Trajectories and oracle vectors are
cached in ``benchmarks/.cache`` (delete it to recompute).

Usage, from the repository root::

  python benchmarks/quality.py --json benchmarks/results/quality-cpu2.json
  python benchmarks/quality.py --steps 28 --seeds 0 --problems mlp-digits  # quick
  python benchmarks/quality.py --smoke   # seconds: the same code, tiny

``--smoke``: the first problem and seed, 7 steps (one scored), one
large-batch chunk, the reference and the first schedule of each product kind
that ``--only`` keeps, caches in a fresh temporary folder.

Gauss-Newton schedules (``product="gn"``, ``xsam_optax.gauss_newton_fn`` of
the training-mode logits) are scored against the same Hessian oracles: what
matters is whether their top eigenvector is the Hessian's.

Not a test: nothing here asserts a quality.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np

import _common
import _oracle
import _problems
import _schedules
import _trajectory

SCORE_STRIDE = 7
SCORE_OFFSET = 6  # never step 0, where every schedule refreshes from random
# The quality bar: a schedule holds the reference's quality when its mean
# over seeds is at least the reference's minus this, on both oracles.
TOLERANCE = 0.01


def score_steps(steps: int) -> list[int]:
  return list(range(SCORE_OFFSET, steps, SCORE_STRIDE))


def abs_cos(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Row-wise ``|cos|`` of two ``(S, n)`` arrays."""
  dots = np.abs(np.sum(vectors * reference, axis=1))
  return dots / (np.linalg.norm(vectors, axis=1)
                 * np.linalg.norm(reference, axis=1))


def run_seed(problem, seed, args, schedules, programs):
  t0 = time.perf_counter()
  traj = _trajectory.cached(problem, args.steps, seed, args.cache)
  steps = score_steps(args.steps)
  oracles = {kind: _oracle.cached(problem, traj, steps, kind,
                                  num_chunks=args.chunks, seed=seed,
                                  cache_dir=args.cache)
             for kind in ("batch", "large")}
  t1 = time.perf_counter()
  vectors = _schedules.stream(problem, traj, schedules, steps, seed=seed,
                               programs=programs)
  t2 = time.perf_counter()
  scores = {s.name: {kind: abs_cos(vectors[s], o.vectors).tolist()
                     for kind, o in oracles.items()} for s in schedules}
  oracle_info = {kind: {"lambda_1": o.values[:, 0].tolist(),
                        "lambda_2": o.values[:, 1].tolist(),
                        "matvecs": o.matvecs.tolist(), "seconds": o.seconds}
                 for kind, o in oracles.items()}
  print(f"# {problem.name} seed {seed}: trajectory + oracles {t1 - t0:.0f} s,"
        f" {len(schedules)} schedules streamed {t2 - t1:.0f} s", flush=True)
  return {"score_steps": steps, "scores": scores, "oracle": oracle_info,
          "seconds": {"trajectory_and_oracles": t1 - t0, "stream": t2 - t1}}


def summarise(per_seed: dict, schedules) -> list[dict]:
  """Per schedule and oracle: mean over seeds of the per-seed mean, range."""
  rows = []
  for s in schedules:
    row = {"name": s.name, "method": s.method, "num_iters": s.num_iters,
           "update_every": s.update_every, "fraction": s.fraction,
           "product": s.product, "products_per_step": s.products_per_step}
    for kind in ("batch", "large"):
      means = [float(np.mean(d["scores"][s.name][kind]))
               for d in per_seed.values()]
      ref = [float(np.mean(d["scores"][_schedules.REFERENCE.name][kind]))
             for d in per_seed.values()]
      row[kind] = {"mean": float(np.mean(means)), "min": min(means),
                   "max": max(means), "per_seed": means,
                   "minus_reference_per_seed": [a - b for a, b in zip(means, ref)]}
    rows.append(row)
  return rows


def table(results: dict) -> str:
  problems = list(results)
  header = ["schedule", "products/step"]
  for p in problems:
    header += [f"{p} vs batch", f"{p} vs large"]
  header.append(f"all >= reference - {TOLERANCE}")
  names = [r["name"] for r in results[problems[0]]["rows"]]
  lines = []
  for i, name in enumerate(names):
    r0 = results[problems[0]]["rows"][i]
    cells = [name, r0["products_per_step"]]
    ok = True
    for p in problems:
      r = results[p]["rows"][i]
      for kind in ("batch", "large"):
        q = r[kind]
        cells.append(f"{q['mean']:.3f} ({q['min']:.3f}-{q['max']:.3f})")
        ok &= np.mean(q["minus_reference_per_seed"]) >= -TOLERANCE
    cells.append("yes" if ok else "")
    lines.append(cells)
  lines.sort(key=lambda c: c[1])
  return _common.format_table(header, lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--problems", nargs="+", default=list(_problems.PROBLEMS))
  p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  p.add_argument("--steps", type=int, default=140,
                 help="trajectory length (the whole SAM run)")
  p.add_argument("--chunks", type=int, default=8,
                 help="batches of 128 in the large-batch Hessian (digits has "
                      "10)")
  p.add_argument("--cache", default=None, help="default benchmarks/.cache")
  p.add_argument("--only", default=None,
                 help="regex: keep only the schedules whose name matches (the "
                      "reference always runs)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, to check the script end to end")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.smoke:  # Over the command's sizes.
    args.problems, args.seeds = args.problems[:1], args.seeds[:1]
    args.steps, args.chunks = SCORE_STRIDE, 1  # one scored step
    args.cache = _common.smoke_dir()
  args.cache = args.cache or _common.cache_dir()
  _common.enable_compilation_cache(args.cache)
  schedules = _schedules.sweep()
  if args.only:
    schedules = [s for s in schedules if s == _schedules.REFERENCE
                 or re.search(args.only, s.name)]
  if args.smoke:
    first = {}
    for s in schedules:
      if s != _schedules.REFERENCE:
        first.setdefault(s.product, s)
    schedules = [_schedules.REFERENCE, *first.values()]
  env = _common.environment()
  print(f"# {len(schedules)} schedules, problems {args.problems}, seeds "
        f"{args.seeds}, {args.steps} steps, scored every {SCORE_STRIDE}; "
        f"load {env['load_average_at_start']}", flush=True)
  results = {}

  def payload(complete):
    return {"benchmark": "quality", "complete": complete, "smoke": args.smoke,
            "command": _common.command("quality", argv), "environment": env,
            "config": {"steps": args.steps, "seeds": args.seeds,
                       "chunks": args.chunks,
                       "score_stride": SCORE_STRIDE,
                       "score_offset": SCORE_OFFSET,
                       "oracle": f"scipy eigsh which='LA' k=2 tol={_oracle.TOL}"
                                 f" ncv={_oracle.NCV}",
                       "trajectory": f"SAM rho {_trajectory.RHO}, SGD momentum"
                                     f" 0.9, wd 5e-4, cosine lr from "
                                     f"{_trajectory.LEARNING_RATE} to 0",
                       "reference": _schedules.REFERENCE.name,
                       "only": args.only},
            "results": results}

  # Seeds outermost: a run stopped early has every problem on its first seeds.
  problems = {name: _problems.load(name) for name in args.problems}
  programs = {}
  per_seed = {name: {} for name in args.problems}
  for seed in args.seeds:
    for name, problem in problems.items():
      if name not in programs:
        programs[name] = _schedules.programs_for(problem, schedules)
      per_seed[name][seed] = run_seed(problem, seed, args, schedules,
                                      programs[name])
      results[name] = {"description": problem.description,
                       "large_batch_examples": args.chunks * problem.batch_size,
                       "per_seed": per_seed[name],
                       "rows": summarise(per_seed[name], schedules)}
      if args.json:
        _common.write_json(args.json, payload(False))
  env["load_average_at_end"] = _common.load_average()
  out = table(results)
  print(out)
  if args.json:
    _common.write_json(args.json, dict(payload(True), table=out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
