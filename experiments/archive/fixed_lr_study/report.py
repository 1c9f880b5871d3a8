"""Summarises the study's per-run JSON: ``summary.md`` (mean +- std) and ``study.png``.

Example (shell)::

  python experiments/report.py --results experiments/results
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

import numpy as np

# Table order; optimizers not listed here follow in alphabetical order.
ORDER = ("sgd", "sam", "xsam", "xsam_si", "eigensam", "xsam_a0", "xsam_a0.05", "xsam_a0.1",
         "xsam_a0.5")
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "xsam": "X-SAM (reference rule, alpha 0.2)",
    "xsam_si": "X-SAM (sign-invariant, alpha 0.2)",
    "eigensam": "Eigen-SAM (alpha 0.2, refresh every 5)",
    "xsam_a0.05": "X-SAM alpha 0.05",
    "xsam_a0.1": "X-SAM alpha 0.1",
    "xsam_a0.5": "X-SAM alpha 0.5",
    "xsam_a0": "X-SAM alpha 0 (control: normalised SAM, no correction)",
}
COLUMNS = (
    ("test_accuracy", "test acc (%)", 100.0, "{:.2f}"),
    ("top_eigenvalue", "lambda_max", 1.0, "{:.3g}"),
    ("hutchinson_trace", "trace (Hutchinson)", 1.0, "{:.3g}"),
    ("mean_cos_angle", "mean cos(g,v)", 1.0, "{:.3f}"),
    ("mean_abs_cos_angle", "mean abs cos(g,v)", 1.0, "{:.3f}"),
    ("final_grad_norm", "grad norm (last epoch)", 1.0, "{:.3g}"),
    ("wall_seconds", "wall s", 1.0, "{:.1f}"),
)


def load_runs(results_dir: str) -> list[dict[str, Any]]:
  """All per-run records (``*__*__seed*.json``) under ``results_dir``."""
  runs = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*__*__seed*.json"))):
    with open(path, encoding="utf-8") as f:
      runs.append(json.load(f))
  return runs


def _order(names):
  return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def group(runs):
  """``{dataset: {optimizer: [results, ...]}}`` in table order."""
  out: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for r in runs:
    out.setdefault(r["dataset"], {}).setdefault(r["optimizer"], []).append(r)
  return {d: {o: sorted(v[o], key=lambda r: r["seed"]) for o in _order(v)}
          for d, v in sorted(out.items())}


def _cell(values, scale, fmt):
  values = [v for v in values if v is not None]  # Fields absent from older records too.
  if not values:
    return "-"
  a = scale * np.asarray(values, float)
  if len(a) == 1:
    return fmt.format(a[0])
  return f"{fmt.format(a.mean())} ± {fmt.replace('+', '').format(a.std(ddof=1))}"


# Paired tables: against SAM, and against X-SAM without the correction (alpha 0),
# which separates the correction from X-SAM's unit-norm direction.
PAIRED_AGAINST = ("sam", "xsam_a0")


def _paired_table(by_opt, ref: str) -> list[str]:
  """Per-seed differences against ``ref`` (same initialisation and data order)."""
  name = LABELS.get(ref, ref)
  lines = ["", f"Paired by seed against {name}: difference mean ± std, and in how many "
           f"seeds lambda_max is below {ref}'s.", "",
           "| optimizer | n | Δ test acc (pp) | Δ lambda_max | lambda_max below | Δ trace |",
           "|---|---|---|---|---|---|"]
  base = {r["seed"]: r["results"] for r in by_opt[ref]}
  for opt, rs in by_opt.items():
    paired = [(r["results"], base[r["seed"]]) for r in rs if r["seed"] in base]
    if opt == ref or not paired:
      continue
    d_acc = [100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in paired]
    d_eig = [a["top_eigenvalue"] - b["top_eigenvalue"] for a, b in paired]
    d_tr = [a["hutchinson_trace"] - b["hutchinson_trace"] for a, b in paired]
    below = sum(d < 0 for d in d_eig)
    lines.append(f"| {LABELS.get(opt, opt)} | {len(paired)} | {_cell(d_acc, 1, '{:+.2f}')} | "
                 f"{_cell(d_eig, 1, '{:+.3g}')} | {below}/{len(paired)} | "
                 f"{_cell(d_tr, 1, '{:+.3g}')} |")
  return lines


def format_summary(runs) -> str:
  """The markdown summary: one table per dataset, mean ± std (ddof=1) over seeds."""
  lines = ["# Reproduction study: summary", ""]
  grouped = group(runs)
  if runs:
    c = runs[0]["config"]
    m = c["measurement"]
    lines += [
        f"Model {c['model']}, {c['epochs']} epochs (batch {c['batch_size']}, last partial batch "
        f"dropped; steps per dataset below), SGD momentum {c['base']['momentum']}, weight decay "
        f"{c['base']['weight_decay']}, cosine schedule from lr {c['base']['peak_lr']}; "
        "rho 0.05, eigenvector refresh every 5 steps with 5 power iterations. "
        f"lambda_max: Lanczos ({m['lanczos_iters']} products) and trace: Hutchinson "
        f"({m['hutchinson_probes']} Rademacher probes), both on the {m['batch']}, after the "
        "last epoch. Cells: mean ± std (ddof 1) over seeds (n = count). Wall s: the whole run "
        "(training, evaluation, final measurement; the first seed of each row also pays the "
        "compilation, later seeds hit the persistent cache) on a shared, loaded 2-core CPU, "
        "so only roughly comparable.",
        ""]
  for dataset, by_opt in grouped.items():
    c = next(iter(by_opt.values()))[0]["config"]
    lines += [f"## {dataset}", "",
              f"{c['train_examples']} training / {c['test_examples']} test examples, "
              f"{c['steps_per_epoch']} steps per epoch, {c['total_steps']} steps.", "",
              "| optimizer | n | " + " | ".join(c[1] for c in COLUMNS) + " |",
              "|---|---|" + "---|" * len(COLUMNS)]
    for opt, rs in by_opt.items():
      cells = [_cell([r["results"].get(k) for r in rs], s, f) for k, _, s, f in COLUMNS]
      lines.append(f"| {LABELS.get(opt, opt)} | {len(rs)} | " + " | ".join(cells) + " |")
    for ref in PAIRED_AGAINST:
      if ref in by_opt:
        lines += _paired_table(by_opt, ref)
    worst = max(r["results"]["lanczos_residual"] / max(abs(r["results"]["top_eigenvalue"]), 1e-12)
                for rs in by_opt.values() for r in rs)
    lines += ["", f"Largest relative Lanczos residual ||Hv - lambda v|| / |lambda|: {worst:.2g}.",
              ""]
  commands = sorted({r["command"] for r in runs})
  lines += ["## Commands", "", "Produced by:", ""] + [f"    {c}" for c in commands] + [""]
  return "\n".join(lines)


def plot(runs, path: str) -> None:
  """Test accuracy against lambda_max, one point per run, one panel per dataset."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  grouped = group(runs)
  fig, axes = plt.subplots(1, max(1, len(grouped)), figsize=(6 * max(1, len(grouped)), 4.5),
                           squeeze=False)
  names = _order({r["optimizer"] for r in runs})
  colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
  for ax, (dataset, by_opt) in zip(axes[0], grouped.items()):
    for opt, rs in by_opt.items():
      eig = [r["results"]["top_eigenvalue"] for r in rs]
      acc = [100 * r["results"]["test_accuracy"] for r in rs]
      ax.scatter(eig, acc, color=colors[opt], label=LABELS.get(opt, opt), alpha=0.8, s=28)
      ax.scatter([np.mean(eig)], [np.mean(acc)], color=colors[opt], marker="X", s=120,
                 edgecolors="black")
    ax.set_title(f"{dataset}: one dot per seed, X = mean")
    ax.set_xlabel("final top Hessian eigenvalue (Lanczos)")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  """Writes ``summary.md`` and ``study.png`` next to the JSON; returns the exit status."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--results", default=os.path.join("experiments", "results"))
  args = p.parse_args(argv)
  runs = load_runs(args.results)
  if not runs:
    print(f"no run JSON under {args.results}", file=sys.stderr)
    return 1
  summary = format_summary(runs)
  with open(os.path.join(args.results, "summary.md"), "w", encoding="utf-8") as f:
    f.write(summary)
  plot(runs, os.path.join(args.results, "study.png"))
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
