"""What holds the memory of X-SAM's training step next to SAM's, from XLA's buffer assignment.

Why this score: whether X-SAM fits where SAM fits is decided by the peak
memory of its compiled training step. XLA's ``memory_analysis()`` gives the
totals (arguments, outputs, temporaries, aliased); XLA's own buffer
assignment (``--xla_dump_to``: the live ranges at the peak of the step's
heap) says which buffers are live at that peak. This compiles, for
CIFAR-style ResNet-18 (``_resnet.py``) on a CPU, the CLI's training step
(``_steps.py``) for SAM and for X-SAM's three programs: the step with one
Hessian-vector power step (the refresh step of every Hessian schedule, and
the whole step when it refreshes every step), the same with a Gauss-Newton
product, and the step without a refresh. Each program's totals are reported
in units of the parameters' size, and the buffers live at its peak grouped
into the step's arguments (parameters, optimizer state, batch), temporaries
of a parameter leaf's size in any layout (gradients, the SAM point,
products, estimator vectors, transposed kernel copies) and other
temporaries (activations and their tangents, which grow with the batch),
each with the JAX operations that made the largest of them.

The default batch of 2 makes the parameter-sized buffers dominate, which is
the part X-SAM adds whatever the batch; ``--batch-size 256`` shows the
activations' share.

Usage, from the repository root::

  python benchmarks/step_memory.py --json benchmarks/results/step-memory-resnet18-cpu2.json
  python benchmarks/step_memory.py --smoke   # a 2-stage ResNet, SAM and one X-SAM step

Not a test: nothing here asserts a size.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

PROGRAMS = {
    "SAM": ("sam", None),
    "X-SAM refresh step, power 1, Hessian": ("xsam", ("power", 1, "hvp")),
    "X-SAM refresh step, power 1, Gauss-Newton": ("xsam", ("power", 1, "gn")),
    "X-SAM step without refresh": ("xsam", "plain"),
}

KINDS = ("arguments", "parameter-sized temporaries", "other temporaries")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(")
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")
_PEAK = re.compile(r"^\s+([\w.\-]+)\{([^}]*)\}: (\d+) bytes")


def _elements(shape: str, index: str) -> int | None:
  """Elements of the value at tuple ``index`` (e.g. ``"1"``) of an HLO ``shape``."""
  arrays = re.findall(r"\w+\[([\d,]*)\]", shape)
  if not arrays:
    return None
  i = int(index.split(",")[0]) if index and shape.startswith("(") else 0
  if i >= len(arrays):
    return None
  n = 1
  for d in arrays[i].split(","):
    n *= int(d) if d else 1
  return n


def parse_dump(prefix: str) -> tuple[dict, list[tuple[str, str, int]]]:
  """Instructions ``{name: (shape, opcode, op_name)}`` and the peak's live values.

  A live value is ``(instruction, tuple index, bytes)``.
  """
  instructions = {}
  with open(prefix + ".cpu_after_optimizations.txt") as f:
    for line in f:
      m = _INSTRUCTION.match(line)
      if m:
        op = _OP_NAME.search(line)
        instructions[m.group(1)] = (m.group(2), m.group(3),
                                    op.group(1) if op else "")
  peak, inside = [], False
  with open(prefix + ".cpu_after_optimizations-live-range.txt") as f:
    for line in f:
      if "(peak):" in line:
        inside = True
        continue
      if inside:
        m = _PEAK.match(line)
        if not m:
          break
        peak.append((m.group(1), m.group(2), int(m.group(3))))
  return instructions, peak


def _short(op_name: str) -> str:
  """The op_name's path without the jit wrapper, cut to its last 3 parts."""
  parts = [p for p in op_name.split("/") if not p.startswith("jit(")]
  return "/".join(parts[-3:]) or "(no op_name)"


def classify(instructions, peak, param_sizes: set) -> dict:
  """Bytes live at the peak by kind, with the largest producers of each.

  A temporary is parameter-sized when its element count is that of a
  parameter leaf, in any layout (XLA:CPU keeps transposed copies of
  convolution kernels).
  """
  kinds = collections.defaultdict(int)
  producers = collections.defaultdict(collections.Counter)
  for name, index, size in peak:
    shape, opcode, op_name = instructions.get(name, ("", "", ""))
    if opcode == "parameter":
      kind = "arguments"
    elif _elements(shape, index) in param_sizes:
      kind = "parameter-sized temporaries"
    else:
      kind = "other temporaries"
    kinds[kind] += size
    what = (name.rsplit(".", 1)[0] if kind == "arguments"
            else f"{_short(op_name)} ({opcode})")
    producers[kind][what] += size
  return {kind: {"bytes": kinds[kind],
                 "largest": producers[kind].most_common(6)}
          for kind in KINDS}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch-size", type=int, default=2)
  p.add_argument("--smoke", action="store_true",
                 help="a 2-stage ResNet on 8x8 images, SAM and X-SAM's refresh "
                      "step: checks the script end to end")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  dump = tempfile.mkdtemp(prefix="xsam-step-memory-")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # XLA's dumps of each compiled step (passed to the compilation itself, so it
  # works in a process whose backend is already running).
  dump_options = {"xla_dump_to": dump, "xla_dump_hlo_module_re": ".*train_step.*"}
  import jax

  from xsam_optax.train import loop

  import _common
  import _resnet
  import _schedules
  import _steps

  env = _common.environment()
  key = jax.random.key(0)
  side = 8 if args.smoke else 32
  x = jax.random.normal(key, (args.batch_size, side, side, 3))
  y = jax.random.randint(key, (args.batch_size,), 0, 10)
  model = _resnet.resnet18(10, **(_resnet.SMOKE if args.smoke else {}))
  variables = loop.init_variables(model, x, seed=0)
  params = variables["params"]
  param_bytes = _steps.param_bytes(params)
  param_sizes = {int(a.size) for a in jax.tree.leaves(params)}
  results = {}
  programs = dict(list(PROGRAMS.items())[:2]) if args.smoke else PROGRAMS
  for label, (opt, program) in programs.items():
    if opt == "sam":
      row, keyed = _steps.Row("SAM", "sam"), ("sam",)
    elif program == "plain":
      row = _steps.Row("plain", "xsam", _schedules.Schedule("power", 1, 2))
      keyed = ("xsam", "plain", False)
    else:
      method, num_iters, product = program
      s = _schedules.Schedule(method, num_iters, 1, product=product)
      row, keyed = _steps.Row(label, "xsam", s), ("xsam", s.program, True)
    state = _steps.init_state(model, row, x, seed=0, learning_rate=0.05,
                              variables=variables)
    before = set(glob.glob(os.path.join(dump, "*")))
    compiled = _steps.lower(model, row, keyed, state, x, y, 0.05).compile(
        compiler_options=dump_options)
    new = sorted(set(glob.glob(os.path.join(dump, "*jit_train_step*"
                                            "cpu_after_optimizations.txt")))
                 - before)
    prefix = new[-1][:-len(".cpu_after_optimizations.txt")]
    instructions, peak = parse_dump(prefix)
    totals = _steps.memory_breakdown(compiled)
    results[label] = {
        "memory_analysis_bytes": totals,
        "xla_bytes": _steps.xla_bytes(compiled),
        "peak_live_bytes": sum(size for _, _, size in peak),
        "peak": classify(instructions, peak, param_sizes)}
    print(f"# {label}: {results[label]['xla_bytes'] / param_bytes:.2f} x "
          "params", flush=True)
  sam = results["SAM"]["xla_bytes"]
  header = ("program", "XLA total x params", "- SAM's", "arguments",
            "outputs", "aliased", "temporaries", "at the peak: arguments",
            "param-sized temps", "other temps")
  rows = []
  for label, r in results.items():
    t, pk = r["memory_analysis_bytes"], r["peak"]
    u = lambda b: b / param_bytes
    rows.append((label, u(r["xla_bytes"]), u(r["xla_bytes"] - sam),
                 u(t["argument"]), u(t["output"]), u(t["alias"]), u(t["temp"]),
                 u(pk["arguments"]["bytes"]),
                 u(pk["parameter-sized temporaries"]["bytes"]),
                 u(pk["other temporaries"]["bytes"])))
  table = _common.format_table(header, rows)
  print(table)
  for label, r in results.items():
    for kind in KINDS[1:]:
      print(f"\n{label}: largest {kind} at the peak")
      for what, size in r["peak"][kind]["largest"]:
        print(f"  {size / param_bytes:.2f} x params  {what}")
  if args.json:
    _common.write_json(args.json, {
        "benchmark": "step_memory", "smoke": args.smoke,
        "command": _common.command("step_memory", argv),
        "environment": env,
        "config": {"model": "CIFAR-style ResNet-18 (BasicBlock 2-2-2-2, "
                            "BatchNorm)", "batch_size": args.batch_size,
                   "param_bytes": param_bytes,
                   "param_count": int(sum(a.size for a in
                                          jax.tree.leaves(params))),
                   "step": "xsam_optax.train.loop.make_train_step, state "
                           "donated; SGD momentum 0.9, weight decay 5e-4"},
        "results": results, "table": table})
  return 0


if __name__ == "__main__":
  sys.exit(main())
