"""Markdown for the README's "Performance" section, from the benchmark JSON.

Reads ``benchmarks/results/*.json`` written by ``quality.py``,
``step_overhead.py``, ``fd_accuracy.py`` and ``estimators.py``, and prints
their tables (eigenvector quality first) after the reference numbers
measured for XSAM.md (H100, CIFAR-style ResNet-18, batch
256, fp32, synthetic data)::

  python benchmarks/report.py > /tmp/performance.md
"""

from __future__ import annotations

import glob
import json
import os
import sys

import _common

# XSAM.md, "Measured anchors" (H100, 2026-11-27).
REFERENCE = [
    ("reference PyTorch: SGD / SAM", "14.1 / 31.2", None),
    ("reference PyTorch: X-SAM, refresh every 5", "96.3", 3.08),
    ("reference PyTorch: X-SAM, refresh every 3", "141.2", 4.20),
    ("plain JAX: SGD / SAM", "7.9 / 17.0", None),
    ("plain JAX: X-SAM every 5, lax.cond", "34.4", 2.02),
    ("plain JAX: X-SAM every 5, host-chosen", "30.6", 1.80),
]
REFERENCE_REFRESH = ("one refresh (5 HVPs): 23.4 gradients in the reference "
                     "(double backward), 10.2 in plain JAX (unrolled), 12.2 "
                     "with lax.fori_loop; one HVP 2.35 gradients on the full "
                     "batch, 1.09 on a quarter")


def step_section(d) -> str:
  env, cfg = d["environment"], d["config"]
  where = (f"{env['device_kind']}" if env["backend"] == "gpu"
           else f"{env['cpu_count']}-core CPU")
  head = (f"#### Step cost: {cfg['model_description']}, batch "
          f"{cfg['batch_size']}, {where} (jax {env['jax']})\n\n"
          f"`{d.get('command', 'python benchmarks/step_overhead.py')}`\n")
  rows = []
  for r in d["rows"]:
    path = ("refresh=None" if r["path"] == "none" else
            ("host" if r["optimizer"] == "xsam" else "-"))
    if r["optimizer"] == "xsam" and r["schedule"]["update_every"] == 1:
      path = "both (no cond)"
    mem = r.get("memory_minus_sam_params")
    rows.append((r["name"], path, r["step_ms"], r["ratio_to_sam"],
                 None if mem is None else f"{mem:.0f}"))
  table = _common.format_table(
      ("variant", "path", "step ms", "x SAM", "memory - SAM's, x params"), rows)
  notes = " ".join(d.get("summary", []))
  return "\n".join([head, table, "", notes + ". \"host\": `refresh="
                    "refresh_due(step, k)`; \"refresh=None\": one jitted step "
                    "(`lax.cond` for periodic refreshes). Memory: XLA's "
                    "accounting of the compiled step (the refresh step for "
                    "host rows) minus SAM's."]) + "\n"


def quality_section(d) -> str:
  cfg = d["config"]
  subset = (f", schedules matching `{cfg['only']}` and the reference"
            if cfg.get("only") else "")
  lines = [f"#### Eigenvector quality: |cos(v_t, u_t)| at every "
           f"{cfg['score_stride']}th step{subset}",
           "", f"`{d['command']}`", ""]
  for name, r in d["results"].items():
    lines.append(f"- `{name}`: {r['description']}; large batch "
                 f"{r['large_batch_examples']} examples")
  lines += ["", f"Trajectory: {cfg['steps']} steps of {cfg['trajectory']}; seeds "
            f"{cfg['seeds']}; oracle {cfg['oracle']}. Cells: mean over seeds "
            "of the per-seed mean (range over seeds). \"all >= reference\": "
            "the mean over seeds at least the reference's on both oracles and "
            "both models.", ""]
  lines.append(d.get("table") or "(incomplete)")
  return "\n".join(lines) + "\n"


def fd_section(d) -> str:
  rows = []
  for name, r in d["results"].items():
    for a in r["accuracy"]:
      if a["direction"] == "top eigenvector":
        rows.append((name, a["point"], a["dtype"], a["scale"],
                     a["relative_error"], a["abs_cos"]))
  cost = "; ".join(
      f"{name}: " + ", ".join(f"{k} {v['gradients']:.2f} gradients"
                              + (f" ({v['convolutions']} convolutions)"
                                 if v.get("convolutions") else "")
                              for k, v in r["cost"].items() if k != "gradient")
      for name, r in d["results"].items())
  return ("#### Finite-difference products against the exact product\n\n"
          f"`{d['command']}`; {d['step_size_rule']}\n\n"
          + _common.format_table(("problem", "point", "dtype", "scale",
                                  "rel. error", "|cos|"), rows)
          + f"\n\nOne training step with one product per step, in gradients: {cost}.\n")


def memory_section(d) -> str:
  """A ``step_overhead.py --no-timing`` run: XLA's memory of each step only."""
  cfg = d["config"]
  rows = [(r["name"], "refresh=None" if r["path"] == "none" else
           ("host" if r["optimizer"] == "xsam" else "-"),
           None if r.get("memory_minus_sam_params") is None
           else f"{r['memory_minus_sam_params']:.2f}")
          for r in d["rows"]]
  return (f"#### Step memory: {cfg['model_description']}, batch "
          f"{cfg['batch_size']}, compiled on CPU\n\n`{d['command']}`\n\n"
          + _common.format_table(("variant", "path", "memory - SAM's, x params"),
                                 rows)
          + f"\n\n{cfg['param_count']:,} parameters ({' '.join(d['summary'])}). "
          "XLA's accounting of each compiled step (arguments + outputs + "
          "temporaries - aliased, state donated) minus SAM's step, in units of "
          "the parameters' size; the refresh step for host rows.\n")


def refresh_memory_section(d) -> str:
  rows = list(d["results"].items())
  return ("#### Memory of one refresh, a dense MLP of "
          f"{d['config']['param_bytes'] / 2 ** 20:.1f} MiB of parameters\n\n"
          f"`{d['command']}`\n\n"
          + _common.format_table(("refresh", "memory - no refresh, x params"),
                                 rows) + "\n")


def estimator_section(d) -> str:
  env = d["environment"]
  rows = [(name, r["median_ms"], r["ratio_to_gradient"],
           r.get("ratio_to_top_level_unrolled"))
          for name, r in d["results"].items()]
  return (f"#### Estimators, {d['config']['model']}, batch "
          f"{'x'.join(map(str, d['config']['batch']))}, "
          f"{env['cpu_count']}-core {env['backend']} (jax {env['jax']})\n\n"
          f"`{d.get('command', 'python benchmarks/estimators.py')}`\n\n"
          + _common.format_table(("what", "ms", "x gradient", "x plain twin"),
                                 rows) + "\n")


def main() -> int:
  here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  out = ["### Performance", "",
         "Reference numbers (XSAM.md; H100, CIFAR-style ResNet-18, batch 256, "
         "fp32, synthetic data):", "",
         _common.format_table(("", "step ms", "x SAM"), REFERENCE), "",
         REFERENCE_REFRESH + ".", ""]
  order = {"quality": 0, "step_overhead": 1, "refresh_memory": 2,
           "fd_accuracy": 3, "estimators": 4}

  def rank(path):
    with open(path) as f:
      return order.get(json.load(f).get("benchmark"), 9), path

  for path in sorted(glob.glob(os.path.join(here, "*.json")), key=rank):
    with open(path) as f:
      d = json.load(f)
    if d.get("benchmark") == "step_overhead" and d.get("timings") is None:
      out.append(memory_section(d))
      continue
    if d.get("smoke"):
      continue
    if d.get("benchmark") == "step_overhead":
      out.append(step_section(d))
    elif d.get("benchmark") == "quality":
      out.append(quality_section(d))
    elif d.get("benchmark") == "refresh_memory":
      out.append(refresh_memory_section(d))
    elif d.get("benchmark") == "fd_accuracy":
      out.append(fd_section(d))
    elif d.get("benchmark") == "estimators":
      out.append(estimator_section(d))
  print("\n".join(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
