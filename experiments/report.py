"""Writes the study page: each method's rate chosen on validation, then paired tests on test accuracy.

For each (setting, method) the peak learning rate is chosen on the validation
split by the study's rule (``study.select_rate``: integer counts of correct
validation predictions summed over the grid seeds, a tie to the smaller rate,
the grid extended past an edge as the study did); test accuracy and lambda_max
are reported at that rate over every seed run there. Each method is compared
with SAM at SAM's chosen rate, and each normalised X-SAM rule with its alpha 0
control, paired by seed: mean difference, 95% t-interval, two-sided paired
t-test p-value, Holm's adjustment within each family of comparisons, and the
minimum detectable difference (80% power, two-sided 5%, from the observed
spread of the differences; :func:`mde`).

Writes the page (``--page``, default ``docs/study.md``) and, next to the run
records, ``grid.png`` (validation accuracy against the rate on the grid
seeds, chosen rate marked), ``tuned.png`` (test accuracy against lambda_max at
the chosen rates) and ``effects.png`` (differences against SAM with their
intervals and detectable sizes); prints the README's three lines.

Example (shell)::

  python experiments/report.py --results experiments/results --page docs/study.md
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib.util
import json
import math
import os
import sys
from typing import Any, NamedTuple

import numpy as np

ORDER = ("sgd", "sam", "xsam", "xsam_a0", "xsam_nn", "xsam_si", "eigensam", "xsam_pow",
         "xsam_nn_pow", "xsam_si_pow", "eigensam_pow", "xsam_default")
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
    "xsam_default": "X-SAM reference, today's defaults",
}
SETTING_LABELS = {
    "mnist1d_cnn": "MNIST-1D, CNN with BatchNorm",
    "mnist1d_cnn_noise20": "MNIST-1D, CNN with BatchNorm, 20% symmetric label noise",
    "digits_mlp": "digits, MLP",
}
SHORT_SETTING = {"mnist1d_cnn": "MNIST-1D CNN", "mnist1d_cnn_noise20": "MNIST-1D CNN, 20% noise",
                 "digits_mlp": "digits MLP"}
# The correction alone: each normalised X-SAM rule against the control that
# differs from it only by alpha = 0. (normalize=False's alpha 0 control is SAM
# itself, already the reference of every method.)
CONTROLS = {"xsam": "xsam_a0", "xsam_si": "xsam_a0", "xsam_pow": "xsam_a0",
            "xsam_si_pow": "xsam_a0", "xsam_default": "xsam_a0"}
# The same rule on the same task and seeds with another eigenvector schedule:
# one finding, not several, when both are detected.
SAME_RULE = {"xsam_pow": "xsam", "xsam_si_pow": "xsam_si", "xsam_nn_pow": "xsam_nn",
             "eigensam_pow": "eigensam", "xsam_default": "xsam"}
# Methods on the plain grid (step lr * ||g||) and on the normalised grid (step lr).
PLAIN = ("sgd", "sam", "xsam_nn", "eigensam", "xsam_nn_pow", "eigensam_pow")
ALPHA, POWER = 0.05, 0.8
# Per-group perturbations (m-sharpness): each against its global method, at the
# global method's chosen rate, in a family of its own.
GROUPED = {"sam_g4": "sam", "xsam_g4": "xsam"}
GROUPED_LABELS = {"sam_g4": "SAM, 4 groups of 32", "xsam_g4": "X-SAM reference, 4 groups of 32"}
FIGURES = ("grid.png", "effects.png", "tuned.png")


@functools.lru_cache(maxsize=None)
def _study():
  """``experiments/study.py`` (the selection rule lives there), however this file is loaded."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py")
  spec = importlib.util.spec_from_file_location("xsam_experiments_study", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_runs(results_dir: str) -> list[dict[str, Any]]:
  """Every per-run record (``*__*__lr*__seed*.json``) under ``results_dir``."""
  runs = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*__*__lr*__seed*.json"))):
    with open(path, encoding="utf-8") as f:
      runs.append(json.load(f))
  return runs


def _order(names):
  return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _setting_key(s):
  return list(SETTING_LABELS).index(s) if s in SETTING_LABELS else len(SETTING_LABELS)


def grid(runs) -> dict[str, dict[str, dict[float, dict[int, dict[str, Any]]]]]:
  """``{setting: {method: {lr: {seed: results}}}}``."""
  out: dict = {}
  for r in runs:
    out.setdefault(r["setting"], {}).setdefault(r["method"], {}).setdefault(
        r["peak_lr"], {})[r["seed"]] = r["results"]
  return {s: {m: dict(sorted(out[s][m].items())) for m in _order(out[s])}
          for s in sorted(out, key=_setting_key)}


# ----------------------------------------------------------------------------- statistics


def t_interval(d, level: float = 0.95) -> tuple[float, float, float]:
  """Mean and t-interval of paired differences ``d`` (nan bounds if n < 2)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  d = np.asarray(d, float)
  if len(d) < 2:
    return float(d.mean()), math.nan, math.nan
  half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def paired_p(d) -> float:
  """Two-sided p-value of the paired t-test that the mean difference is 0 (1 if all equal)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  d = np.asarray(d, float)
  if len(d) < 2:
    return math.nan
  sd = d.std(ddof=1)
  if sd == 0:
    return 1.0 if d.mean() == 0 else 0.0
  t = d.mean() / (sd / np.sqrt(len(d)))
  return float(2 * stats.t.sf(abs(t), len(d) - 1))


@functools.lru_cache(maxsize=None)
def mde_factor(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
  """Minimum detectable mean difference of a paired t-test, in units of the differences' sd.

  Exact, from the noncentral t: the noncentrality ``nc`` at which the
  two-sided level-``alpha`` test on ``n`` differences rejects with probability
  ``power``, divided by sqrt(n). (The usual approximation
  ``(t_{1-alpha/2, n-1} + t_{power, n-1}) / sqrt(n)`` is a little smaller:
  1.662 against 1.682 at n = 5, 0.995 against 0.996 at n = 10.)

  Example:
    >>> round(mde_factor(10), 3)
    0.996
  """
  from scipy import optimize, stats  # pylint: disable=g-import-not-at-top

  df = n - 1
  crit = stats.t.ppf(1 - alpha / 2, df)
  # P(T < -crit | nc) written as P(T > crit | -nc): scipy's nct.cdf turns NaN far in the tail.
  reject = lambda nc: stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc) - power
  hi = 2 * crit + 2.0
  while reject(hi) < 0:
    hi *= 2
  return float(optimize.brentq(reject, 0.0, hi, xtol=1e-12) / np.sqrt(n))


def mde(d, alpha: float = ALPHA, power: float = POWER) -> float:
  """Minimum detectable mean difference given the observed spread of ``d`` (nan if n < 2)."""
  d = np.asarray(d, float)
  if len(d) < 2:
    return math.nan
  return mde_factor(len(d), alpha, power) * float(d.std(ddof=1))


def holm(pvalues) -> list[float]:
  """Holm's step-down adjusted p-values (family-wise error), in the input order.

  The i-th smallest of m p-values is multiplied by m - i + 1 (i from 1), the
  products are made non-decreasing in that order, and capped at 1.

  Example:
    >>> holm([0.01, 0.04, 0.03, 0.005])
    [0.03, 0.06, 0.06, 0.02]
  """
  p = np.asarray(pvalues, float)
  m = len(p)
  order = np.argsort(p, kind="stable")
  adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
  out = np.empty(m)
  out[order] = adjusted
  return [round(float(x), 12) for x in out]


class Comparison(NamedTuple):
  """A paired comparison over the seeds both sides have (differences: method - reference)."""

  n: int
  mean: float
  lo: float
  hi: float
  p: float
  mde: float
  wins: int
  ties: int
  losses: int
  p_holm: float = math.nan
  sd: float = math.nan  # of the differences
  # The MDE at Holm's first (strictest) step, level ALPHA / family size: what
  # "detected" (Holm p < ALPHA) needs, whatever the comparison's rank.
  mde_holm: float = math.nan


def compare(a: dict[int, dict], b: dict[int, dict], key: str, scale: float = 1.0) -> Comparison:
  """``a`` against ``b`` (``{seed: results}``) on ``key``, paired by seed."""
  seeds = sorted(set(a) & set(b))
  d = np.array([scale * (a[s][key] - b[s][key]) for s in seeds])
  mean, lo, hi = t_interval(d)
  return Comparison(len(d), mean, lo, hi, paired_p(d), mde(d), int((d > 0).sum()),
                    int((d == 0).sum()), int((d < 0).sum()),
                    sd=float(d.std(ddof=1)) if len(d) > 1 else math.nan)


def with_holm(comparisons: dict[Any, Comparison]) -> dict[Any, Comparison]:
  """The same comparisons with ``p_holm`` and ``mde_holm`` filled in, the family being all of them.

  ``mde_holm``: the minimum detectable difference at Holm's first step, level
  ``ALPHA / m`` for a family of ``m``, the level the smallest p-value must
  pass (later steps are less strict; the last one is ``ALPHA``).
  """
  keys = list(comparisons)
  adjusted = holm([comparisons[k].p for k in keys])
  m = len(keys)
  out = {}
  for k, a in zip(keys, adjusted):
    c = comparisons[k]
    strict = (mde_factor(c.n, ALPHA / m) * c.sd if c.n > 1 and np.isfinite(c.sd)
              else math.nan)
    out[k] = c._replace(p_holm=a, mde_holm=strict)
  return out


# ----------------------------------------------------------------------------- selection


def _common_seeds(by_lr) -> list[int]:
  """The grid's seeds: those present at more than half of the rates.

  (The chosen rate also has the remaining seeds; a rate left incomplete by an
  interrupted run lacks some.)
  """
  counts: dict[int, int] = {}
  for runs in by_lr.values():
    for seed in runs:
      counts[seed] = counts.get(seed, 0) + 1
  return sorted({s for s, c in counts.items() if 2 * c > len(by_lr)} or set(counts))


class Choice(NamedTuple):
  """The rate chosen on validation and how: the grid the rule visited and its counts."""

  lr: float
  note: str  # "", "low edge" or "high edge": the chosen rate is the visited grid's end
  visited: list[float]
  totals: dict[float, int | None]  # correct validation predictions over the grid seeds
  grid_seeds: list[int]


def choose(by_lr: dict[float, dict[int, dict[str, Any]]], initial, val_examples: int,
           max_extend: int | None = None) -> Choice:
  """Replays the study's selection (``study.select_rate``) on the runs at hand.

  ``initial``: the method's first grid (``study.initial_grid``).
  Rates outside the grid the rule visits (run by an earlier selection) are
  never candidates; a rate lacking a grid seed stops the search.

  Example:
    >>> r = lambda correct: {"val_accuracy": correct / 100, "finite": True}
    >>> runs = {0.1: {0: r(50)}, 0.2: {0: r(60)}, 0.4: {0: r(60)}, 0.8: {0: r(70)}}
    >>> c = choose(runs, (0.1, 0.2, 0.4), 100)
    >>> c.lr, c.note, c.visited
    (0.2, '', [0.1, 0.2, 0.4])
  """
  study = _study()
  seeds = _common_seeds(by_lr)

  def totals_of(lrs):
    out = {}
    for lr in lrs:
      if lr in by_lr and set(seeds) <= set(by_lr[lr]):
        counts = [study.correct_count(by_lr[lr][s], val_examples) for s in seeds]
        out[lr] = None if None in counts else sum(counts)
    return out

  if max_extend is None:
    max_extend = study.MAX_EXTEND
  visited, best, edge = study.select_rate(tuple(initial), totals_of, max_extend)
  note = "" if not edge else "low edge" if best == visited[0] else "high edge"
  return Choice(best, note, visited, totals_of(visited), seeds)


def rate_of(method: str) -> str | None:
  """The method whose chosen rate ``method`` runs at (``None``: it has a grid of its own)."""
  return _study().METHODS.get(method, {}).get("rate_of")


def tuned(runs) -> dict[str, dict[str, tuple[Choice, dict[int, dict]]]]:
  """``{setting: {method: (choice, {seed: results at the chosen rate})}}``.

  A method with a ``rate_of`` (no grid of its own) takes that method's
  choice: its note names the method, and it has no visited grid or totals.
  """
  g = grid(runs)
  config = {(r["setting"], r["method"]): r["config"] for r in runs}
  out = {}
  for setting, by_method in g.items():
    out[setting] = {}
    for m, by_lr in by_method.items():
      source = rate_of(m)
      if source is not None:
        if source not in out[setting]:
          continue  # the source's runs are not here: no rate to take
        lr = out[setting][source][0].lr
        if lr in by_lr:
          out[setting][m] = (Choice(lr, f"{SHORT_LABELS.get(source, source)}'s", [lr], {}, []),
                             by_lr[lr])
        continue
      c = config[setting, m]
      # The study's first grid (records of an earlier pass may name another one).
      initial = (_study().initial_grid(_study().METHODS[m], setting)
                 if m in _study().METHODS and setting in _study().SETTINGS else c["initial_grid"])
      choice = choose(by_lr, initial, c["val_examples"])
      out[setting][m] = (choice, by_lr[choice.lr])
  return out


# ----------------------------------------------------------------------------- analysis


class Analysis(NamedTuple):
  grid: dict
  tuned: dict
  vs_sam: dict  # {(setting, method): Comparison} on test accuracy (pp), Holm over all
  vs_control: dict  # {(setting, method): Comparison}, Holm over all
  eig_vs_sam: dict  # {(setting, method): Comparison} on lambda_max (no Holm: descriptive)
  first5: dict  # vs_sam on seeds 0-4 only (what the earlier write-up had), Holm over all
  config: dict  # {setting: config of a run}
  seeds: dict  # {(setting, method): seeds at the chosen rate}
  # {(setting, method): Comparison} of a method with a rate_of against that
  # method at the same rate (another eigenvector schedule), Holm over all.
  vs_source: dict = {}
  grouped: dict = {}  # {(setting, method): GroupedCell}, the GROUPED methods


def analyse(runs, first_seeds: int = 5) -> Analysis:
  """Every number of the page (the ``GROUPED`` methods in ``grouped`` only)."""
  grouped_runs = [r for r in runs if r["method"] in GROUPED]
  runs = [r for r in runs if r["method"] not in GROUPED]
  t = tuned(runs)
  vs_sam, vs_ctl, eig, first = {}, {}, {}, {}
  for s, cells in t.items():
    if "sam" not in cells:
      continue
    sam = cells["sam"][1]
    for m, (_, res) in cells.items():
      if m == "sam":
        continue
      vs_sam[s, m] = compare(res, sam, "test_accuracy", 100)
      eig[s, m] = compare(res, sam, "top_eigenvalue")
      early = {k: v for k, v in res.items() if k < first_seeds}
      first[s, m] = compare(early, sam, "test_accuracy", 100)
    for m, ctl in CONTROLS.items():
      if m in cells and ctl in cells:
        vs_ctl[s, m] = compare(cells[m][1], cells[ctl][1], "test_accuracy", 100)
  vs_src = {}
  for s, cells in t.items():
    for m in cells:
      if rate_of(m) in cells:
        vs_src[s, m] = compare(cells[m][1], cells[rate_of(m)][1], "test_accuracy", 100)
  config = {}
  for r in runs:
    config.setdefault(r["setting"], r["config"])
  seeds = {(s, m): sorted(res) for s, cells in t.items() for m, (_, res) in cells.items()}
  return Analysis(grid(runs), t, with_holm(vs_sam), with_holm(vs_ctl), eig, with_holm(first),
                  config, seeds, with_holm(vs_src), grouped_analysis(t, grouped_runs))


class GroupedCell(NamedTuple):
  """A per-group method against its global method, paired by seed."""

  lr: float
  accuracy: Comparison  # test accuracy (pp), Holm over the grouped family
  eigenvalue: Comparison  # lambda_max (descriptive)
  means: tuple[float, float]  # mean test accuracy (%): grouped, global


def grouped_analysis(t, grouped_runs) -> dict[tuple[str, str], GroupedCell]:
  """``{(setting, method): GroupedCell}`` for the ``GROUPED`` methods' runs.

  Only runs at the global method's chosen rate (``t``, from :func:`tuned`)
  count; the family of the Holm adjustment is these comparisons alone.
  """
  by: dict = {}
  for r in grouped_runs:
    by.setdefault((r["setting"], r["method"]), {}).setdefault(r["peak_lr"], {})[
        r["seed"]] = r["results"]
  cells, accuracy = {}, {}
  for (s, m), by_lr in sorted(by.items()):
    reference = t.get(s, {}).get(GROUPED[m])
    if reference is None or reference[0].lr not in by_lr:
      continue
    choice, ref = reference
    res = by_lr[choice.lr]
    accuracy[s, m] = compare(res, ref, "test_accuracy", 100)
    seeds = sorted(set(res) & set(ref))
    cells[s, m] = (choice.lr, compare(res, ref, "top_eigenvalue"),
                   (100 * float(np.mean([res[k]["test_accuracy"] for k in seeds])),
                    100 * float(np.mean([ref[k]["test_accuracy"] for k in seeds]))))
  accuracy = with_holm(accuracy)
  return {k: GroupedCell(lr, accuracy[k], eig, means)
          for k, (lr, eig, means) in cells.items()}


def grouped_lines(cells: dict[tuple[str, str], GroupedCell]) -> list[str]:
  """The page's section on per-group perturbations (empty without runs)."""
  if not cells:
    return []
  L = ["## Per-group perturbations (m-sharpness)", "",
       "SAM as pods run it per device: the batch of 128 split into 4 groups of 32, each "
       "perturbed along its own gradient (`xsam_optax.grouped_grad_fn`, "
       "`xsam-train --sam-groups 4`), against the same method with one global perturbation. "
       "Each grouped method trains at the rate chosen for its global method (no grid of its "
       "own: the two differ only in the perturbation), on every seed the global method has "
       "there, paired by seed. With BatchNorm each group's gradients use its own statistics, "
       "as per-device BatchNorm does. Δ = grouped minus global; Holm's adjustment is over "
       "these comparisons only.", "",
       "| setting | method | lr | test acc. grouped / global (%) | Δ (pp) [95% CI] | MDE (pp) "
       "| p | Holm p | W/T/L | Δ lambda_max [95% CI] |",
       "|---|---|---|---|---|---|---|---|---|---|"]
  for (s, m), c in cells.items():
    acc = c.accuracy
    L.append(f"| {SHORT_SETTING.get(s, s)} | {GROUPED_LABELS.get(m, m)} | {c.lr:g} | "
             f"{c.means[0]:.2f} / {c.means[1]:.2f} | {_ci(acc)} | {acc.mde:.2f} | {_p(acc.p)} "
             f"| {_p(acc.p_holm)} | {_wtl(acc)} | {_ci(c.eigenvalue, '{:+.3g}')} |")
  found = []
  for (s, m), c in cells.items():
    acc = c.accuracy
    if acc.p_holm < ALPHA:
      found.append(f"{GROUPED_LABELS.get(m, m)} ({SHORT_SETTING.get(s, s)}) differs from the "
                   f"global perturbation by {acc.mean:+.2f} pp after Holm's correction")
    else:
      found.append(f"{GROUPED_LABELS.get(m, m)} ({SHORT_SETTING.get(s, s)}): no difference "
                   f"detected ({acc.n} seeds, Holm p {_p(acc.p_holm)}); a true difference "
                   f"below {acc.mde:.2f} pp could go undetected (MDE, 80% power)")
  L += ["", "What this shows: " + "; ".join(found) + ". One setting, one group size: it says "
        "nothing about other models, batch sizes or group sizes.", ""]
  return L


def _pm(values, fmt) -> str:
  a = np.asarray(values, float)
  if len(a) == 1:
    return fmt.format(a[0])
  return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1)).lstrip('+')}"


def _ci(c: Comparison, fmt="{:+.2f}") -> str:
  if math.isnan(c.lo):
    return fmt.format(c.mean)
  return f"{fmt.format(c.mean)} [{fmt.format(c.lo)}, {fmt.format(c.hi)}]"


def _p(p: float) -> str:
  return "-" if math.isnan(p) else "<0.001" if p < 0.001 else f"{p:.3f}"


def _wtl(c: Comparison) -> str:
  return f"{c.wins}/{c.ties}/{c.losses}"


def _lr(choice: Choice) -> str:
  return f"{choice.lr:g}" + (f" ({choice.note})" if choice.note else "")


def _rng(values, fmt="{:.1f}") -> str:
  lo, hi = min(values), max(values)
  return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def fold_range(by_lr, lrs) -> float:
  """Ratio of the largest to the smallest mean lambda_max over the grid seeds at ``lrs``."""
  seeds = _common_seeds(by_lr)
  means = [np.mean([by_lr[lr][s]["top_eigenvalue"] for s in seeds if s in by_lr[lr]])
           for lr in lrs]
  return float(max(means) / min(means))


SHORT_LABELS = {"sgd": "SGD", "xsam": "X-SAM", "xsam_a0": "the alpha 0 control",
                "xsam_nn": "X-SAM normalize=False", "xsam_si": "sign-invariant X-SAM",
                "eigensam": "Eigen-SAM", "xsam_pow": "X-SAM (power 5)",
                "xsam_nn_pow": "X-SAM normalize=False (power 5)",
                "xsam_si_pow": "sign-invariant X-SAM (power 5)", "eigensam_pow": "Eigen-SAM (power 5)",
                "xsam_default": "X-SAM at today's defaults"}


def _per_setting(a: Analysis, m: str, reference: str = "SAM") -> str:
  """``m`` against SAM in each setting: the mean difference and Holm p."""
  return "; ".join(
      f"{a.vs_sam[s, m].mean:+.2f} pp against {reference} on {SHORT_SETTING.get(s, s)} (Holm p "
      f"{_p(a.vs_sam[s, m].p_holm)}{'' if a.vs_sam[s, m].p_holm < ALPHA else ', not detected'})"
      for s in a.tuned if (s, m) in a.vs_sam)


def readme_lines(a: Analysis) -> str:
  """The README's three lines: what was compared and with which schedule, what was found, the link."""
  n = sorted({len(v) for v in a.seeds.values()})
  if not a.vs_sam:
    return "\n".join(["**Reproduction study.** No comparison against SAM in these runs.", "",
                       "See [docs/study.md](docs/study.md)."])
  study = _study()
  schedule = (f"Lanczos, {study.LANCZOS['num_iters']} products every {study.UPDATE_EVERY} steps")
  found = []
  if any((s, "xsam") in a.vs_sam for s in a.tuned):
    found.append(f"X-SAM with the study's schedule ({schedule}, the library default when the "
                 f"study ran): {_per_setting(a, 'xsam')}")
  if any((s, "xsam_default") in a.vs_sam for s in a.tuned):
    found.append("at today's defaults (one power product every 2 steps, same rates): "
                 + _per_setting(a, "xsam_default"))
  if a.vs_source:
    found.append("today's defaults minus the study's schedule: " + "; ".join(
        f"{_ci(c)} pp on {SHORT_SETTING.get(s, s)} (Holm p {_p(c.p_holm)})"
        for (s, _), c in a.vs_source.items()))
  if a.vs_control:
    csig = [k for k, c in a.vs_control.items() if c.p_holm < ALPHA]
    found.append("against the same unit-length step without the correction (alpha 0): "
                 + ("detected only for " + ", ".join(_name(k) for k in csig) if csig
                    else "no difference detected"))
  return "\n".join([
      f"**Reproduction study.** SGD, SAM, X-SAM variants and Eigen-SAM, each at its own learning "
      f"rate chosen on validation, {'/'.join(map(str, n))} seeds, on three small tasks "
      "(MNIST-1D CNN, the same with 20% label noise, digits MLP), Holm-adjusted over "
      f"{len(a.vs_sam)} comparisons with SAM:",
      "; ".join(found) + ".",
      "Protocol, tie rule, all tables, figures and caveats: [docs/study.md](docs/study.md).",
  ])


def format_page(a: Analysis, runs, figures: str = "../experiments/results") -> str:
  """The study page (MyST Markdown); ``figures``: the figures' folder relative to the page."""
  study = _study()
  L: list[str] = []
  add = L.extend
  settings = list(a.tuned)
  n_runs = len(runs)
  n_seeds = sorted({len(v) for v in a.seeds.values()})
  cpu_hours = sum(r["timing"]["run_seconds"] for r in runs) / 3600
  c0 = runs[0]["config"]
  add(["# Reproduction study: does X-SAM help at each method's best learning rate?", "",
       "This page is written by `python experiments/report.py` from the "
       f"{n_runs} run records in `experiments/results/` "
       "(one JSON per setting, method, learning rate and seed, written by "
       "`experiments/study.py`); every number on it comes from those records.", ""])

  # ------------------------------------------------------------------ what ran
  add(["## What ran", "",
       "Methods: SGD; SAM; X-SAM with the reference rule, normalised as in the paper; X-SAM "
       "with `normalize=False` (the correction on SAM's own gradient); the alpha = 0 control "
       "of the normalised rule (a unit-length SAM direction, no correction; the alpha = 0 "
       "control of `normalize=False` is SAM itself, `unit * ||g|| = g`, checked in "
       "`tests/test_study.py`); the sign-invariant rule; Eigen-SAM. Each runs a grid of peak "
       "learning rates in three settings: the CLI's CNN with BatchNorm on MNIST-1D; the same "
       "with 20% symmetric label noise; the MLP on digits. On digits the X-SAM rules and "
       "Eigen-SAM also run with the reference's eigenvector schedule (\"power 5\")."
       + (" Last, X-SAM with the reference rule at the library's defaults today (\"today's "
          "defaults\": one power-iteration product every 2 steps) runs at the rate chosen for "
          "the reference X-SAM in each setting, with no grid of its own." if any(
              rate_of(m) for s in settings for m in a.tuned[s]) else ""), "",
       f"Protocol (`xsam_optax.train.loop`, the same for every run): initialisation and data "
       f"order from the seed, batch {c0['batch_size']}, SGD momentum {c0['base']['momentum']}, "
       f"weight decay {c0['base']['weight_decay']}, cosine schedule to 0; rho {study.RHO}, "
       f"alpha 0.2, eigenvector refresh every {study.UPDATE_EVERY} steps with Lanczos, 4 "
       "products (the library default when the study ran), or 5 power iterations (power 5), "
       f"or, at today's defaults, every {study.DEFAULTS['update_every']} steps with "
       f"{study.DEFAULTS['num_iters']} power-iteration product. "
       + "; ".join(f"{SHORT_SETTING.get(s, s)}: {a.config[s]['epochs']} epochs "
                   f"({a.config[s]['total_steps']} steps), {a.config[s]['train_examples']} "
                   f"training / {a.config[s]['val_examples']} validation / "
                   f"{a.config[s]['test_examples']} test examples" for s in settings)
       + ". lambda_max: Lanczos with "
       f"{c0['measurement']['lanczos_iters']} products on the {c0['measurement']['batch']}.", "",
       "- **Validation.** 20% of the training set is held out (fixed split) and used only to "
       "choose the rate; test accuracy is never used for a choice.",
       "- **Label noise.** 20% of the training labels, before the split, are replaced by a "
       "uniformly drawn other class, once, identically for every method and seed; validation "
       "labels are as noisy as training labels (a clean validation set would not exist in "
       "practice); test labels are clean.",
       "- **Seeds.** Each method runs its grid on seeds "
       f"{'-'.join(map(str, (study.GRID_SEEDS[0], study.GRID_SEEDS[-1])))}; the remaining "
       f"seeds run at the chosen rate only, {'/'.join(map(str, n_seeds))} seeds in all (today's "
       "defaults: every seed at the reference X-SAM's chosen rate). Seed "
       "k gives every method the same initialisation and data order, so differences are "
       "paired by seed.",
       "- **Grids** are factor-2 apart: 0.025-0.2 for the methods that pass the gradient's "
       "length on; 0.0025-0.04 (MLP) and 0.02-0.32 (CNN) for the normalised ones, whose step "
       "is `lr` rather than `lr * ||g||` (BatchNorm keeps the CNN's gradient small, so unit "
       "steps want larger rates; the normalised CNN runs below 0.02 come from a first pass "
       "that started from the MLP grid and are kept).",
       "- **Budget.** The power-5 duplicates run on digits only; the grid runs on 3 seeds.", ""])

  # ------------------------------------------------------------------ tie rule
  changed = []
  for s in settings:
    for m, (ch, _) in a.tuned[s].items():
      if rate_of(m):
        continue
      outside = [lr for lr in a.grid[s][m] if lr not in ch.visited]
      if outside:
        changed.append((s, m, ch, outside))
  add(["## Choosing the rate, and the tie rule", "",
       "Validation results are compared as **integer counts of correct predictions, summed over "
       "the grid seeds**. The rate with the highest count is chosen; **a tie goes to the smaller "
       "rate**; a rate with a diverged run ranks below every rate without one. While the chosen "
       f"rate is the grid's smallest or largest, the grid is extended by a factor 2 past it, at "
       f"most {study.MAX_EXTEND} times (`select_rate` in `experiments/study.py`, which both the "
       "study and this report use). Comparing means of float accuracies instead lets rounding "
       "break exact ties."])
  if changed:
    add(["", "Rates that were run but lie outside the grid the rule visits are shown in the "
         "appendix's grid tables and are never candidates:", ""])
    for s, m, ch, outside in changed:
      t = ch.totals
      top = max(v for v in t.values() if v is not None)
      tied = [lr for lr, v in t.items() if v == top]
      counts = ", ".join(f"{lr:g}: {_total(a, s, m, lr)}" for lr in outside)
      if all(lr < ch.visited[0] for lr in outside):
        why = "below the initial grid, run by a first pass that started from the MLP's grid"
      elif len(tied) > 1:
        why = (f"{' and '.join(f'{lr:g}' for lr in tied)} tie at {top} correct of "
               f"{len(ch.grid_seeds) * a.config[s]['val_examples']}; an earlier selection "
               "compared float means, whose rounding broke the tie and extended the grid")
      else:
        why = "run by an earlier selection"
      add([f"- {SHORT_SETTING.get(s, s)}, {LABELS.get(m, m)}: {', '.join(f'{lr:g}' for lr in outside)}"
           f" ({why}; validation counts there: {counts}). The rule takes {ch.lr:g}."])
  ties = []
  for s in settings:
    for m, (ch, _) in a.tuned[s].items():
      if rate_of(m):
        continue
      top = max(v for v in ch.totals.values() if v is not None)
      tied = [lr for lr, v in ch.totals.items() if v == top]
      if len(tied) > 1:
        ties.append(f"{SHORT_SETTING.get(s, s)} {LABELS.get(m, m)} "
                    f"({' / '.join(f'{lr:g}' for lr in tied)}, {top} correct)")
  if ties:
    add(["", "Exact ties at the top, resolved by the rule: " + "; ".join(ties) + "."])
  add([""])

  # ------------------------------------------------------------------ statistics
  n_max = max(n_seeds)
  add(["## Statistics", "",
       "Each comparison pairs the two methods seed by seed, each at its own chosen rate "
       "(the reference is SAM at SAM's chosen rate, or the alpha = 0 control at its own). For "
       "the differences in test accuracy (percentage points, pp) the tables give:", "",
       "- the mean and its **95% t-interval**;",
       "- the two-sided **paired t-test p-value**, and **Holm's step-down adjustment** of it "
       f"within its family: the {len(a.vs_sam)} comparisons against SAM form one family, the "
       f"{len(a.vs_control)} comparisons of an X-SAM rule against its alpha = 0 control another"
       + (f", the {len(a.vs_source)} comparisons of today's defaults with the study's schedule "
          "a third" if a.vs_source else "")
       + " (an adjusted p below 0.05 keeps the family-wise error at 5%); **detected** means "
       "Holm p < 0.05;",
       "- the **minimum detectable difference (MDE)**: the true mean difference that would be "
       "detected (Holm p < 0.05) with 80% power, if the differences spread as observed, at "
       "Holm's first and strictest step, the two-sided level 0.05 / m for a family of m "
       "comparisons (later steps are less strict, the last one 0.05, so a comparison that is "
       "not the family's smallest p can need a little less). It is computed exactly from the "
       f"noncentral t distribution: at n = {n_max} it is "
       f"{mde_factor(n_max, ALPHA / max(len(a.vs_sam), 1)):.2f} standard deviations of the "
       f"differences for the family against SAM (m = {len(a.vs_sam)}), against "
       f"{mde_factor(n_max):.3f} at the unadjusted 5% level (where the approximation "
       f"(t_0.975 + t_0.8) / sqrt(n) gives {_approx_factor(n_max):.3f}). A difference below "
       "the MDE can exist and go undetected;",
       "- **W/T/L**: seeds in which the method's test accuracy is higher than, equal to, or "
       "lower than the reference's (equal counts are ties, not losses).", "",
       "lambda_max differences against SAM are given with their intervals only, as "
       "description: at different chosen rates they mostly compare the rates (see below).", ""])

  # ------------------------------------------------------------------ main tables
  add(["## Test accuracy against SAM", ""])
  for s in settings:
    cells = a.tuned[s]
    add([f"### {SETTING_LABELS.get(s, s)}", "",
         "| method | chosen lr | n | val acc (%) | test acc (%) | Δ vs SAM (pp) [95% CI] | "
         "MDE at Holm level (pp) | p | Holm p | W/T/L |",
         "|---|---|---|---|---|---|---|---|---|---|"])
    for m, (ch, res) in cells.items():
      acc = [100 * r["test_accuracy"] for r in res.values()]
      val = [100 * r["val_accuracy"] for r in res.values()]
      if (s, m) in a.vs_sam:
        c = a.vs_sam[s, m]
        cmp = [_ci(c), f"{c.mde_holm:.2f}", _p(c.p), _p(c.p_holm), _wtl(c)]
      else:
        cmp = ["-"] * 5
      add([f"| {LABELS.get(m, m)} | {_lr(ch)} | {len(res)} | {_pm(val, '{:.2f}')} | "
           f"{_pm(acc, '{:.2f}')} | " + " | ".join(cmp) + " |"])
    add([""])
  if a.vs_control:
    add(["## The correction alone: each normalised rule against its alpha = 0 control", "",
         "Same normalised direction, same grid; the only difference is the eigenvector "
         "correction (alpha 0.2 against 0). Each at its own chosen rate, paired by seed.", "",
         "| setting | method | Δ vs control (pp) [95% CI] | MDE at Holm level (pp) | p | "
         "Holm p | W/T/L |",
         "|---|---|---|---|---|---|---|"])
    for (s, m), c in a.vs_control.items():
      add([f"| {SHORT_SETTING.get(s, s)} | {LABELS.get(m, m)} | {_ci(c)} | {c.mde_holm:.2f} | "
           f"{_p(c.p)} | {_p(c.p_holm)} | {_wtl(c)} |"])
    add([""])
  if a.vs_source:
    add(["## Today's defaults against the study's schedule", "",
         "X-SAM with the reference rule at the library's defaults today (one power-iteration "
         "product every 2 steps) against the same rule with the schedule the rest of the study "
         "ran (Lanczos, 4 products every 5 steps), at the same rate (the one chosen for the "
         "latter), paired by seed.", "",
         "| setting | rate | Δ defaults − Lanczos (pp) [95% CI] | MDE at Holm level (pp) | p | "
         "Holm p | W/T/L | lambda_max, defaults / Lanczos |",
         "|---|---|---|---|---|---|---|---|"])
    for (s, m), c in a.vs_source.items():
      eig = [np.mean([r["top_eigenvalue"] for r in a.tuned[s][k][1].values()])
             for k in (m, rate_of(m))]
      add([f"| {SHORT_SETTING.get(s, s)} | {a.tuned[s][m][0].lr:g} | {_ci(c)} | "
           f"{c.mde_holm:.2f} | {_p(c.p)} | {_p(c.p_holm)} | {_wtl(c)} | "
           f"{eig[0]:.3g} / {eig[1]:.3g} |"])
    add([""])

  # ------------------------------------------------------------------ 5 vs 10 seeds
  add(["## What the added seeds changed", "",
       "The same comparisons against SAM computed on seeds 0-4 only and on every seed, both at "
       "the rates chosen above and with Holm's correction over the same family: what the first "
       "5 seeds show under this page's protocol. These are not the numbers of the earlier "
       "5-seed write-up, which chose some rates by comparing float means (see *Changes from the "
       "5-seed version*).", "",
       "| setting | method | seeds 0-4: Δ [95% CI] | MDE | Holm p | all seeds: Δ [95% CI] | "
       "MDE | Holm p |", "|---|---|---|---|---|---|---|---|"])
  for k, c in a.vs_sam.items():
    f = a.first5[k]
    add([f"| {SHORT_SETTING.get(k[0], k[0])} | {LABELS.get(k[1], k[1])} | {_ci(f)} | "
         f"{f.mde_holm:.2f} | {_p(f.p_holm)} | {_ci(c)} | {c.mde_holm:.2f} | "
         f"{_p(c.p_holm)} |"])
  add([""])

  # ------------------------------------------------------------------ lambda_max
  add(["## lambda_max", "",
       "At the chosen rate, mean ± sd over the seeds; then the paired difference against SAM "
       "[95% CI]. 'high edge' / 'low edge': the chosen rate is the largest / smallest of the "
       "grid the rule visited, so a better rate may lie beyond it.", "",
       "| method | " + " | ".join(SHORT_SETTING.get(s, s) for s in settings) + " |",
       "|---|" + "---|" * len(settings)])
  for m in _order({m for s in settings for m in a.tuned[s]}):
    cells = []
    for s in settings:
      if m not in a.tuned[s]:
        cells.append("not run")
        continue
      ch, res = a.tuned[s][m]
      cell = f"{_pm([r['top_eigenvalue'] for r in res.values()], '{:.3g}')} (lr {_lr(ch)})"
      if (s, m) in a.eig_vs_sam:
        cell += f"; {_ci(a.eig_vs_sam[s, m], '{:+.2g}')}"
      cells.append(cell)
    add([f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |"])
  folds = _folds(a)
  ranked = sorted(folds, key=folds.get)
  ranked = ranked[:1] + ranked  # one method alone: it is its own next largest
  who = lambda k: f"{SHORT_SETTING.get(k[0], k[0])}, {LABELS.get(k[1], k[1])}"
  sam_cnn = a.grid.get("mnist1d_cnn", {}).get("sam")
  add(["", "**lambda_max follows the learning rate.** Across the rates each method ran, its mean "
       "lambda_max over the grid seeds changes by a factor (largest over smallest) of "
       f"{folds[ranked[0]]:.1f} ({who(ranked[0])}) to {folds[ranked[-1]]:,.0f} "
       f"({who(ranked[-1])}), median {np.median(list(folds.values())):.0f}; the next largest is "
       f"{folds[ranked[-2]]:,.0f} ({who(ranked[-2])})"
       + (f". SAM on the clean CNN: {_grid_mean(sam_cnn, 0.025):.3g} at 0.025, "
          f"{_grid_mean(sam_cnn, 0.2):.3g} at 0.2" if sam_cnn and 0.025 in sam_cnn
          and 0.2 in sam_cnn else "")
       + ". So lambda_max at different chosen rates mostly compares the rates; the equal-rate "
       "tables in the appendix compare methods at the same rate.", ""])

  # ------------------------------------------------------------------ figures
  rel = figures
  add(["## Figures", "",
       f"![Validation accuracy against the peak rate]({rel}/grid.png)", "",
       "Validation accuracy against the peak rate, mean over the grid seeds (the seeds on which "
       "the rate is chosen) with ± 1 sd bars; the ringed point is the chosen rate; hollow "
       "points are rates outside the grid the rule visits. Left: methods whose step is "
       "`lr * ||g||`; right: the normalised methods (step `lr`). The axes show the top of the "
       "curves and the visited grids; lower points, and the CNN's first-pass rates below the "
       "normalised grid, are in the appendix's tables.", "",
       f"![Differences against SAM]({rel}/effects.png)", "",
       "Test-accuracy difference against SAM at the chosen rates: the bar is the *unadjusted* "
       "95% interval, while the labels give *Holm-adjusted* p-values, so a bar can exclude zero "
       "where Holm p is above 0.05 (not detected); the grey band is ± the MDE at Holm's level "
       "around zero: an interval inside the band is a non-detection of anything the study "
       "could detect, not evidence of no effect.", "",
       f"![Test accuracy against lambda_max]({rel}/tuned.png)", "",
       "Test accuracy against final lambda_max at the chosen rates: one small point per seed; "
       "the large X sits at the mean test accuracy and the *geometric* mean of lambda_max "
       "(lambda_max on a log axis).", ""])

  # ------------------------------------------------------------------ conclusions
  add(["## Conclusions", ""] + conclusions(a) + [""])

  add(["## Changes from the 5-seed version", ""] + changes(a) + [""])

  # ------------------------------------------------------------------ per-group perturbations
  add(grouped_lines(a.grouped))

  # ------------------------------------------------------------------ reproduce
  commands = sorted({r["command"] for r in runs})
  commit_of = lambda r: (r.get("environment", {}).get("commit")  # records before provenance()
                         or r.get("environment", {}).get("git_commit"))
  with_commit = [r for r in runs if commit_of(r) not in (None, "unknown")]
  commits = sorted({commit_of(r)[:12] for r in with_commit})
  example = next(r for r in runs if r["setting"] == "digits_mlp" and r["method"] == "sgd")
  add(["## Reproduce", "",
       "From scratch (skip-if-exists: an interrupted study resumes where it stopped), then this "
       "page and the figures:", "", "```bash",
       "python experiments/study.py --workers 2 --settings digits_mlp mnist1d_cnn "
       "mnist1d_cnn_noise20 --power-settings digits_mlp --seeds 0 1 2 3 4 5 6 7 8 9",
       "python experiments/report.py", "```", "",
       "(From scratch, the rates outside the visited grids listed above are not run.) The "
       "records on disk were written by these commands, in the records' `command` field:", "",
       "```bash"] + commands + ["```", "",
         f"Total training time of the {n_runs} runs: {cpu_hours:.1f} h (the sum of each run's "
         "own time; one or two worker processes on a shared 2-core CPU). Every record stores `rerun_row_command`, which trains "
         f"that one run again into `{study.RERUN_OUT}` (another `--out` writes elsewhere; the "
         "results folder would skip the existing file), e.g.:", "", "```bash",
         example["rerun_row_command"], "```", "",
         "`tests/test_study.py` reruns one stored run this way and checks that it reproduces "
         "the training, validation and test accuracies exactly and the losses to a relative "
         "1e-6 (XLA:CPU may sum floats in another order).", "",
         "Records store the git commit of the checkout that wrote them and the packages' "
         "versions (`environment`: `git_commit`, `git_modified`, `versions`; `commit` and "
         "`dirty` in the first records that had them)"
         + (f"; {len(with_commit)} of the {n_runs} records have them (commit "
            f"{', '.join(commits)}), the older ones name only the jax and optax versions."
            if len(with_commit) < n_runs else "."), ""])

  # ------------------------------------------------------------------ appendix
  add(["## Appendix: the whole grid", ""])
  for s in settings:
    by_method = {m: by_lr for m, by_lr in a.grid[s].items() if not rate_of(m)}
    lrs = sorted({lr for by_lr in by_method.values() for lr in by_lr})
    head = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs)]
    add([f"### {SETTING_LABELS.get(s, s)}", "",
         f"Correct validation predictions summed over the grid seeds (of "
         f"{len(_common_seeds(next(iter(by_method.values())))) * a.config[s]['val_examples']}; "
         "* = chosen, † = outside the grid the rule visits, not a candidate), then mean test "
         "accuracy (%) and mean lambda_max over the grid seeds:", ""] + head)
    for m, by_lr in by_method.items():
      ch = a.tuned[s][m][0]
      cells = []
      for lr in lrs:
        if lr not in by_lr:
          cells.append("")
          continue
        t = _total(a, s, m, lr)
        cells.append(("diverged" if t is None else str(t))
                     + ("*" if lr == ch.lr else "" if lr in ch.visited else "†"))
      add([f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |"])
    for title, key, scale, fmt in (("mean test accuracy (%)", "test_accuracy", 100, "{:.1f}"),
                                   ("mean lambda_max", "top_eigenvalue", 1, "{:.3g}")):
      add(["", f"{title}:", ""] + head)
      for m, by_lr in by_method.items():
        seeds = _common_seeds(by_lr)
        cells = [fmt.format(np.mean([scale * by_lr[lr][k][key] for k in seeds
                                     if k in by_lr[lr]])) if lr in by_lr else "" for lr in lrs]
        add([f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |"])
    pairs = [(m, ctl) for m, ctl in (*CONTROLS.items(), ("xsam_nn", "sam"), ("eigensam", "sam"),
                                     ("xsam_nn_pow", "sam"), ("eigensam_pow", "sam"))
             if m in by_method and ctl in by_method]
    if pairs:
      add(["", "At equal rates: each method against its control at every rate both ran, paired "
           "by seed; cell: Δ test accuracy (pp) / Δ lambda_max relative to the control's (%), "
           "means over the seeds both have.", ""] + head)
      for m, ctl in pairs:
        cells = []
        for lr in lrs:
          x, y = by_method[m].get(lr, {}), by_method[ctl].get(lr, {})
          both = sorted(set(x) & set(y))
          if not both:
            cells.append("")
            continue
          d_acc = np.mean([100 * (x[k]["test_accuracy"] - y[k]["test_accuracy"]) for k in both])
          d_eig = np.mean([100 * (x[k]["top_eigenvalue"] / y[k]["top_eigenvalue"] - 1)
                           for k in both])
          cells.append(f"{d_acc:+.1f} / {d_eig:+.0f}%")
        add([f"| {LABELS.get(m, m)} - {LABELS.get(ctl, ctl)} | " + " | ".join(cells) + " |"])
    add([""])
  return "\n".join(L).rstrip("\n") + "\n"


def _approx_factor(n: int) -> float:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float((stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)) / np.sqrt(n))


def _total(a: Analysis, s: str, m: str, lr: float):
  by_lr = a.grid[s][m]
  seeds = _common_seeds(by_lr)
  if not set(seeds) <= set(by_lr[lr]):
    return "incomplete"
  counts = [_study().correct_count(by_lr[lr][k], a.config[s]["val_examples"]) for k in seeds]
  return None if None in counts else sum(counts)


def _grid_mean(by_lr, lr, key="top_eigenvalue"):
  seeds = _common_seeds(by_lr)
  return float(np.mean([by_lr[lr][k][key] for k in seeds if k in by_lr[lr]]))


def _name(k, with_setting=True) -> str:
  s, m = k
  return LABELS.get(m, m) + (f" on {SHORT_SETTING.get(s, s)}" if with_setting else "")


def _equal_rate(a: Analysis, s: str, m: str, ref: str, lr: float):
  """Mean test-accuracy difference (pp) of ``m`` minus ``ref`` at one rate, over the seeds both have."""
  x, y = a.grid[s][m].get(lr, {}), a.grid[s][ref].get(lr, {})
  both = sorted(set(x) & set(y))
  if not both:
    return None
  return float(np.mean([100 * (x[k]["test_accuracy"] - y[k]["test_accuracy"]) for k in both])), len(both)


def _mde_ranges(comparisons, settings) -> str:
  by = {s: [c.mde_holm for (s2, _), c in comparisons.items() if s2 == s] for s in settings}
  return "; ".join(f"{SHORT_SETTING.get(s, s)} {_rng(v, '{:.2f}')} pp" for s, v in by.items() if v)


def _sam_diffs(a: Analysis, s: str, m: str) -> dict[int, float]:
  """Per-seed test-accuracy differences (pp) of ``m`` against SAM at their chosen rates."""
  res, sam = a.tuned[s][m][1], a.tuned[s]["sam"][1]
  return {k: 100 * (res[k]["test_accuracy"] - sam[k]["test_accuracy"]) for k in res if k in sam}


def findings(a: Analysis, keys) -> list[list[tuple[str, str]]]:
  """Detected comparisons grouped into distinct findings: one rule on one task and its seeds
  with another eigenvector schedule (``SAME_RULE``) is the same finding.

  Example:
    >>> a = Analysis(*([{}] * 8))
    >>> findings(a, [("t", "xsam_si"), ("t", "xsam_si_pow"), ("t", "xsam"), ("u", "xsam_pow")])
    [[('t', 'xsam_si'), ('t', 'xsam_si_pow')], [('t', 'xsam')], [('u', 'xsam_pow')]]
  """
  groups: dict[tuple[str, str], list] = {}
  for s, m in keys:
    groups.setdefault((s, SAME_RULE.get(m, m)), []).append((s, m))
  return list(groups.values())


def _findings_text(a: Analysis, sig) -> str:
  """``"N comparisons ..., K distinct findings"`` and, for each group of several, why."""
  groups = findings(a, sig)
  text = (f"{len(sig)} comparison{'s' if len(sig) != 1 else ''} "
          f"{'are' if len(sig) != 1 else 'is'} detected")
  shared = [g for g in groups if len(g) > 1]
  if not shared:
    return text
  text += f", {len(groups)} distinct finding{'s' if len(groups) != 1 else ''} ("
  parts = []
  for g in shared:
    (s, m1), (_, m2) = g[0], g[1]
    d1, d2 = _sam_diffs(a, s, m1), _sam_diffs(a, s, m2)
    seeds = sorted(set(d1) & set(d2))
    r = float(np.corrcoef([d1[k] for k in seeds], [d2[k] for k in seeds])[0, 1])
    parts.append(f"{' and '.join(LABELS.get(m, m) for _, m in g)} on "
                 f"{SHORT_SETTING.get(s, s)} are one rule on one task and the same seeds with "
                 f"two eigenvector schedules: their per-seed differences against SAM correlate, "
                 f"r = {r:.2f}")
  return text + "; ".join(parts) + ")"


def conclusions(a: Analysis) -> list[str]:
  """The conclusions, worded from the numbers: a difference is reported as detected only if it
  survives Holm's correction within its family."""
  if not a.vs_sam:
    return ["- No comparison against SAM in these runs."]
  out = []
  n = max(len(v) for v in a.seeds.values())
  settings = list(a.tuned)
  sig = [k for k, c in a.vs_sam.items() if c.p_holm < ALPHA]
  rest = [k for k in a.vs_sam if k not in sig]
  detail = lambda c: f"{_ci(c)} pp, W/T/L {_wtl(c)}, Holm p {_p(c.p_holm)}"
  out.append(
      f"- **Against SAM** ({len(a.vs_sam)} comparisons, {n} seeds, Holm's correction): "
      + (f"{_findings_text(a, sig)}: " + "; ".join(
          f"{_name(k)} {detail(a.vs_sam[k])}" for k in sig) + ". " if sig else
         "no difference is detected. ")
      + (f"For the other {len(rest)} no difference is detected; differences smaller than the "
         f"MDE could not have been: {_mde_ranges({k: a.vs_sam[k] for k in rest}, settings)}."
         if rest else ""))
  raw = [k for k in rest if a.vs_sam[k].p < ALPHA]
  if raw:
    out.append("  Below 0.05 before the correction only: " + "; ".join(
        f"{_name(k)} {_ci(a.vs_sam[k])} pp (p {_p(a.vs_sam[k].p)}, Holm {_p(a.vs_sam[k].p_holm)})"
        for k in raw) + ". Leads, not findings.")
  if a.vs_control:
    csig = [k for k, c in a.vs_control.items() if c.p_holm < ALPHA]
    crest = [k for k in a.vs_control if k not in csig]
    text = (f"- **The correction itself**: each normalised rule against its alpha = 0 control "
            f"({len(a.vs_control)} comparisons, Holm). ")
    if csig:
      parts = []
      for k in csig:
        s, m = k
        ctl = CONTROLS[m]
        lr, lr_ctl = a.tuned[s][m][0].lr, a.tuned[s][ctl][0].lr
        part = f"{_name(k)} {detail(a.vs_control[k])}"
        if lr != lr_ctl:
          eq = [(r, _equal_rate(a, s, m, ctl, r)) for r in sorted({lr, lr_ctl})]
          eq = [(r, e) for r, e in eq if e is not None]
          part += (f", at rate {lr:g} against the control's {lr_ctl:g}"
                   + (" (at equal rates, over the grid seeds: " + ", ".join(
                       f"{e[0]:+.2f} pp at {r:g} (n = {e[1]})" for r, e in eq) + ")" if eq else ""))
        parts.append(part)
      text += "Detected: " + "; ".join(parts) + ". "
      moved = [k for k in csig if a.tuned[k[0]][k[1]][0].lr != a.tuned[k[0]][CONTROLS[k[1]]][0].lr]
      ratios = [abs(e[0]) / abs(a.vs_control[k].mean) for k in moved
                for r in {a.tuned[k[0]][k[1]][0].lr, a.tuned[k[0]][CONTROLS[k[1]]][0].lr}
                for e in [_equal_rate(a, k[0], k[1], CONTROLS[k[1]], r)] if e is not None]
      if moved:
        text += ("The two sides ran at different chosen rates"
                 + (f", and at equal rates they differ by at most {max(ratios):.2f} times as "
                    "much: the detected difference may be the rates' rather than the "
                    "correction's. " if ratios and max(ratios) < 0.5 else
                    "; the equal-rate differences above separate the two. "))
    text += ("No effect of the correction is detected for " + ", ".join(
        _name(k) for k in crest) + f"; MDE {_mde_ranges({k: a.vs_control[k] for k in crest}, settings)}."
             if crest else "")
    out.append(text)
    # Gains over SAM that the control does not separate from the correction.
    unexplained = [k for k in sig if k[1] in CONTROLS and k in a.vs_control
                   and a.vs_control[k].p_holm >= ALPHA and (k[0], CONTROLS[k[1]]) in a.vs_sam]
    if unexplained:
      out.append("- **Where the detected gains over SAM come from is not resolved.** " + "; ".join(
          f"{_name(k)}: {_ci(a.vs_sam[k])} pp over SAM, but its alpha = 0 control is "
          f"{_ci(a.vs_sam[k[0], CONTROLS[k[1]]])} pp over SAM (Holm p "
          f"{_p(a.vs_sam[k[0], CONTROLS[k[1]]].p_holm)}) and the rule minus the control "
          f"{_ci(a.vs_control[k])} pp (MDE {a.vs_control[k].mde_holm:.2f})" for k in unexplained)
          + ". Neither the correction nor the normalised direction alone is shown to cause them.")
  for title, ms in (("The correction on SAM's own gradient** (`normalize=False`)",
                     ("xsam_nn", "xsam_nn_pow")),
                    ("Eigen-SAM**", ("eigensam", "eigensam_pow")),
                    ("SGD** (against SAM, both tuned)", ("sgd",))):
    ks = [k for k in a.vs_sam if k[1] in ms]
    if ks:
      hits = [k for k in ks if a.vs_sam[k].p_holm < ALPHA]
      out.append(f"- **{title}: " + ", ".join(
          f"{_ci(a.vs_sam[k])} pp ({SHORT_SETTING.get(k[0], k[0])}"
          + (", power 5" if k[1].endswith("_pow") else "") + ")" for k in ks)
          + (" against SAM; no difference detected." if not hits else
             f" against SAM; detected: {', '.join(_name(k) for k in hits)}."))
  if a.vs_source:
    out.append("- **X-SAM at today's defaults** (one power-iteration product every 2 steps, at "
               "the reference X-SAM's chosen rate): " + _per_setting(a, "xsam_default", "SAM")
               + "; against the study's Lanczos schedule at the same rate: " + "; ".join(
                   f"{_ci(c)} pp on {SHORT_SETTING.get(s, s)} (Holm p {_p(c.p_holm)}, MDE "
                   f"{c.mde_holm:.2f})" for (s, _), c in a.vs_source.items()) + ": "
               + ("detected on " + ", ".join(SHORT_SETTING.get(s, s) for (s, _), c in
                                               a.vs_source.items() if c.p_holm < ALPHA)
                  if any(c.p_holm < ALPHA for c in a.vs_source.values())
                  else "no difference detected") + ".")
  out.append(
      "- **What the study cannot tell.** Small models and data, short training, no CIFAR or "
      "ResNet (where the paper reports its gains); only the learning rate is tuned (rho, alpha, "
      "weight decay fixed); rates chosen on 3 seeds and on small validation sets (noisy ones "
      "under label noise), so a method's chosen rate is itself noisy; power 5 only on digits; "
      "one kind of label noise. Whether normalised SAM's behaviour survives tuning SAM's "
      "schedule too (a unit step acts like a rate that grows as the gradient shrinks) is not "
      "tested.")
  return out


def _folds(a: Analysis) -> dict:
  """``{(setting, method): largest / smallest mean lambda_max over the rates it ran}``."""
  return {(s, m): fold_range(by_lr, sorted(by_lr)) for s in a.grid
          for m, by_lr in a.grid[s].items() if not rate_of(m)}


def _tied_top(choice: Choice) -> list[float]:
  top = max(v for v in choice.totals.values() if v is not None)
  return [lr for lr, v in choice.totals.items() if v == top]


def changes(a: Analysis) -> list[str]:
  """What the earlier (5-seed, float-mean selection) write-up said, against what holds now."""
  out = []
  noisy, clean, dig = "mnist1d_cnn_noise20", "mnist1d_cnn", "digits_mlp"
  x, c, si = (a.vs_sam.get((noisy, m)) for m in ("xsam", "xsam_a0", "xsam_si"))
  x5, c5, si5 = (a.first5.get((noisy, m)) for m in ("xsam", "xsam_a0", "xsam_si"))
  if x and c and si:
    hits = [n for n, k in (("the reference rule", x), ("the control", c),
                           ("the sign-invariant rule", si)) if k.p_holm < ALPHA]
    out.append(
        "- *\"Normalisation is what differs ... on the noisy CNN all three normalised methods "
        "beat SAM in 5/5 seeds by about 3 pp\"*: on seeds 0-4 the reference rule, the control and "
        f"the sign-invariant rule were {x5.mean:+.2f}, {c5.mean:+.2f} and {si5.mean:+.2f} pp, "
        f"Holm p {_p(x5.p_holm)}, {_p(c5.p_holm)}, {_p(si5.p_holm)}. With {x.n} seeds: "
        f"{x.mean:+.2f}, {c.mean:+.2f}, {si.mean:+.2f} pp, Holm p {_p(x.p_holm)}, "
        f"{_p(c.p_holm)}, {_p(si.p_holm)}: detected for "
        + (" and ".join(hits) if hits else "none of them")
        + (" only; the control carries the normalisation without the correction, so "
           "normalisation is not shown to be what differs." if c.p_holm >= ALPHA else "."))
  if a.vs_control:
    csig = [k for k in a.vs_control if a.vs_control[k].p_holm < ALPHA]
    moved = [k for k in csig
             if a.tuned[k[0]][k[1]][0].lr != a.tuned[k[0]][CONTROLS[k[1]]][0].lr]
    out.append(
        "- *\"The correction alone does nothing measurable\"*: now \"no effect detected; "
        "effects below the MDE could not be\", with the MDE of each comparison"
        + (f"; detected against the control: {', '.join(_name(k) for k in csig)}"
           + (" (each at a chosen rate other than the control's)" if moved == csig else "") + "."
           if csig else "."))
  sic, sic5 = a.vs_sam.get((clean, "xsam_si")), a.first5.get((clean, "xsam_si"))
  if sic and sic5:
    out.append(
        f"- *Sign-invariant rule, clean CNN, \"a lead, not a finding\"*: {sic5.mean:+.2f} pp "
        f"(Holm p {_p(sic5.p_holm)}) on seeds 0-4, {_ci(sic)} pp (Holm p {_p(sic.p_holm)}) with "
        f"{sic.n} seeds.")
  for m in ("xsam_si", "eigensam_pow"):
    if dig in a.tuned and m in a.tuned[dig]:
      ch = a.tuned[dig][m][0]
      tied = _tied_top(ch)
      outside = [lr for lr in a.grid[dig][m] if lr > ch.visited[-1]]
      if len(tied) > 1 and outside:
        out.append(
            f"- *Digits, {LABELS[m]}: a tie broken by float rounding*: "
            f"{' and '.join(f'{lr:g}' for lr in tied)} tie at {ch.totals[tied[0]]} correct; "
            "the earlier selection's rounding broke the tie and extended the grid to "
            f"{', '.join(f'{lr:g}' for lr in outside)}; the tie rule chooses {ch.lr:g}"
            + (f" ({ch.note})." if ch.note else ", inside the grid."))
  folds = _folds(a)
  out.append(
      "- *\"lambda_max falls 5- to 25-fold across each grid\"*: it changes by a factor of "
      f"{min(folds.values()):.1f} to {max(folds.values()):,.0f} (lambda_max section).")
  out.append(
      "- Win counts now show ties (W/T/L); the lambda_max table keeps the edge notes; the study "
      "script's docstring no longer says that runs train together under `jax.vmap` (they run "
      "one after another); stored rerun commands write to a scratch folder instead of skipping "
      "the existing result.")
  return out


# ----------------------------------------------------------------------------- figures

# Twelve distinguishable colours (tab10, black and purple); each method keeps its colour in every figure.
COLORS = {m: c for m, c in zip(ORDER, ("#1f77b4", "#000000", "#d62728", "#7f7f7f", "#2ca02c",
                                       "#9467bd", "#ff7f0e", "#e377c2", "#17becf", "#8c564b",
                                       "#bcbd22", "#aa3377"))}


def _style(m):
  return {"color": COLORS.get(m, "k"), "marker": "s" if m.endswith("_pow") else "o",
          "linestyle": "--" if m.endswith("_pow") else "-"}


def _save(fig, path):
  fig.savefig(path, dpi=100, metadata={"Software": None})


def plot(a: Analysis, results_dir: str) -> list[str]:
  """Writes ``grid.png``, ``effects.png`` and ``tuned.png``; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top,unused-import

  plt.rcParams.update({"font.size": 8, "svg.hashsalt": "xsam"})
  settings = list(a.grid)
  paths = []

  # grid.png: validation accuracy vs rate, grid seeds only, chosen rate ringed.
  fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
  for row, s in zip(axes, settings):
    for col, (ax, group) in enumerate(zip(row, ("plain", "normalised"))):
      top, plotted, ticks, low = -np.inf, [], set(), np.inf
      for m, by_lr in a.grid[s].items():
        if (m in PLAIN) != (group == "plain") or rate_of(m):
          continue
        ch = a.tuned[s][m][0]
        seeds = ch.grid_seeds
        lrs = [lr for lr in sorted(by_lr) if set(seeds) <= set(by_lr[lr])]
        vals = np.array([[100 * by_lr[lr][k]["val_accuracy"] for k in seeds] for lr in lrs])
        mean, sd = vals.mean(1), vals.std(1, ddof=1) if len(seeds) > 1 else np.zeros(len(lrs))
        st = _style(m)
        ax.errorbar(lrs, mean, yerr=sd, color=st["color"], linestyle=st["linestyle"],
                    marker=None, capsize=2, lw=1.2, label=f"{LABELS.get(m, m)} (chosen {ch.lr:g})")
        inside = [i for i, lr in enumerate(lrs) if lr in ch.visited]
        outside = [i for i, lr in enumerate(lrs) if lr not in ch.visited]
        ax.plot([lrs[i] for i in inside], mean[inside], st["marker"], color=st["color"], ms=4)
        if outside:
          ax.plot([lrs[i] for i in outside], mean[outside], st["marker"], mfc="white",
                  color=st["color"], ms=5)
        i = lrs.index(ch.lr)
        ax.plot([ch.lr], [mean[i]], "o", mfc="none", mec=st["color"], ms=13, mew=2)
        top = max(top, float(mean.max()))
        plotted += list(mean)
        ticks |= set(lrs)
        low = min(low, ch.visited[0])
      ax.set_xscale("log")
      # From the lowest visited grid's start (first-pass runs below it are in the appendix).
      ax.set_xlim(low / 1.3, max(ticks) * 1.3)
      ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(
          sorted(lr for lr in ticks if lr >= low)))
      ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.tick_params(axis="x", labelsize=6)
      # Show the top of the curves: the floor sits below the lower quartile of the points.
      span = float(np.clip(2 * (top - np.percentile(plotted, 25)), 3, 12))
      ax.set_ylim(top - span, top + 0.15 * span)
      ax.set_title(f"{SETTING_LABELS.get(s, s)}\n"
                   + ("step lr·|g|" if group == "plain" else "normalised: step lr"), fontsize=8)
      ax.set_xlabel("peak learning rate")
      seeds = a.tuned[s][next(iter(a.tuned[s]))][0].grid_seeds
      ax.set_ylabel(f"validation accuracy (%), seeds {seeds[0]}-{seeds[-1]}")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  paths.append(os.path.join(results_dir, FIGURES[0]))
  _save(fig, paths[-1])
  plt.close(fig)

  # effects.png: differences against SAM with intervals and the MDE band.
  heights = [max(1, sum((s, m) in a.vs_sam for m in a.tuned[s])) for s in settings]
  fig, axes = plt.subplots(len(settings), 1, figsize=(8, 1.2 + 0.42 * sum(heights)),
                           squeeze=False, gridspec_kw={"height_ratios": heights})
  for ax, s in zip(axes[:, 0], settings):
    ms = [m for m in a.tuned[s] if (s, m) in a.vs_sam]
    for y, m in enumerate(reversed(ms)):
      c = a.vs_sam[s, m]
      ax.fill_between([-c.mde_holm, c.mde_holm], y - 0.35, y + 0.35, color="0.85", lw=0)
      ax.plot([c.lo, c.hi], [y, y], color=COLORS.get(m, "k"), lw=2)
      ax.plot([c.mean], [y], _style(m)["marker"], color=COLORS.get(m, "k"), ms=6)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(ms)), [f"{LABELS.get(m, m)}  (Holm p {_p(a.vs_sam[s, m].p_holm)})"
                                   for m in reversed(ms)], fontsize=7)
    ax.set_ylim(-0.6, len(ms) - 0.4)
    ax.set_title(SETTING_LABELS.get(s, s), fontsize=8)
    ax.grid(alpha=0.3, axis="x")
  axes[-1, 0].set_xlabel("test accuracy minus SAM's (pp): dot = mean, bar = unadjusted 95% CI,\n"
                         "grey = ± MDE at Holm's level (80% power); labels: Holm-adjusted p")
  fig.tight_layout()
  paths.append(os.path.join(results_dir, FIGURES[1]))
  _save(fig, paths[-1])
  plt.close(fig)

  # tuned.png: test accuracy against lambda_max at the chosen rates.
  fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4.4), squeeze=False)
  for ax, s in zip(axes[0], settings):
    for m, (ch, res) in a.tuned[s].items():
      eig = [max(r["top_eigenvalue"], 1e-6) for r in res.values()]
      acc = [100 * r["test_accuracy"] for r in res.values()]
      st = _style(m)
      ax.scatter(eig, acc, color=st["color"], alpha=0.5, s=12, marker=st["marker"], lw=0)
      ax.scatter([np.exp(np.mean(np.log(eig)))], [np.mean(acc)], color=st["color"], marker="X",
                 s=90, edgecolors="black", lw=0.6, label=f"{LABELS.get(m, m)} (lr {ch.lr:g})")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(SETTING_LABELS.get(s, s) + ": chosen rates,\nX = mean accuracy, geometric mean "
                 "lambda_max", fontsize=8)
    ax.set_xlabel("final lambda_max (Lanczos; X at the geometric mean)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  paths.append(os.path.join(results_dir, FIGURES[2]))
  _save(fig, paths[-1])
  plt.close(fig)
  return paths


def main(argv: list[str] | None = None) -> int:
  """Writes the page and the figures; prints the README's three lines."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--results", default=os.path.join("experiments", "results"))
  p.add_argument("--page", default=os.path.join("docs", "study.md"))
  args = p.parse_args(argv)
  runs = load_runs(args.results)
  if not runs:
    print(f"no run JSON under {args.results}", file=sys.stderr)
    return 1
  a = analyse(runs)
  os.makedirs(os.path.dirname(os.path.abspath(args.page)), exist_ok=True)
  with open(args.page, "w", encoding="utf-8") as f:
    f.write(format_page(a, runs, os.path.relpath(
        args.results, os.path.dirname(os.path.abspath(args.page))).replace(os.sep, "/")))
  plot(a, args.results)
  print(readme_lines(a))
  return 0


if __name__ == "__main__":
  sys.exit(main())
