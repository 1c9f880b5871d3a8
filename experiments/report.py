"""Summarises the tuned study: per-method rate chosen on validation, then test numbers.

For each (setting, method) the peak learning rate with the highest mean
validation accuracy over seeds (final epoch) is chosen; test accuracy and
lambda_max are reported at that rate (mean ± std over seeds), with paired
differences against SAM at SAM's chosen rate: mean and 95% t-interval over
seeds, and in how many seeds the method beats SAM. The whole grid (mean
validation and test accuracy and lambda_max per rate) follows. Writes
``summary.md``, ``grid.png`` (validation accuracy against the rate) and
``tuned.png`` (test accuracy against lambda_max at the chosen rates).

Example (shell)::

  python experiments/report.py --results experiments/results
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from typing import Any

import numpy as np

ORDER = ("sgd", "sam", "xsam", "xsam_a0", "xsam_nn", "xsam_si", "eigensam", "xsam_pow",
         "xsam_nn_pow", "xsam_si_pow", "eigensam_pow")
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "xsam": "X-SAM reference (normalised)",
    "xsam_a0": "control: normalised, alpha 0",
    "xsam_nn": "X-SAM normalize=False",
    "xsam_si": "X-SAM sign-invariant (normalised)",
    "eigensam": "Eigen-SAM",
    "xsam_pow": "X-SAM reference, power 5",
    "xsam_nn_pow": "X-SAM normalize=False, power 5",
    "xsam_si_pow": "X-SAM sign-invariant, power 5",
    "eigensam_pow": "Eigen-SAM, power 5",
}
SETTING_LABELS = {
    "mnist1d_cnn": "MNIST-1D, CNN with BatchNorm",
    "mnist1d_cnn_noise20": "MNIST-1D, CNN with BatchNorm, 20% symmetric label noise",
    "digits_mlp": "digits, MLP",
}
# Paired references: SAM for every method; for the X-SAM rules, also the
# control that differs from them only by the correction (alpha 0).
CONTROLS = {"xsam": "xsam_a0", "xsam_si": "xsam_a0", "xsam_pow": "xsam_a0",
            "xsam_si_pow": "xsam_a0", "xsam_nn": "sam", "xsam_nn_pow": "sam"}


def load_runs(results_dir: str) -> list[dict[str, Any]]:
  """Every per-run record (``*__*__lr*__seed*.json``) under ``results_dir``."""
  runs = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*__*__lr*__seed*.json"))):
    with open(path, encoding="utf-8") as f:
      runs.append(json.load(f))
  return runs


def _order(names):
  return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def grid(runs) -> dict[str, dict[str, dict[float, dict[int, dict[str, Any]]]]]:
  """``{setting: {method: {lr: {seed: results}}}}``."""
  out: dict = {}
  for r in runs:
    out.setdefault(r["setting"], {}).setdefault(r["method"], {}).setdefault(
        r["peak_lr"], {})[r["seed"]] = r["results"]
  return {s: {m: dict(sorted(out[s][m].items())) for m in _order(out[s])}
          for s in sorted(out, key=lambda s: list(SETTING_LABELS).index(s)
                          if s in SETTING_LABELS else len(SETTING_LABELS))}


def _val(results) -> float:
  v = results["val_accuracy"]
  return v if results.get("finite", True) and np.isfinite(v) else -np.inf


def _common_seeds(by_lr) -> set[int]:
  """The grid's seeds: those present at more than half of the rates.

  (The chosen rate also has the remaining seeds; a rate left incomplete by an
  interrupted run lacks some.)
  """
  counts: dict[int, int] = {}
  for runs in by_lr.values():
    for seed in runs:
      counts[seed] = counts.get(seed, 0) + 1
  return {seed for seed, c in counts.items() if 2 * c > len(by_lr)} or set(counts)


def _complete(by_lr) -> list[float]:
  """Rates that have every grid seed (the candidates of the choice)."""
  common = _common_seeds(by_lr)
  return [lr for lr in sorted(by_lr) if common <= set(by_lr[lr])]


def choose(by_lr: dict[float, dict[int, dict[str, Any]]]) -> tuple[float, str]:
  """The rate of highest mean validation accuracy (diverged runs count as -inf), and a note.

  Means are over the grid's seeds (see ``_common_seeds``), among the rates
  that have them all. The note is ``"low edge"`` / ``"high edge"`` when the chosen rate is the
  grid's smallest / largest, else ``""``.

  Example:
    >>> r = lambda v: {"val_accuracy": v}
    >>> choose({0.1: {0: r(0.5)}, 0.2: {0: r(0.7)}, 0.4: {0: r(0.6)}})
    (0.2, '')
  """
  lrs = _complete(by_lr)
  # Only the grid's seeds: the chosen rate's extra seeds must not bias its mean.
  common = _common_seeds(by_lr)
  means = [np.mean([_val(res) for s, res in by_lr[lr].items() if s in common]) for lr in lrs]
  best = lrs[int(np.argmax(means))]
  note = ("" if len(lrs) < 2 or lrs[0] < best < lrs[-1]
          else "low edge" if best == lrs[0] else "high edge")
  return best, note


def t_interval(d) -> tuple[float, float, float]:
  """Mean and 95% t-interval of paired differences ``d`` (nan half-width if n < 2)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  d = np.asarray(d, float)
  if len(d) < 2:
    return float(d.mean()), math.nan, math.nan
  half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def _ms(values, fmt) -> str:
  a = np.asarray(values, float)
  if len(a) == 1:
    return fmt.format(a[0])
  return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1)).lstrip('+')}"


def _ci(d, fmt) -> str:
  m, lo, hi = t_interval(d)
  if math.isnan(lo):
    return fmt.format(m)
  return f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def tuned(by_method):
  """``{method: (lr, note, {seed: results})}`` at each method's chosen rate."""
  return {m: (*choose(by_lr), by_lr[choose(by_lr)[0]]) for m, by_lr in by_method.items()}


def paired(a: dict[int, dict], b: dict[int, dict], key: str, scale: float = 1.0):
  seeds = sorted(set(a) & set(b))
  return [scale * (a[s][key] - b[s][key]) for s in seeds]


def format_summary(runs) -> str:
  """The markdown summary (see the module docstring)."""
  lines = ["# Tuned comparison: summary", ""]
  g = grid(runs)
  c = runs[0]["config"]
  lines += [
      f"Batch {c['batch_size']}, SGD momentum {c['base']['momentum']}, weight decay "
      f"{c['base']['weight_decay']}, cosine schedule to 0 from the peak rate; rho 0.05, alpha "
      "0.2, eigenvector refresh every 5 steps (Lanczos 4 products, the library default; "
      "`_pow`: 5 power iterations, the reference's schedule). The peak rate of each method is "
      "the grid point of highest mean validation accuracy over seeds (final epoch; validation "
      f"= {c['validation']}); test accuracy and lambda_max (Lanczos, "
      f"{c['measurement']['lanczos_iters']} products, {c['measurement']['batch']}) at that "
      "rate. Δ vs SAM: paired by seed (same initialisation and data order) against SAM at "
      "SAM's chosen rate, mean [95% t-interval]; 'beats SAM': seeds with strictly higher "
      "test accuracy (ties counted apart). 'edge': the chosen rate is the grid's end.", ""]
  for setting, by_method in g.items():
    first = next(r for r in runs if r["setting"] == setting)["config"]
    t = tuned(by_method)
    lines += [f"## {SETTING_LABELS.get(setting, setting)} (`{setting}`)", "",
              f"{first['train_examples']} training / {first['val_examples']} validation / "
              f"{first['test_examples']} test examples"
              + (f" ({100 * first['noisy_label_fraction']:.1f}% of training and validation "
                 "labels changed; test labels clean)" if first["label_noise"] else "")
              + f", {first['epochs']} epochs, {first['total_steps']} steps.", "",
              "| method | chosen lr | n | val acc (%) | test acc (%) | lambda_max | "
              "Δ test acc vs SAM (pp) | beats SAM | Δ lambda_max vs SAM | lambda_max below SAM |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    sam = t.get("sam")
    for m, (lr, note, res) in t.items():
      acc = [100 * r["test_accuracy"] for r in res.values()]
      val = [100 * r["val_accuracy"] for r in res.values()]
      eig = [r["top_eigenvalue"] for r in res.values()]
      if sam is None or m == "sam":
        cmp = ["-", "-", "-", "-"]
      else:
        d_acc = paired(res, sam[2], "test_accuracy", 100)
        d_eig = paired(res, sam[2], "top_eigenvalue")
        wins = sum(d > 0 for d in d_acc)
        ties = sum(d == 0 for d in d_acc)
        cmp = [_ci(d_acc, "{:+.2f}"), f"{wins}/{len(d_acc)}" + (f" ({ties} tied)" if ties else ""),
               _ci(d_eig, "{:+.3g}"), f"{sum(d < 0 for d in d_eig)}/{len(d_eig)}"]
      lines.append(f"| {LABELS.get(m, m)} | {lr:g}{' (' + note + ')' if note else ''} | "
                   f"{len(res)} | {_ms(val, '{:.2f}')} | {_ms(acc, '{:.2f}')} | "
                   f"{_ms(eig, '{:.3g}')} | " + " | ".join(cmp) + " |")
    # The correction against the run that differs from it only by the correction.
    rows = [(m, ctl) for m, ctl in CONTROLS.items() if m in t and ctl in t]
    if rows:
      lines += ["", "The correction alone: each X-SAM rule against its alpha 0 control, both "
                "at their own chosen rates (paired by seed, mean [95% t-interval]).", "",
                "| method | control | Δ test acc (pp) | beats control | Δ lambda_max |",
                "|---|---|---|---|---|"]
      for m, ctl in rows:
        d_acc = paired(t[m][2], t[ctl][2], "test_accuracy", 100)
        d_eig = paired(t[m][2], t[ctl][2], "top_eigenvalue")
        lines.append(f"| {LABELS.get(m, m)} | {LABELS.get(ctl, ctl)} | {_ci(d_acc, '{:+.2f}')} | "
                     f"{sum(d > 0 for d in d_acc)}/{len(d_acc)} | {_ci(d_eig, '{:+.3g}')} |")
    lrs = sorted({lr for by_lr in by_method.values() for lr in by_lr})
    pairs = [(m, ctl) for m, ctl in (*CONTROLS.items(), ("eigensam", "sam"),
                                     ("eigensam_pow", "sam"))
             if m in by_method and ctl in by_method]
    if pairs:
      lines += ["", "At equal rates: each method against its control at every rate both ran, "
                "paired by seed; cell: Δ test acc (pp) / Δ lambda_max relative to the "
                "control's (%), means over the seeds both have. lambda_max falls steeply "
                "with the rate (see the grid below), so this separates the method's effect "
                "from that of its chosen rate.", "",
                "| method - control | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
      for m, ctl in pairs:
        cells = []
        for lr in lrs:
          a, b = by_method[m].get(lr, {}), by_method[ctl].get(lr, {})
          seeds = sorted(set(a) & set(b))
          if not seeds:
            cells.append("")
            continue
          d_acc = np.mean([100 * (a[k]["test_accuracy"] - b[k]["test_accuracy"]) for k in seeds])
          d_eig = np.mean([100 * (a[k]["top_eigenvalue"] / b[k]["top_eigenvalue"] - 1)
                           for k in seeds])
          cells.append(f"{d_acc:+.1f} / {d_eig:+.0f}%")
        lines.append(f"| {LABELS.get(m, m)} - {LABELS.get(ctl, ctl)} | " + " | ".join(cells)
                     + " |")
    for title, key, scale, fmt in (("mean validation accuracy (%)", "val_accuracy", 100, "{:.1f}"),
                                   ("mean test accuracy (%)", "test_accuracy", 100, "{:.1f}"),
                                   ("mean lambda_max", "top_eigenvalue", 1, "{:.3g}")):
      lines += ["", f"Grid, {title} over the grid's seeds (those every rate of the method "
                "has, on which the rate is chosen; * = chosen):", "",
                "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
      for m, by_lr in by_method.items():
        cells = []
        for lr in lrs:
          if lr not in by_lr:
            cells.append("")
            continue
          common = _common_seeds(by_lr)
          on_grid = [r for seed, r in by_lr[lr].items() if seed in common]
          vals = [scale * r[key] for r in on_grid]
          bad = sum(not r.get("finite", True) for r in on_grid)
          cell = fmt.format(np.mean(vals)) if not bad else f"diverged {bad}/{len(vals)}"
          if len(on_grid) < len(common):
            cell += f" (n={len(on_grid)}, not a candidate)"
          cells.append(cell + ("*" if lr == t[m][0] else ""))
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## All settings (the README's tables)", "", format_readme_tables(runs)]
  commands = sorted({r["command"] for r in runs})
  lines += ["## Commands", "", "Produced by:", ""] + [f"    {c}" for c in commands] + [""]
  return "\n".join(lines)


SHORT_SETTING = {"mnist1d_cnn": "MNIST-1D CNN", "mnist1d_cnn_noise20": "MNIST-1D CNN, 20% noise",
                 "digits_mlp": "digits MLP"}


def format_readme_tables(runs) -> str:
  """Two compact tables over settings (the README's): test accuracy and lambda_max at the chosen rates.

  Cells: mean ± std over seeds, the chosen rate, and the paired difference
  against SAM (mean [95% t-interval], seeds beating SAM).
  """
  g = grid(runs)
  settings = list(g)
  t = {s: tuned(g[s]) for s in settings}
  methods = _order({m for s in settings for m in g[s]})
  out = []
  for title, key, scale, fmt, dfmt in (
      ("Test accuracy (%) at the chosen rate; Δ vs SAM in pp [95% CI], seeds beating SAM",
       "test_accuracy", 100, "{:.2f}", "{:+.2f}"),
      ("lambda_max at the chosen rate; Δ vs SAM [95% CI], seeds below SAM",
       "top_eigenvalue", 1, "{:.3g}", "{:+.2g}")):
    out += [f"{title}:", "", "| method | " + " | ".join(SHORT_SETTING.get(s, s) for s in settings)
            + " |", "|---|" + "---|" * len(settings)]
    for m in methods:
      cells = []
      for s in settings:
        if m not in t[s]:
          cells.append("not run")
          continue
        lr, note, res = t[s][m]
        vals = [scale * r[key] for r in res.values()]
        cell = f"{_ms(vals, fmt)} (lr {lr:g}{', ' + note if note else ''})"
        if m != "sam" and "sam" in t[s]:
          d = paired(res, t[s]["sam"][2], key, scale)
          better = sum(x > 0 for x in d) if key == "test_accuracy" else sum(x < 0 for x in d)
          cell += f"; {_ci(d, dfmt)}, {better}/{len(d)}"
        cells.append(cell)
      out.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    out.append("")
  return "\n".join(out)


def plot(runs, results_dir: str) -> None:
  """``grid.png``: validation accuracy against the rate; ``tuned.png``: acc vs lambda_max."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  g = grid(runs)
  names = _order({r["method"] for r in runs})
  colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
  n = max(1, len(g))
  fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
  for ax, (setting, by_method) in zip(axes[0], g.items()):
    for m, by_lr in by_method.items():
      lrs = sorted(by_lr)
      val = [100 * np.mean([_val(r) for r in by_lr[lr].values()]) for lr in lrs]
      ax.plot(lrs, val, "o-" if not m.endswith("_pow") else "s--", color=colors[m],
              label=LABELS.get(m, m), ms=4)
    ax.set_xscale("log")
    ax.set_title(SETTING_LABELS.get(setting, setting), fontsize=9)
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("mean validation accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=6, loc="best")
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, "grid.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.5), squeeze=False)
  for ax, (setting, by_method) in zip(axes[0], g.items()):
    for m, (_, _, res) in tuned(by_method).items():
      eig = [r["top_eigenvalue"] for r in res.values()]
      acc = [100 * r["test_accuracy"] for r in res.values()]
      ax.scatter(eig, acc, color=colors[m], alpha=0.6, s=18,
                 marker="o" if not m.endswith("_pow") else "s")
      ax.scatter([np.mean(eig)], [np.mean(acc)], color=colors[m], marker="X", s=110,
                 edgecolors="black", label=LABELS.get(m, m))
    ax.set_title(SETTING_LABELS.get(setting, setting) + ": chosen rates, X = mean", fontsize=9)
    ax.set_xlabel("final lambda_max (Lanczos)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=6, loc="best")
  fig.tight_layout()
  fig.savefig(os.path.join(results_dir, "tuned.png"), dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  """Writes ``summary.md``, ``grid.png`` and ``tuned.png`` next to the JSON."""
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
  plot(runs, args.results)
  print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
