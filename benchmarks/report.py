"""Markdown for the README's "Performance" section, from the benchmark JSON.

Reads ``benchmarks/results/*.json`` written by ``step_overhead.py`` (and
``estimators-*.json`` from ``estimators.py``) and prints our rows next to the
reference numbers measured for XSAM.md (H100, CIFAR-style ResNet-18, batch
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
  head = (f"#### {cfg['model_description']}, batch {cfg['batch_size']}, "
          f"{where} (jax {env['jax']})\n\n"
          f"`{d.get('command', 'python benchmarks/step_overhead.py')}`"
          f"{'' if d.get('complete', True) else ' (timings only)'}\n")
  rows = []
  sam_bytes = next(r["memory_total_bytes"] for r in d["rows"]
                   if r["name"] == "SAM")
  for r in d["rows"]:
    q = r.get("quality_warm_mean")
    q2 = r.get("quality_second_half_mean")
    # Host-chosen rows vary the lax.cond row above them.
    name = ("↳ " + r["name"]) if r.get("mode") == "host" else r["name"]
    extra = r.get("memory_total_bytes")
    extra = None if extra is None or r["optimizer"] != "xsam" else (
        (extra - sam_bytes) / cfg["param_bytes"])
    rows.append((name, r["step_ms"], r["ratio_to_sam"],
                 r.get("refresh_cost_gradients"),
                 None if q is None else
                 f"{q:.2f} / {'-' if q2 is None else f'{q2:.2f}'}",
                 None if extra is None else f"{extra:.0f}"))
  table = _common.format_table(
      ("variant", "step ms", "x SAM", "refresh, gradients",
       "|cos(v,v*)| warm / 2nd half", "memory - SAM's, x params"), rows)
  lines = [head, table, ""]
  lines.append(
      f"One HVP costs {d['hvp_full_batch_gradients']:.2f} gradients on the "
      f"full batch, {d['hvp_quarter_batch_gradients']:.2f} on a quarter; "
      f"a SAM step {d['sam_ms'] / d['gradient_ms']:.2f} gradients. Memory: "
      f"XLA's accounting of the compiled step (the refresh step for "
      f"host-chosen rows) minus SAM's step, in units of the parameters' "
      f"size ({cfg['param_bytes'] / 2**20:.2g} MiB).")
  gn = d.get("gauss_newton")
  if gn and "warm_mean" in gn:
    lines.append(
        f"A Gauss-Newton product (`gauss_newton_fn`) costs "
        f"{gn['matvec_gradients']:.2f} gradients; its converged top "
        f"eigenvector has median |cos| "
        f"{sorted(gn['converged_gn_vs_hessian'])[len(gn['converged_gn_vs_hessian']) // 2]:.2f} "
        f"with the Hessian's.")
  return "\n".join(lines) + "\n"


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
  for path in sorted(glob.glob(os.path.join(here, "*.json"))):
    with open(path) as f:
      d = json.load(f)
    if d.get("smoke"):
      continue
    if d.get("benchmark") == "step_overhead":
      out.append(step_section(d))
    elif d.get("benchmark") == "estimators":
      out.append(estimator_section(d))
  print("\n".join(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
