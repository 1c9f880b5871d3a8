"""X-SAM's step time over SAM's, schedule by schedule, on both refresh paths, and memory.

Why this score: what a user pays for X-SAM is the time of its training step
next to SAM's, averaged over a refresh period, on the path their loop takes:
``refresh=xsam_optax.refresh_due(step, k)`` from the host (two compiled
steps), or ``refresh=None`` inside one jitted step (``nnx.Optimizer``,
``lax.scan``, the docstring examples), where a periodic refresh runs under
``lax.cond``. Both are measured for each schedule, side by side in one
process, as ratios to SAM's step measured alongside. Which schedules are
worth running is the quality benchmark's question (``quality.py``); this one
prices them.

Every step is the CLI's whole training step (``xsam_optax.train.loop
.make_train_step``: clean ``value_and_grad``, ``tx.update`` with ``grad_fn`` of
the training-mode BatchNorm loss, SGD momentum 0.9 + weight decay 5e-4), with
the state donated, jitted and compiled ahead of time (``_steps.py``). A row's
time is one refresh period (``update_every`` steps) divided by its length;
medians of interleaved rounds after warm-up (``_common.py``). "gradient" is a
jitted ``value_and_grad`` of the training loss alone; "hvp" one exact
Hessian-vector product.

Memory: XLA's accounting of each compiled step (``memory_analysis()``:
arguments + outputs + temporaries - aliased), for a row the largest of its
programs, minus SAM's step, in units of the parameters' size; on GPU also
the allocator's process-wide peak.

Configurations:

* ``--device cpu``: the CLI's CNN (3 Conv+BatchNorm blocks, 32 channels) on
  MNIST-1D, batch 128;
* ``--device gpu``: CIFAR-style ResNet-18 (BatchNorm), batch 256 of
  synthetic 32x32x3 data, fp32, as the anchors of XSAM.md (programs compile
  in parallel threads);
* ``--smoke``: tiny sizes to check the script end to end; ``--device gpu
  --smoke --batch-size 2`` compiles ResNet-18 on a CPU, which is how the
  ResNet-18 memory column is measured without a GPU.

Usage::

  python benchmarks/step_overhead.py --device cpu
  python benchmarks/step_overhead.py --device gpu
  python benchmarks/step_overhead.py --device gpu --smoke --batch-size 2 \\
      --json benchmarks/results/memory-resnet18-cpu2.json

Writes ``benchmarks/results/<device>-<card or cpu>.json`` (``--json`` to
change). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shlex
import sys
import time

from _schedules import Schedule
from _steps import Row

REFERENCE = Schedule("power", 5, 5)
OLD_DEFAULTS = Schedule("lanczos", 4, 5)


def rows() -> list[Row]:
  """SGD, SAM, and X-SAM schedules (quality.py's candidates), on both paths."""
  out = [Row("SGD", "sgd"), Row("SAM", "sam")]
  schedules = [
      ("reference (power 5 every 5)", REFERENCE),
      ("old defaults (Lanczos 4 every 5)", OLD_DEFAULTS),
      ("power 1 every 1", Schedule("power", 1, 1)),
      ("power 1 every 1, 1/2 batch", Schedule("power", 1, 1, 0.5)),
      ("power 1 every 1, finite differences", Schedule("power", 1, 1, product="fd")),
      ("power 1 every 2", Schedule("power", 1, 2)),
      ("power 1 every 2, finite differences", Schedule("power", 1, 2, product="fd")),
      ("power 1 every 3", Schedule("power", 1, 3)),
      ("power 1 every 3, finite differences", Schedule("power", 1, 3, product="fd")),
      ("power 2 every 5", Schedule("power", 2, 5)),
      ("power 1 every 1, at the SAM point", Schedule("power", 1, 1, point="sam")),
      ("power 1 every 2, at the SAM point", Schedule("power", 1, 2, point="sam")),
  ]
  for name, s in schedules:
    out.append(Row(f"X-SAM {name}", "xsam", s, "host"))
    if s.update_every > 1:
      out.append(Row(f"X-SAM {name}, refresh=None", "xsam", s, "none"))
  return out


CONFIGS = {
    "cpu": dict(model="cnn", data="mnist1d", batch_size=128, rounds=21,
                num_batches=31, learning_rate=0.05),
    "gpu": dict(model="resnet18", data="synthetic", batch_size=256, rounds=15,
                num_batches=5, learning_rate=0.05),
}
SMOKE = dict(batch_size=16, rounds=2, num_batches=3)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--device", choices=("cpu", "gpu"), required=True)
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--rounds", type=int, default=None,
                 help="interleaved timing samples per row")
  p.add_argument("--only", default=None,
                 help="regex: keep only the X-SAM rows whose name matches "
                      "(SGD and SAM always run)")
  p.add_argument("--no-timing", action="store_true",
                 help="compile and report memory only")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, to check the script end to end (also "
                      "runs --device gpu's model on a CPU)")
  p.add_argument("--json", default=None,
                 help="default: benchmarks/results/<device>-<card or cpu>.json")
  p.add_argument("--no-json", action="store_true")
  return p.parse_args(argv)


def make_batches(config, seed=0):
  """``num_batches`` fixed (x, y) device batches and the number of classes."""
  import jax
  import jax.numpy as jnp

  b, nb = config["batch_size"], config["num_batches"]
  if config["data"] == "mnist1d":
    from xsam_optax.train import data as data_lib
    ds = data_lib.load_dataset("mnist1d")
    n = min(nb, len(ds.x_train) // b)
    return [(jnp.asarray(ds.x_train[i * b:(i + 1) * b]),
             jnp.asarray(ds.y_train[i * b:(i + 1) * b])) for i in range(n)], \
        ds.num_classes, "MNIST-1D training set"
  out = []
  for key in jax.random.split(jax.random.key(seed), nb):
    kx, ky = jax.random.split(key)
    out.append((jax.random.normal(kx, (b, 32, 32, 3)),
                jax.random.randint(ky, (b,), 0, 10)))
  return out, 10, "synthetic N(0,1) images, uniform labels"


def make_model(config, num_classes):
  if config["model"] == "cnn":
    from xsam_optax.train import models
    return (models.make_model("cnn", num_classes=num_classes),
            "xsam_optax.train.models.CNN: 3x (Conv k3, 32 ch, BatchNorm, "
            "ReLU), stride 2 after the first; Dense")
  import _resnet
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
  model, model_desc = make_model(config, num_classes)
  x0, y0 = batches[0]
  variables = loop.init_variables(model, x0, seed=0)
  lr = config["learning_rate"]
  states = {r.name: _steps.init_state(model, r, x0, seed=0, learning_rate=lr,
                                      variables=variables)
            for r in table_rows}
  params, stats = variables["params"], variables.get("batch_stats", {})
  print(f"# {model_desc}; batch {config['batch_size']}; jax {env['jax']} on "
        f"{env['backend']} ({env['device_kind']}), load "
        f"{env['load_average_at_start']}", flush=True)

  lowered = {("gradient",): _steps.gradient_fn(model).lower(params, stats, x0, y0),
             ("hvp",): _steps.hvp_fn(model).lower(params, stats, x0, y0, params)}
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
  timings = None
  if not args.no_timing:
    cands = {"gradient": lambda: exe[("gradient",)](params, stats, x0, y0),
             "hvp": lambda: exe[("hvp",)](params, stats, x0, y0, params)}
    per_call = {}
    for r in table_rows:
      cands[r.name] = _steps.period_runner(r, exe, states[r.name], batches)
      per_call[r.name] = r.period
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
      "gpu_process_peak_bytes": peak}


def report(table_rows, m) -> tuple[list[dict], str]:
  import _common

  timings, memory = m["timings"], m["memory_xla"]
  ms = (lambda k: timings[k]["median_ms"]) if timings else (lambda k: None)
  row_bytes = {r.name: max((memory[str(k)] or 0) for k in r.programs().values())
               for r in table_rows}
  sam_bytes = row_bytes["SAM"]
  results = []
  for r in table_rows:
    step = ms(r.name)
    extra = row_bytes[r.name] - sam_bytes if row_bytes[r.name] else None
    results.append({
        "name": r.name, "optimizer": r.optimizer, "path": r.path,
        "schedule": None if r.schedule is None else {
            "method": r.schedule.method, "num_iters": r.schedule.num_iters,
            "update_every": r.schedule.update_every,
            "fraction": r.schedule.fraction, "product": r.schedule.product},
        "step_ms": step,
        "ratio_to_sam": None if step is None else step / ms("SAM"),
        "step_ms_q1": timings[r.name]["q1_ms"] if timings else None,
        "step_ms_q3": timings[r.name]["q3_ms"] if timings else None,
        "memory_bytes": row_bytes[r.name],
        "memory_minus_sam_params": (None if extra is None or r.optimizer != "xsam"
                                    else extra / m["param_bytes"])})
  table = _common.format_table(
      ("variant", "path", "step ms", "x SAM", "memory - SAM's, x params"),
      [(x["name"], "refresh=None" if x["path"] == "none" else
        ("host" if x["optimizer"] == "xsam" else "-"), x["step_ms"],
        x["ratio_to_sam"], x["memory_minus_sam_params"]) for x in results])
  return results, table


def default_json_path(device, env, smoke):
  here = os.path.dirname(os.path.abspath(__file__))
  if device == "gpu" and env["backend"] == "gpu":
    card = re.sub(r"[^a-z0-9]+", "-", env["device_kind"].lower()).strip("-")
  else:
    card = f"cpu{env['cpu_count']}"
  return os.path.join(here, "results",
                      f"{device}-{card}{'-smoke' if smoke else ''}.json")


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # After JAX_PLATFORMS.

  import _common

  if args.device == "gpu" and jax.default_backend() != "gpu" and not args.smoke:
    sys.exit(f"--device gpu: JAX's backend is {jax.default_backend()!r}; "
             "install jax[cuda12] or use --smoke to dry-run on CPU")
  config = dict(CONFIGS[args.device])
  if args.smoke:
    config.update(SMOKE)
  for key in ("batch_size", "rounds"):
    if getattr(args, key) is not None:
      config[key] = getattr(args, key)
  table_rows = [r for r in rows() if r.optimizer != "xsam" or not args.only
                or re.search(args.only, r.name)]
  m = measure(args, config, table_rows)
  results, table = report(table_rows, m)
  grad = m["timings"]["gradient"]["median_ms"] if m["timings"] else None
  lines = [f"parameters {m['param_bytes'] / 2**20:.3g} MiB"]
  if grad:
    t = m["timings"]
    lines.append(f"gradient {grad:.2f} ms; SAM step "
                 f"{t['SAM']['median_ms'] / grad:.2f} gradients; one HVP "
                 f"{t['hvp']['median_ms'] / grad:.2f} gradients")
  print(table)
  print("\n".join(lines))
  if not args.no_json:
    path = args.json or default_json_path(args.device, m["environment"],
                                          args.smoke)
    _common.write_json(path, {
        "benchmark": "step_overhead", "device": args.device,
        "smoke": args.smoke, "command": shlex.join(["python"] + sys.argv),
        "config": {**config, "model_description": m["model_description"],
                   "data_description": m["data_description"],
                   "param_count": m["param_count"],
                   "param_bytes": m["param_bytes"],
                   "base_optimizer": "SGD momentum 0.9, weight decay 5e-4 "
                                     "(xsam_optax.train.loop.make_optimizer)",
                   "rho": 0.05, "alpha": 0.2},
        **{k: m[k] for k in ("environment", "seconds", "timings", "memory_xla",
                             "gpu_process_peak_bytes")},
        "gradient_ms": grad, "rows": results, "table": table,
        "summary": lines})
  return 0


if __name__ == "__main__":
  sys.exit(main())
