"""The documentation's performance page, ``docs/performance.md``, from the benchmark JSON.

Reads ``benchmarks/results/*.json`` written by ``step_overhead.py``,
``step_memory.py``, ``quality.py``, ``fd_accuracy.py``, ``estimators.py``,
``refresh_memory.py`` and ``compile_time.py`` and writes one MyST Markdown
page: cost in XLA's FLOPs first, then wall time, memory, eigenvector
quality, finite-difference accuracy, the estimators' cost and compile time,
each table under the command that produced it::

  python benchmarks/report.py                 # writes docs/performance.md
  python benchmarks/report.py --out -         # prints it
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import _common

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("cnn", "mlp", "resnet18")
MODEL_NAMES = {"cnn": "CNN", "mlp": "MLP", "resnet18": "ResNet-18"}


def from_root(cmd: str) -> str:
  """``cmd`` as run from the repository root.

  Older records ran some scripts from ``benchmarks/`` (``cd benchmarks &&
  python quality.py ... --json results/...``): the page prints every command
  as it runs from the root.

  Example:
    >>> from_root("cd benchmarks && python quality.py --json results/q.json")
    'python benchmarks/quality.py --json benchmarks/results/q.json'
  """
  cmd = re.sub(r"^cd benchmarks && ", "", cmd)
  cmd = re.sub(r"^python (\w+\.py)\b", r"python benchmarks/\1", cmd)
  return re.sub(r"(--json) results/", r"\1 benchmarks/results/", cmd)


def _command(cmd: str) -> str:
  return "```bash\n" + "\n".join(from_root(c) for c in cmd.split("\n")) + "\n```\n"


def _range(values, digits=2) -> str:
  """``lo-hi`` (or one value) of ``values``, formatted."""
  lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
  return lo if lo == hi else f"{lo}-{hi}"


# The schedules the opening answer prices (the FLOP table's row names).
ANSWER_SCHEDULES = (
    ("power 1 every 2", "the defaults (one power product on the Hessian every 2 steps)"),
    ("power 1 every 2, Gauss-Newton",
     "Gauss-Newton products every 2 steps (`curvature_fn=gauss_newton_fn(...)`)"),
    ("reference (power 5 every 5)", "the paper's schedule (5 products every 5 steps)"),
    ("power 1 every 1", "one product on every step (`update_every=1`)"),
)


def answer_section(steps: dict, runs: dict) -> str:
  """The page's opening answer: cost and memory over SAM, and where it was measured."""
  models = [m for m in MODELS if m in steps]
  lines = ["## In short", ""]
  flops = {}
  for m in models:
    for r in steps[m]["rows"]:
      if r["optimizer"] == "xsam" and r["path"] == "host":
        flops.setdefault(r["name"].removeprefix("X-SAM "), {})[m] = r["flops_ratio_to_sam"]
  priced = [(label, flops[name]) for name, label in ANSWER_SCHEDULES if name in flops]
  if priced:
    lines.append(
        "- **Cost over SAM** (XLA's FLOP count of the compiled training step, averaged over "
        f"a refresh period; {', '.join(MODEL_NAMES[m] for m in models)}): "
        + "; ".join(f"{label} {_range(list(v.values()))}x" for label, v in priced)
        + ". (Table: *Cost in FLOPs*.)")
  big = steps.get("resnet18", {})
  memory = big.get("memory_xla")
  if memory:
    pb = big["config"]["param_bytes"]
    x = lambda key: memory[key] / pb if key in memory else None
    parts = [("SAM's step", x("('sam',)")),
             ("an X-SAM step without a refresh", x("('xsam', 'plain', False)")),
             ("a Hessian refresh step (one power product)",
              x("('xsam', ('power', 1, 1.0, 'hvp'), True)")),
             ("with 5 products", x("('xsam', ('power', 5, 1.0, 'hvp'), True)")),
             ("a Gauss-Newton refresh step", x("('xsam', ('power', 1, 1.0, 'gn'), True)"))]
    lines.append(
        f"- **Memory over SAM** (XLA's accounting of the compiled step, ResNet-18 at batch "
        f"{big['config']['batch_size']}, in multiples of the parameters' size): "
        + "; ".join(f"{name} {v:.1f}x" for name, v in parts if v is not None)
        + ". The refresh step holds the products' activations and tangents; the other "
        "steps add one parameter-sized vector, the eigenvector. (*Memory*.)")
  backends = sorted({d["environment"]["backend"] for ds in runs.values() for d in ds
                     if d.get("environment", {}).get("backend")})  # older files: none
  accelerators = [b for b in backends if b != "cpu"]
  lines.append(
      "- **Where it was measured**: "
      + (f"every result on this page ran on a CPU ({', '.join(backends)} backend): the FLOP "
         "and memory counts are of programs XLA compiled for the CPU, and every wall time is "
         "a CPU time. No GPU or TPU measurement is among them. On an accelerator XLA "
         "compiles other programs (fusions, layouts, and a `lax.cond` that skips the "
         "refresh rather than computing it), so the counts are estimates there and the CPU "
         "wall times say nothing about it (`benchmarks/step_overhead.py --device gpu` "
         "measures a GPU)."
         if not accelerators else
         f"results on {', '.join(backends)}; each table names its device."))
  lines.append("")
  return "\n".join(lines)


def _where(env: dict) -> str:
  if env["backend"] == "gpu":
    return env["device_kind"]
  return f"{env['cpu_count']}-core CPU"


def _load(env: dict) -> str:
  parts = [env.get(k) for k in ("load_average_at_start",
                                "load_average_at_timing",
                                "load_average_at_end")]
  return " / ".join(f"{p[0]:.1f}" for p in parts if p)


def _x(v, digits=2):
  return None if v is None else f"{v:.{digits}f}"


def flops_section(runs: dict) -> str:
  """One table: every X-SAM schedule's FLOPs per step over SAM's, per model."""
  models = [m for m in MODELS if m in runs]
  order, table = [], {}
  for m in models:
    for r in runs[m]["rows"]:
      if r["path"] == "host" or r["optimizer"] != "xsam":
        name = r["name"].removeprefix("X-SAM ")
        if name not in table:
          order.append(name)
          table[name] = {}
        table[name][m] = r["flops_ratio_to_sam"]
  rows = [[name] + [_x(table[name].get(m)) for m in models] for name in order]
  header = ["schedule (host path)"] + [
      f"{MODEL_NAMES[m]} FLOPs x SAM" for m in models]
  lines = [
      "## Cost in FLOPs", "",
      "What a step costs on an accelerator is, to first order, what XLA counts "
      "in the compiled step: its FLOPs (`compiled.cost_analysis()`). Wall time "
      "on a CPU misleads twice: the CPU's balance of costs (convolutions "
      "against element-wise work and memory traffic) is not an accelerator's, "
      "and XLA:CPU runs convolutions inside a `lax.cond` branch several times "
      "slower than at top level. The FLOP count is the same on every platform, "
      "so this page leads with it.", "",
      "A row is X-SAM's training step averaged over one refresh period, over "
      "SAM's step: for a refresh every `k` steps, one step with the refresh "
      "and `k - 1` without, each counted in its own compiled program (the "
      "host path, `refresh=refresh_due(step, k)`). A `lax.cond` program's "
      "count includes both branches, so it is not used. Every step is the "
      "training CLI's whole step (clean gradient, SAM ascent, refresh, "
      "correction, SGD with momentum and weight decay).", "",
      _common.format_table(header, rows), ""]
  for m in models:
    d = runs[m]
    cfg = d["config"]
    lines += [f"- {MODEL_NAMES[m]}: {cfg['model_description']}, batch "
              f"{cfg['batch_size']}, {cfg['param_count']:,} parameters. "
              + "; ".join(s for s in d["summary"] if s.startswith("XLA")) + "."]
  lines += ["", "Commands:", "",
            _command("\n".join(runs[m]["command"] for m in models))]
  return "\n".join(lines)


def _step_name(schedule_name: str) -> str:
  """The step benchmark's row for a quality benchmark's schedule name."""
  if schedule_name == "power 5 every 5":
    return "X-SAM reference (power 5 every 5)"
  return f"X-SAM {schedule_name}"


def choice_section(steps: dict, d: dict,
                   title: str = "Cost at the reference's quality",
                   note: str = "Gauss-Newton products need the model's "
                               "outputs and a loss convex in them "
                               "(`gauss_newton_fn`).",
                   skip_products: tuple = ()) -> str:
  """Each scored schedule's FLOPs next to whether it holds the reference's quality."""
  import numpy as np
  import quality

  models = [m for m in MODELS if m in steps]
  flops = {m: {r["name"]: r["flops_ratio_to_sam"] for r in steps[m]["rows"]
               if r["path"] == "host"} for m in models}
  problems = list(d["results"])
  rows = []
  for i, r0 in enumerate(d["results"][problems[0]]["rows"]):
    if r0["product"] in skip_products:
      continue
    worst = min(
        float(np.mean(d["results"][p]["rows"][i][kind]
                      ["minus_reference_per_seed"]))
        for p in problems for kind in ("batch", "large"))
    step = _step_name(r0["name"])
    ratios = [flops[m].get(step) for m in models]
    rows.append([r0["name"]] + [_x(v) for v in ratios]
                + [f"{worst:+.3f}",
                   "yes" if worst >= -quality.TOLERANCE else ""])
  # Cheapest first by the last model's count; schedules it did not price last.
  rows.sort(key=lambda row: float("inf") if row[len(models)] is None
            else float(row[len(models)]))
  header = (["schedule"] + [f"{MODEL_NAMES[m]} FLOPs x SAM" for m in models]
            + ["worst mean - reference", "holds the reference's quality"])
  seeds = sorted({int(s) for r in d["results"].values() for s in r["per_seed"]})
  return "\n".join([
      f"## {title}", "",
      "The schedules of the quality benchmark (below) priced in FLOPs (above), "
      "cheapest first by the last model's count. \"worst mean - reference\": "
      "over the models "
      f"({', '.join(problems)}) and both oracles, the lowest mean over seeds "
      f"({', '.join(map(str, seeds))}) of the schedule's score minus the "
      "reference's (power 5 every 5); a schedule holds the reference's quality "
      f"when that is at least -{quality.TOLERANCE}. " + note, "",
      _common.format_table(header, rows), ""])


def wall_section(d: dict) -> str:
  env, cfg = d["environment"], d["config"]
  rows = [(r["name"], _common.path_label(r), _x(r["flops_ratio_to_sam"]), r["step_ms"],
           _x(r["ratio_to_sam"]), _x(r["ratio_to_every_step"]),
           None if r.get("memory_minus_sam_params") is None
           else f"{r['memory_minus_sam_params']:.1f}")
          for r in d["rows"]]
  table = _common.format_table(
      ("variant", "path", "FLOPs x SAM", "step ms", "wall x SAM",
       "wall x every step", "memory - SAM's, x params"), rows)
  wall = [s for s in d["summary"] if s.startswith("wall")]
  return "\n".join([
      f"### {MODEL_NAMES[d['model']]}, batch {cfg['batch_size']}, {_where(env)}: "
      f"`{d['_file']}`", "",
      f"{cfg['model_description']}; jax {env['jax']}.", "",
      _command(d["command"]),
      f"Load average (1 min) at start / timing / end: {_load(env)}; "
      f"{cfg['rounds']} interleaved rounds of "
      f"{cfg.get('steps_per_sample', 1)} step(s) per sample (whole refresh "
      "periods), medians. "
      + "; ".join(wall) + ".", "", table, ""])


def wall_intro() -> str:
  return "\n".join([
      "## Wall time on CPU", "",
      "Wall-time ratios measured side by side in one process (interleaved "
      "rounds, so a busy machine slows every row alike), on a shared 2-core "
      "machine whose load is given with each table. \"host\": "
      "`refresh=refresh_due(step, k)`, two compiled steps. \"refresh=None\": "
      "one jitted step that follows the schedule by itself; on CPU the "
      "library compiles it to a step that computes the refresh at every step "
      "and keeps it on refresh steps only, because XLA:CPU runs the "
      "convolutions of a product inside `lax.cond` several times slower (on "
      "accelerators it stays a `lax.cond`, which skips the work). "
      "\"refresh=None, lax.cond\": the `lax.cond` program timed on CPU for "
      "comparison. \"wall x every step\": over the row refreshing every step "
      "with the same products. Memory: XLA's accounting of the compiled step "
      "(arguments + outputs + temporaries - aliased, the largest of a row's "
      "programs) minus SAM's, in units of the parameters' size.", ""])


def memory_section(d: dict) -> str:
  cfg = d["config"]
  lines = [
      "## Memory", "",
      f"XLA's `memory_analysis()` of the compiled training step, "
      f"{cfg['model']}, batch {cfg['batch_size']} "
      f"({cfg['param_count']:,} parameters, "
      f"{cfg['param_bytes'] / 2 ** 20:.1f} MiB), compiled on a CPU, in "
      "units of the parameters' size (the small batch makes the "
      "parameter-sized buffers, the part X-SAM adds whatever the batch, "
      "dominate); and the buffers live at the peak of each program's heap, "
      "from XLA's buffer assignment: the step's arguments (parameters, "
      "optimizer state, batch), temporaries of a parameter leaf's size in "
      "any layout (gradients, SAM point, products, estimator vectors, "
      "transposed kernel copies) and other temporaries (activations and "
      "their tangents). The state is donated, so outputs alias arguments.",
      "", _command(d["command"]), d["table"], ""]
  for label, r in d["results"].items():
    if label == "SAM":
      continue
    key = next(k for k in r["peak"] if k.startswith("parameter-"))
    items = "; ".join(f"`{what}` {size / cfg['param_bytes']:.2f}"
                      for what, size in r["peak"][key]["largest"][:4])
    lines.append(f"- {label}: largest parameter-sized temporaries at the "
                 f"peak (x params, by the JAX operation that made them): "
                 f"{items}.")
  return "\n".join(lines) + "\n"


def batch_memory_section(d: dict) -> str:
  """Memory of a step run's compiled programs (its full batch), x params."""
  cfg = d["config"]
  pb = cfg["param_bytes"]
  names = {"('sam',)": "SAM",
           "('xsam', 'plain', False)": "X-SAM step without refresh"}
  for r in d["rows"]:
    if r["optimizer"] == "xsam" and r["path"] == "host":
      s = r["schedule"]
      key = str(("xsam", (s["method"], s["num_iters"], s["fraction"],
                          s["product"]), True))
      product = {"hvp": "Hessian", "gn": "Gauss-Newton",
                 "fd": "finite differences"}[s["product"]]
      names.setdefault(key, f"X-SAM refresh step, {s['method']} "
                            f"{s['num_iters']}, {product}")
  sam = d["memory_xla"]["('sam',)"]
  rows = []
  for key, label in names.items():
    total, parts = d["memory_xla"].get(key), d["memory_breakdown"].get(key)
    if total is None or parts is None:
      continue
    rows.append((label, _x(total / pb), _x((total - sam) / pb),
                 _x(parts["argument"] / pb), _x(parts["temp"] / pb)))
  return "\n".join([
      f"### {MODEL_NAMES[d['model']]} at batch {cfg['batch_size']}", "",
      "The same accounting for the programs of the FLOP table's run (batch "
      f"{cfg['batch_size']}, compiled on a CPU), where activations and their "
      "tangents dominate.", "", _command(d["command"]),
      _common.format_table(("program", "XLA total x params", "- SAM's",
                            "arguments", "temporaries"), rows), ""])


def quality_section(d: dict, title: str) -> str:
  cfg = d["config"]
  subset = (f" Schedules matching `{cfg['only']}` and the reference."
            if cfg.get("only") else "")
  lines = [f"### {title}", "", _command(d["command"])]
  for name, r in d["results"].items():
    seeds = sorted(r["per_seed"], key=int)
    lines.append(f"- `{name}`: {r['description']}; large batch "
                 f"{r['large_batch_examples']} examples; seeds "
                 f"{', '.join(map(str, seeds))}")
  bar = next((h for h in (d.get("table") or "").split("\n")[0].split("|")
              if "reference" in h), "").strip()
  lines += ["", f"Trajectory: {cfg['steps']} steps of {cfg['trajectory']}; "
            f"oracle {cfg['oracle']}; scored every {cfg['score_stride']}th "
            "step. Cells: mean over seeds of the per-seed mean of "
            "|cos(v_t, u_t)| (range over seeds). The last column: the mean "
            "over seeds at least the reference's (power 5 every 5) on both "
            "oracles and every model"
            + (" minus 0.01" if "0.01" in bar else "") + "." + subset, ""]
  if not d.get("complete", True):
    lines += ["(Run stopped before every seed finished: the seeds above.)", ""]
  lines.append(d.get("table") or _table_of(d))
  return "\n".join(lines) + "\n"


def _quality_title(d: dict) -> str:
  rows = next(iter(d["results"].values()))["rows"]
  n = len(d["results"])
  if any(r["product"] == "gn" for r in rows):
    return (f"Hessian, Gauss-Newton and finite-difference products, {n} "
            "models")
  if any(r["name"].endswith(", no guard") for r in rows):
    seeds = len(next(iter(d["results"].values()))["per_seed"])
    return (f"Guarded finite-difference products beside exact ones, {n} "
            f"models, {seeds} seeds")
  return f"A wider sweep of Hessian schedules, {n} models ({d['environment']['time'][:10]})"


def _table_of(d: dict) -> str:
  import quality
  return quality.table(d["results"])


def fd_section(d: dict) -> str:
  """The step sweep along the top eigenvector, and the products along tracking."""
  steps = [str(h) for h in d["relative_steps"]] + ["default"]
  header = ["problem", "step", "dtype"] + [
      f"h_rel {h}" if h != "default" else "default" for h in steps]
  rows = []
  for name, r in d["results"].items():
    cells = {}
    for a in r["accuracy"]:
      if a["direction"] == "top eigenvector":
        cells.setdefault((a["point"], a["step"], a["dtype"]), {})[
            str(a["scale"])] = a["relative_error"]
    for (point, step, dtype), c in cells.items():
      rows.append([name, f"{step} ({point})", dtype]
                  + [f"{c[h]:.2g}" if h in c else "" for h in steps]
                  + ([f"{c['exact jvp']:.2g}"] if "exact jvp" in c else [""]))
  header.append("exact jvp in dtype")
  track = [(name, t["summary"]["refreshes"], f"{t['summary']['median_error']:.3f}",
            f"{t['summary']['p90_error']:.3f}", t["summary"]["crossed"],
            t["summary"]["crossed_rejected"], t["summary"]["rejected"],
            f"{t['summary']['max_accepted_error']:.2f}",
            f"{t['summary']['max_accepted_error_after_first']:.2f}")
           for name, r in d["results"].items()
           for t in [r["tracking"]]]
  cost = "; ".join(
      f"{name}: " + ", ".join(f"{k} {v['gradients']:.2f} gradients"
                              for k, v in r["cost"].items() if k != "gradient")
      for name, r in d["results"].items() if "cost" in r)
  return ("## Finite-difference products against the exact product\n\n"
          f"{_command(d['command'])}\n"
          f"Products: `{d['products']}`; step {d['step_size_rule']}; "
          "relative error `||FD - Hv|| / ||Hv||` along the top eigenvector "
          "(20 exact power steps) at three points of the quality benchmark's "
          "seed-0 trajectory, for relative steps `h_rel = h / max(1, "
          "||theta||)`. The bfloat16 rows compare with the float32 product; "
          "below bfloat16's resolution the shift rounds away in most "
          "parameters, and the product is zero (error 1) or made of the few "
          "smallest ones that moved (errors far above 1).\n\n"
          + _common.format_table(header, rows)
          + "\n\nAlong tracking (" + d["tracking"] + ", default step and "
            f"guard `max_growth={d['default_max_growth']}`): per refresh, the "
            "error of its product against the exact product of the same "
            f"vector; `crossed`: errors above {d.get('crossed', 3)} (a ReLU "
            "kink between `theta` and `theta + h v`); `rejected`: refreshes "
            "the guard turned down (a rejection also follows a real rise of "
            "the curvature, and costs that one refresh); the largest error "
            "of an accepted product, and of one after the first refresh "
            "(which multiplies a random vector).\n\n"
          + _common.format_table(
              ("problem", "refreshes", "median error", "90% error", "crossed",
               "crossed and rejected", "rejected", "largest accepted error",
               "after the first"),
              track)
          + (f"\n\nOne training step with one product per step, in "
             f"gradients (wall, {d['environment']['cpu_count']}-core CPU): "
             f"{cost}.\n" if cost else "\n"))


def refresh_memory_section(d: dict) -> str:
  rows = list(d["results"].items())
  return ("### Memory of one refresh, a dense MLP of "
          f"{d['config']['param_bytes'] / 2 ** 20:.1f} MiB of parameters\n\n"
          f"{_command(d['command'])}\n"
          + _common.format_table(("refresh", "memory - no refresh, x params"),
                                 rows) + "\n")


def estimator_section(d: dict) -> str:
  env = d["environment"]
  rows = [(name, r["median_ms"], r["ratio_to_gradient"],
           r.get("ratio_to_top_level_unrolled"))
          for name, r in d["results"].items()]
  return (f"## Estimators and control flow on CPU\n\n"
          f"{d['config']['model']}, batch "
          f"{'x'.join(map(str, d['config']['batch']))}, "
          f"{env['cpu_count']}-core {env['backend']} (jax {env['jax']}).\n\n"
          f"{_command(d.get('command', 'python benchmarks/estimators.py'))}\n"
          + _common.format_table(("what", "ms", "x gradient", "x plain twin"),
                                 rows) + "\n")


def compile_time_section(runs: list) -> str:
  """Compile and init time per parameter structure (all runs, in order)."""
  rows, hlo_rows, commands, envs = [], [], [], []
  for d in runs:
    commands.append(d["command"])
    envs.append(d["environment"])
    by_structure = {}
    for r in d["rows"]:
      by_structure.setdefault(r["structure"], {})[r["candidate"]] = r
    for name, c in by_structure.items():
      ref = c["contrib.sam"]
      ratio = lambda k, f="compile_ratio": _x(c[k][f]) if k in c else None
      xsam = c.get("xsam refresh (host)", ref)
      rows.append((name, ref["leaves"], _x(ref["compile_s"]),
                   ratio("sam"), ratio("unguarded X-SAM refresh"),
                   ratio("xsam refresh (host)"),
                   ratio("xsam plain (host)"), ratio("xsam refresh=None"),
                   ratio("eigen_sam_ascent refresh"),
                   ratio("xsam lanczos refresh"), _x(xsam["init_s"])))
      hlo_rows.append((name, ref["leaves"], ref["hlo_instructions"],
                       ratio("sam", "hlo_ratio"),
                       ratio("unguarded X-SAM refresh", "hlo_ratio"),
                       ratio("xsam refresh (host)", "hlo_ratio"),
                       ratio("xsam plain (host)", "hlo_ratio"),
                       ratio("xsam refresh=None", "hlo_ratio"),
                       ratio("eigen_sam_ascent refresh", "hlo_ratio"),
                       ratio("xsam lanczos refresh", "hlo_ratio")))
  where = "; ".join(sorted({f"{_where(e)}, jax {e['jax']}, load {_load(e)}"
                            for e in envs}))
  head = ("structure", "leaves", "contrib.sam s", "sam x", "floor x",
          "xsam refresh x",
          "xsam plain x", "refresh=None x", "eigen-SAM x", "Lanczos 4 x")
  return ("## Compile time and parameter leaves\n\n"
          "The first step waits for XLA to compile it, and that grows with the "
          "number of parameter leaves (the transforms work leaf by leaf), "
          "hardly with their size. Each program is a whole jitted training "
          "step; `x` columns are multiples of `optax.contrib.sam`'s step on "
          "the same tree, measured in one process; `floor` is an X-SAM "
          "refresh step's arithmetic written plainly, without the library's "
          "guards and checks (`unguarded_xsam_refresh` in the script): the "
          "gradient, the Hessian-vector product and the gradient at the SAM "
          "point that any X-SAM refresh step compiles. `init s` is the eager "
          "`xsam(...).init` after clearing JAX's caches. Synthetic trees are "
          "`n` (4, 3) tanh layers; ResNets and the transformer encoder "
          f"(12 layers) use a batch of 2. Measured on {where}.\n\n"
          + "".join(_command(c) for c in commands) + "\n"
          + _common.format_table(head + ("xsam init s",), rows)
          + "\n\nThe same programs' optimised HLO, in instructions "
            "(deterministic, unlike wall time; `tests/test_compile_growth.py` "
            "checks that it grows linearly with the leaves):\n\n"
          + _common.format_table(
              ("structure", "leaves", "contrib.sam") + head[3:], hlo_rows)
          + "\n")


def _merged_flops(runs: list) -> dict:
  """The run with the most rows, with the rows only the other runs have."""
  runs = sorted(runs, key=lambda d: len(d["rows"]), reverse=True)
  merged = dict(runs[0], rows=list(runs[0]["rows"]))
  names = {r["name"] for r in merged["rows"]}
  for d in runs[1:]:
    extra = [r for r in d["rows"] if r["name"] not in names
             and (r["path"] == "host" or r["optimizer"] != "xsam")]
    if extra:
      merged["rows"] += extra
      names |= {r["name"] for r in extra}
      merged["command"] += "\n" + d["command"]
  return merged


def page(results_dir: str) -> str:
  runs = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path) as f:
      d = json.load(f)
    d["_file"] = os.path.basename(path)
    if not d.get("smoke"):
      runs.setdefault(d.get("benchmark"), []).append(d)
  by_model = {}
  for d in runs.get("step_overhead", []):
    if "model" in d:
      by_model.setdefault(d["model"], []).append(d)
  # FLOPs from each model's run with the most rows, plus the rows only
  # smaller runs priced (their commands listed too); wall from every run.
  steps = {m: _merged_flops(ds) for m, ds in by_model.items()}
  out = ["# Performance", "",
         "Every number on this page is written by a script in `benchmarks/` "
         "into `benchmarks/results/`, and the page by `python "
         "benchmarks/report.py`; the command above each table reruns it from "
         "the repository root. Ratios are measured side by side in one "
         "process; nothing here is timed in a test.", ""]
  if steps:
    out.append(answer_section(steps, runs))
  out += [
         "The library's default schedule is `power 1 every 2` (one power "
         "step on the Hessian every 2 steps): the cheapest Hessian schedule "
         "that holds the paper's tracking quality on every model below "
         "(\"Cost at the reference's quality\"). The paper's schedule is "
         "`power 5 every 5` (`method=\"power\", num_iters=5, "
         "update_every=5`), one product on every step `power 1 every 1` "
         "(`update_every=1`), and the cheapest recipe that holds the quality "
         "is `power 1 every 2, Gauss-Newton` (`curvature_fn=gauss_newton_fn"
         "(...)`, for a loss convex in the model's outputs).", ""]
  if steps:
    out.append(flops_section(steps))
  scored = [d for d in runs.get("quality", [])
            if any(r["product"] == "gn"
                   for r in next(iter(d["results"].values()))["rows"])]
  guarded = sorted((d for d in runs.get("quality", [])
                    if _quality_title(d).startswith("Guarded")),
                   key=lambda d: d["environment"]["time"], reverse=True)
  if steps and scored:
    # Finite-difference rows from the run of the guarded products, if any.
    out.append(choice_section(steps, scored[0],
                              skip_products=("fd",) if guarded else ()))
  if steps and guarded:
    out.append(choice_section(
        steps, guarded[0],
        title="Finite-difference products: cost at the reference's quality",
        note="Finite-difference rows: `curvature_fn=finite_difference_fn("
             "grad_fn, grads)` with its default step and guard, also "
             "unguarded (`max_growth=None`) and with a looser guard "
             "(`max_growth=8`), which cost what the default does. The "
             "finite-difference rows of the older quality runs further down "
             "used a 35 times larger step and no guard."))
  timed = [d for m in MODELS for d in by_model.get(m, []) if d["timings"]]
  if timed:
    out.append(wall_intro())
    out += [wall_section(d) for d in timed]
  for d in runs.get("step_memory", []):
    out.append(memory_section(d))
  if "resnet18" in steps and steps["resnet18"].get("memory_breakdown"):
    out.append(batch_memory_section(steps["resnet18"]))
  for d in runs.get("refresh_memory", []):
    out.append(refresh_memory_section(d))
  # Newest run first.
  quality = sorted(runs.get("quality", []),
                   key=lambda d: d["environment"]["time"], reverse=True)
  if quality:
    out += ["## Eigenvector quality", "",
            "How well the vector each schedule holds at every step tracks the "
            "top eigenvector of the Hessian of the step's batch loss (vs "
            "batch) and of a large batch (vs large), along one fixed SAM "
            "trajectory per seed (`benchmarks/quality.py`). Gauss-Newton "
            "schedules are scored against the same Hessian oracles.", ""]
    for d in quality:
      out.append(quality_section(d, _quality_title(d)))
  for d in runs.get("fd_accuracy", []):
    out.append(fd_section(d))
  for d in runs.get("estimators", []):
    out.append(estimator_section(d))
  if runs.get("compile_time"):
    out.append(compile_time_section(runs["compile_time"]))
  return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--results", default=os.path.join(HERE, "results"))
  p.add_argument("--out", default=os.path.join(HERE, os.pardir, "docs",
                                               "performance.md"),
                 help="the page to write; - prints it")
  args = p.parse_args(argv)
  text = page(args.results)
  if args.out == "-":
    print(text, end="")
  else:
    with open(args.out, "w") as f:
      f.write(text)
    print(f"wrote {os.path.normpath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
