"""X-SAM's step cost over SAM's, schedule by schedule: XLA's FLOPs, wall time, memory.

Why these scores: what a user pays for X-SAM is its training step next to
SAM's, averaged over a refresh period. Two measures of it, side by side:

* **FLOPs**, XLA's own count of the compiled steps (``cost_analysis()``),
  portable across platforms: a CPU's balance of costs is not an
  accelerator's, and XLA:CPU runs the convolutions inside a ``lax.cond``
  several times slower than at top level, so CPU wall time misleads twice.
  A row's count is amortised over its period from the host path's two
  programs (one refresh step, ``update_every - 1`` plain steps): a program
  with a ``lax.cond`` counts both branches, so it is never used.
* **Wall time** on the machine at hand, on the path the user's loop takes:
  ``refresh=xsam_optax.refresh_due(step, k)`` from the host (two compiled
  steps), or ``refresh=None`` inside one jitted step (``nnx.Optimizer``,
  ``lax.scan``, the docstring examples). On CPU the library compiles a
  periodic ``refresh=None`` schedule to a program that refreshes at every
  step and keeps the result on refresh steps only; the ``lax.cond`` program
  it replaced (still the one on accelerators) is timed beside it
  (``cond`` rows). Ratios to SAM's step measured in the same run.

Which schedules are worth running is the quality benchmark's question
(``quality.py``); this one prices them.

Every step is the CLI's whole training step (``xsam_optax.train.loop
.make_train_step``: clean ``value_and_grad``, ``tx.update`` with ``grad_fn`` of
the training-mode BatchNorm loss, SGD momentum 0.9 + weight decay 5e-4), with
the state donated, jitted and compiled ahead of time (``_steps.py``). A row's
time is one refresh period (``update_every`` steps) divided by its length;
medians of interleaved rounds after warm-up (``_common.py``). "gradient" is a
jitted ``value_and_grad`` of the training loss alone; "hvp" one exact
Hessian-vector product; "gn" one Gauss-Newton product of the logits.

Memory: XLA's accounting of each compiled step (``memory_analysis()``:
arguments + outputs + temporaries - aliased), for a row the largest of its
programs, minus SAM's step, in units of the parameters' size; on GPU also
the allocator's process-wide peak.

Models (``--model``):

* ``cnn``: the CLI's CNN (3 Conv+BatchNorm blocks, 32 channels) on MNIST-1D,
  batch 128 (the default on ``--device cpu``);
* ``mlp``: the CLI's MLP (2x128 ReLU) on scikit-learn's digits, batch 128;
* ``resnet18``: CIFAR-style ResNet-18 (BatchNorm), batch 256 of synthetic
  32x32x3 data, fp32, as the anchors of XSAM.md (the default on ``--device
  gpu``; on a CPU, ``--no-timing`` compiles it for FLOPs and memory only).

Usage, from the repository root::

  python benchmarks/step_overhead.py --device cpu --json benchmarks/results/cpu-cnn-cpu2.json
  python benchmarks/step_overhead.py --device cpu --model mlp
  python benchmarks/step_overhead.py --device cpu --model resnet18 --no-timing
  python benchmarks/step_overhead.py --device gpu
  python benchmarks/step_overhead.py --device cpu --smoke   # seconds: the same code, tiny

Prints the table; writes the JSON only to the path ``--json`` names.
``--smoke`` runs every step of the script on tiny sizes (batch 16, 2 rounds,
a CNN of one block, a 2-stage ResNet) and on SGD, SAM and, per path, the
cheapest X-SAM row that ``--only`` keeps. Not a test: nothing here asserts a
time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import sys
import time

from _schedules import Schedule
from _steps import Row

REFERENCE = Schedule("power", 5, 5)


def schedules() -> list[tuple[str, Schedule]]:
  """The priced schedules: Hessian, Gauss-Newton and finite-difference products."""
  out = [("reference (power 5 every 5)", REFERENCE),
         ("power 5 every 1", Schedule("power", 5, 1))]
  for product, label in (("hvp", ""), ("gn", ", Gauss-Newton"),
                         ("fd", ", finite differences")):
    for k in (1, 2, 3, 5):
      if product == "fd" and k == 5:
        continue
      out.append((f"power 1 every {k}{label}",
                  Schedule("power", 1, k, product=product)))
  out.append(("power 5 every 5, Gauss-Newton", Schedule("power", 5, 5, product="gn")))
  return out


def rows(paths=("host", "none", "cond")) -> list[Row]:
  """SGD, SAM, and X-SAM schedules on the requested paths.

  ``cond`` rows only for the Hessian schedules every 2, 3 and 5 steps: what
  ``refresh=None`` cost on CPU before the unconditional program.
  """
  out = [Row("SGD", "sgd"), Row("SAM", "sam")]
  for name, s in schedules():
    if "host" in paths:
      out.append(Row(f"X-SAM {name}", "xsam", s, "host"))
    if s.update_every > 1 and "none" in paths:
      out.append(Row(f"X-SAM {name}, refresh=None", "xsam", s, "none"))
    if (s.update_every > 1 and "cond" in paths and s.product == "hvp"):
      out.append(Row(f"X-SAM {name}, refresh=None under lax.cond", "xsam", s,
                     "cond"))
  return out


CONFIGS = {
    "cnn": dict(model="cnn", data="mnist1d", batch_size=128, rounds=21,
                num_batches=31, learning_rate=0.05),
    "mlp": dict(model="mlp", data="digits", batch_size=128, rounds=21,
                num_batches=10, learning_rate=0.05),
    "resnet18": dict(model="resnet18", data="synthetic", batch_size=256,
                     rounds=15, num_batches=5, learning_rate=0.05),
}
SMOKE = dict(batch_size=16, rounds=2, num_batches=3, image_size=8,
             steps_per_sample=1)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--device", choices=("cpu", "gpu"), required=True)
  p.add_argument("--model", choices=tuple(CONFIGS), default=None,
                 help="default: cnn on cpu, resnet18 on gpu")
  p.add_argument("--paths", nargs="+", choices=("host", "none", "cond"),
                 default=("host", "none", "cond"),
                 help="which paths' X-SAM rows to compile (FLOPs come from "
                      "the host path)")
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--rounds", type=int, default=None,
                 help="interleaved timing samples per row")
  p.add_argument("--steps-per-sample", type=int, default=None,
                 help="steps per timing sample, in whole refresh periods "
                      "(default 1: one period); more steps average out a "
                      "busy machine's scheduling noise")
  p.add_argument("--only", default=None,
                 help="regex: keep only the X-SAM rows whose name matches "
                      "(SGD and SAM always run)")
  p.add_argument("--no-timing", action="store_true",
                 help="compile and report memory only")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes and rows, to check the script end to end "
                      "(also runs --device gpu's model on a CPU)")
  p.add_argument("--json", default=None,
                 help="write the results here (default: print only)")
  return p.parse_args(argv)


def smoke_rows(table_rows: list[Row]) -> list[Row]:
  """SGD, SAM and, per path, the cheapest X-SAM row: fewest products, a period > 1."""
  keep = [r for r in table_rows if r.optimizer != "xsam"]
  for path in ("host", "none", "cond"):
    rows_of_path = [r for r in table_rows if r.optimizer == "xsam" and r.path == path]
    if rows_of_path:
      keep.append(min(rows_of_path, key=lambda r: (r.schedule.num_iters, r.period == 1)))
  return keep


def make_batches(config, seed=0):
  """``num_batches`` fixed (x, y) device batches and the number of classes."""
  import jax
  import jax.numpy as jnp

  b, nb = config["batch_size"], config["num_batches"]
  if config["data"] in ("mnist1d", "digits"):
    from xsam_optax.train import data as data_lib
    ds = data_lib.load_dataset(config["data"])
    n = min(nb, len(ds.x_train) // b)
    return [(jnp.asarray(ds.x_train[i * b:(i + 1) * b]),
             jnp.asarray(ds.y_train[i * b:(i + 1) * b])) for i in range(n)], \
        ds.num_classes, f"{config['data']} training set"
  side = config.get("image_size", 32)
  out = []
  for key in jax.random.split(jax.random.key(seed), nb):
    kx, ky = jax.random.split(key)
    out.append((jax.random.normal(kx, (b, side, side, 3)),
                jax.random.randint(ky, (b,), 0, 10)))
  return out, 10, "synthetic N(0,1) images, uniform labels"


def make_model(config, num_classes, smoke=False):
  if config["model"] == "cnn":
    from xsam_optax.train import models
    if smoke:
      return (models.CNN(num_classes=num_classes, features=(4,)),
              "the CLI's CNN with one block of 4 channels (--smoke)")
    return (models.make_model("cnn", num_classes=num_classes),
            "xsam_optax.train.models.CNN: 3x (Conv k3, 32 ch, BatchNorm, "
            "ReLU), stride 2 after the first; Dense")
  if config["model"] == "mlp":
    from xsam_optax.train import models
    return (models.make_model("mlp", num_classes=num_classes),
            "xsam_optax.train.models.MLP: 2x128 ReLU, no BatchNorm")
  import _resnet
  if smoke:
    return (_resnet.resnet18(num_classes, **_resnet.SMOKE),
            "a 2-stage CIFAR-style ResNet (--smoke)")
  return (_resnet.resnet18(num_classes),
          "CIFAR-style ResNet-18 (BasicBlock 2-2-2-2, BatchNorm)")


def compile_all(lowered: dict, device: str) -> tuple[dict, dict]:
  """Compiles in threads on a GPU host; one at a time on the 2-core CPU."""
  workers = 1 if device == "cpu" else max(1, min(8, os.cpu_count() or 1))

  def one(item):
    key, low = item
    t = time.perf_counter()
    return key, low.compile(), time.perf_counter() - t

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    done = list(pool.map(one, lowered.items()))
  return {k: exe for k, exe, _ in done}, {str(k): s for k, _, s in done}


def measure(args, config, table_rows):
  import jax
  from xsam_optax.train import loop

  import _common
  import _steps

  env = _common.environment()
  t0 = time.perf_counter()
  batches, num_classes, data_desc = make_batches(config)
  model, model_desc = make_model(config, num_classes, args.smoke)
  x0, y0 = batches[0]
  variables = loop.init_variables(model, x0, seed=0)
  lr = config["learning_rate"]
  # The optimizer states' initial values depend on the optimizer only (the
  # schedule's settings are static), so rows share them (each row's runner
  # copies its own).
  by_kind, states = {}, {}
  for r in table_rows:
    kind = (r.optimizer, r.schedule.method if r.schedule else None)
    if kind not in by_kind:
      by_kind[kind] = _steps.init_state(model, r, x0, seed=0,
                                        learning_rate=lr, variables=variables)
    states[r.name] = by_kind[kind]
  params, stats = variables["params"], variables.get("batch_stats", {})
  print(f"# {model_desc}; batch {config['batch_size']}; jax {env['jax']} on "
        f"{env['backend']} ({env['device_kind']}), load "
        f"{env['load_average_at_start']}", flush=True)

  lowered = {("gradient",): _steps.gradient_fn(model).lower(params, stats, x0, y0),
             ("hvp",): _steps.hvp_fn(model).lower(params, stats, x0, y0, params),
             ("gn",): _steps.gauss_newton_product_fn(model).lower(
                 params, stats, x0, y0, params)}
  for r in table_rows:
    for key in r.programs().values():
      if key not in lowered:
        lowered[key] = _steps.lower(model, r, key, states[r.name], x0, y0, lr)
  lower_s = time.perf_counter() - t0
  t1 = time.perf_counter()
  exe, compile_each = compile_all(lowered, args.device)
  compile_s = time.perf_counter() - t1
  print(f"# lowering {lower_s:.0f} s, compiling {len(exe)} programs "
        f"{compile_s:.0f} s", flush=True)

  memory = {str(k): _steps.xla_bytes(e) for k, e in exe.items()}
  breakdown = {str(k): _steps.memory_breakdown(e) for k, e in exe.items()}
  flops = {str(k): _steps.flops(e) for k, e in exe.items()}
  timings = None
  if not args.no_timing:
    n = config["steps_per_sample"]

    def repeated(key, *args):
      return lambda: [exe[key](*args) for _ in range(n)][-1]

    cands = {"gradient": repeated(("gradient",), params, stats, x0, y0),
             "hvp": repeated(("hvp",), params, stats, x0, y0, params),
             "gn": repeated(("gn",), params, stats, x0, y0, params)}
    per_call = {"gradient": n, "hvp": n, "gn": n}
    for r in table_rows:
      periods = max(1, round(config["steps_per_sample"] / r.period))
      cands[r.name] = _steps.period_runner(r, exe, states[r.name], batches,
                                           periods)
      per_call[r.name] = r.period * periods
    env["load_average_at_timing"] = _common.load_average()
    timings = _common.time_interleaved(cands, rounds=config["rounds"],
                                       per_call=per_call)
  peak = None
  if env["backend"] == "gpu":
    peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  env["load_average_at_end"] = _common.load_average()
  return {
      "environment": env, "model_description": model_desc,
      "data_description": data_desc,
      "param_count": int(sum(a.size for a in jax.tree.leaves(params))),
      "param_bytes": _steps.param_bytes(params),
      "seconds": {"lowering": lower_s, "compile": compile_s,
                  "compile_each": compile_each},
      "timings": timings, "memory_xla": memory,
      "memory_breakdown": breakdown, "flops": flops,
      "gpu_process_peak_bytes": peak}


def every_step_twin(row: Row) -> str:
  """The name of the host row refreshing every step with ``row``'s products."""
  s = row.schedule
  for name, other in schedules():
    if (other.update_every == 1 and (other.method, other.num_iters,
                                     other.fraction, other.product)
        == (s.method, s.num_iters, s.fraction, s.product)):
      return f"X-SAM {name}"
  return ""


def row_flops(row: Row, flops: dict) -> float | None:
  """FLOPs per step: the host path's programs amortised over the period."""
  roles = {role: flops.get(str(key)) for role, key in row.programs().items()}
  if None in roles.values():
    return None
  if "step" in roles:
    # A refresh=None program with a periodic schedule: on accelerators a
    # lax.cond whose count includes both branches. Not used.
    return None if row.path != "host" and row.period > 1 else roles["step"]
  k = row.period
  return (roles["refresh"] + (k - 1) * roles["plain"]) / k


def report(table_rows, m) -> tuple[list[dict], str]:
  import _common

  timings, memory, flops = m["timings"], m["memory_xla"], m["flops"]
  ms = (lambda k: timings[k]["median_ms"]) if timings else (lambda k: None)
  row_bytes = {r.name: max((memory[str(k)] or 0) for k in r.programs().values())
               for r in table_rows}
  sam_bytes = row_bytes["SAM"]
  sam_flops = row_flops(table_rows[[r.name for r in table_rows].index("SAM")],
                        flops)
  names = {r.name for r in table_rows}
  results = []
  for r in table_rows:
    step = ms(r.name)
    extra = row_bytes[r.name] - sam_bytes if row_bytes[r.name] else None
    f = row_flops(r, flops)
    twin = every_step_twin(r) if r.optimizer == "xsam" else ""
    results.append({
        "name": r.name, "optimizer": r.optimizer, "path": r.path,
        "schedule": None if r.schedule is None else {
            "method": r.schedule.method, "num_iters": r.schedule.num_iters,
            "update_every": r.schedule.update_every,
            "fraction": r.schedule.fraction, "product": r.schedule.product},
        "flops_per_step": f,
        "flops_ratio_to_sam": None if f is None or not sam_flops else f / sam_flops,
        "step_ms": step,
        "ratio_to_sam": None if step is None else step / ms("SAM"),
        "every_step_twin": twin or None,
        "ratio_to_every_step": (
            step / ms(twin) if step is not None and twin in names
            and twin != r.name else None),
        "step_ms_q1": timings[r.name]["q1_ms"] if timings else None,
        "step_ms_q3": timings[r.name]["q3_ms"] if timings else None,
        "memory_bytes": row_bytes[r.name],
        "memory_minus_sam_params": (None if extra is None or r.optimizer != "xsam"
                                    else extra / m["param_bytes"])})
  header = ["variant", "path", "FLOPs x SAM"]
  cells = lambda x: [x["name"], _common.path_label(x), x["flops_ratio_to_sam"]]
  if timings:
    header += ["step ms", "wall x SAM", "wall x every step"]
    cells_t = lambda x: cells(x) + [x["step_ms"], x["ratio_to_sam"],
                                    x["ratio_to_every_step"]]
  else:
    cells_t = cells
  header.append("memory - SAM's, x params")
  table = _common.format_table(
      header, [cells_t(x) + [x["memory_minus_sam_params"]] for x in results])
  return results, table


def summary(m) -> list[str]:
  """Products and SAM's step in gradients: XLA's FLOPs, and wall time if timed."""
  f = {k: m["flops"].get(str((k,))) for k in ("gradient", "hvp", "gn", "sam",
                                              "sgd")}
  lines = [f"parameters {m['param_bytes'] / 2**20:.3g} MiB "
           f"({m['param_count']:,})"]
  if f["gradient"]:
    g = f["gradient"]
    lines.append(
        f"XLA FLOPs, in gradients: SAM step {f['sam'] / g:.2f}, SGD step "
        f"{f['sgd'] / g:.2f}, one Hessian-vector product {f['hvp'] / g:.2f}, "
        f"one Gauss-Newton product {f['gn'] / g:.2f}")
  if m["timings"]:
    t = {k: m["timings"][k]["median_ms"] for k in ("gradient", "hvp", "gn",
                                                   "SAM")}
    g = t["gradient"]
    lines.append(
        f"wall, in gradients ({g:.2f} ms): SAM step {t['SAM'] / g:.2f}, one "
        f"Hessian-vector product {t['hvp'] / g:.2f}, one Gauss-Newton product "
        f"{t['gn'] / g:.2f}")
  return lines


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # After JAX_PLATFORMS.

  import _common

  if args.device == "gpu" and jax.default_backend() != "gpu" and not args.smoke:
    sys.exit(f"--device gpu: JAX's backend is {jax.default_backend()!r}; "
             "install jax[cuda12] or use --smoke to dry-run on CPU")
  model = args.model or {"cpu": "cnn", "gpu": "resnet18"}[args.device]
  config = dict(CONFIGS[model])
  config.setdefault("steps_per_sample", 1)
  for key in ("batch_size", "rounds", "steps_per_sample"):
    if getattr(args, key) is not None:
      config[key] = getattr(args, key)
  if args.smoke:  # Over the command's sizes.
    config.update(SMOKE)
  table_rows = [r for r in rows(args.paths)
                if r.optimizer != "xsam" or not args.only
                or re.search(args.only, r.name)]
  if args.smoke:
    table_rows = smoke_rows(table_rows)
  m = measure(args, config, table_rows)
  results, table = report(table_rows, m)
  lines = summary(m)
  print(table)
  print("\n".join(lines))
  if args.json:
    _common.write_json(args.json, {
        "benchmark": "step_overhead", "device": args.device, "model": model,
        "smoke": args.smoke, "command": _common.command("step_overhead", argv),
        "config": {**config, "model_description": m["model_description"],
                   "data_description": m["data_description"],
                   "param_count": m["param_count"],
                   "param_bytes": m["param_bytes"],
                   "base_optimizer": "SGD momentum 0.9, weight decay 5e-4 "
                                     "(xsam_optax.train.optimizers.make_optimizer)",
                   "rho": 0.05, "alpha": 0.2},
        **{k: m[k] for k in ("environment", "seconds", "timings", "flops",
                             "memory_xla", "memory_breakdown",
                             "gpu_process_peak_bytes")},
        "rows": results, "table": table, "summary": lines})
  return 0


if __name__ == "__main__":
  sys.exit(main())
