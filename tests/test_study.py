"""The tuned study (experiments/study.py) and its report (experiments/report.py)."""

import doctest
import importlib.util
import json
import math
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xsam_optax.train import optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"study_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


study, report = _load("study"), _load("report")


@pytest.mark.parametrize("method", ["sgd", "sam", "xsam", "eigensam"])
def test_runtime_peak_rate_matches_the_scheduled_optimizer(method):
  """cosine(1) schedule times a runtime peak == make_optimizer with cosine(peak): same trajectory."""
  peak, total = 0.3, 6
  target = jnp.array([1.0, -2.0, 0.5])
  curvature = jnp.array([3.0, 1.0, 0.2])
  loss = lambda p: jnp.sum(curvature * (p["w"] - target) ** 2) + jnp.sum(p["w"] ** 4) / 4
  grad_fn = jax.grad(loss)
  spec = study.METHODS[method]
  kwargs = {k: spec[k] for k in ("alpha", "normalize", "rule", "method", "num_iters")
            if k in spec}
  oracle = optimizers.make_optimizer(
      spec["name"], learning_rate=optax.cosine_decay_schedule(peak, decay_steps=total),
      momentum=study.MOMENTUM, weight_decay=study.WEIGHT_DECAY, rho=study.RHO,
      update_every=study.UPDATE_EVERY, seed=3, **kwargs).tx
  tx = study.make_method(spec, total_steps=total, seed=3)
  params = {"w": jnp.zeros(3)}
  ours, theirs = params, params
  s_ours = tx.init(params)
  s_ours = (s_ours[0], study.PeakLRState(jnp.float32(peak)))
  s_theirs = oracle.init(params)

  def trajectory(opt, params, state):  # one compiled program: eager dispatch is slow
    def step(_, carry):  # a loop, not unrolled: one update to compile
      params, state = carry
      u, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, u), state
    return jax.lax.fori_loop(0, total, step, (params, state))[0]

  ours = jax.jit(lambda p, s: trajectory(tx, p, s))(ours, s_ours)
  theirs = jax.jit(lambda p, s: trajectory(oracle, p, s))(theirs, s_theirs)
  assert float(jnp.abs(ours["w"]).max()) > 0.05  # it moved
  np.testing.assert_allclose(ours["w"], theirs["w"], rtol=1e-5, atol=1e-6)


def test_unnormalised_alpha0_control_is_sam():
  """The study runs no normalize=False, alpha 0 control: it is SAM (unit * ||g|| = g)."""
  loss = lambda p: jnp.sum(jnp.array([3.0, 1.0, 0.2]) * (p["w"] - 1.0) ** 2) + jnp.sum(p["w"] ** 4)
  grad_fn = jax.grad(loss)
  params = {"w": jnp.array([0.3, -0.2, 0.1])}
  spec = dict(study.METHODS["xsam_nn"], alpha=0.0)
  kwargs = {k: spec[k] for k in ("alpha", "normalize", "rule", "method", "num_iters")}
  control = optimizers.make_optimizer("xsam", learning_rate=0.1, **kwargs).tx
  sam = optimizers.make_optimizer("sam", learning_rate=0.1).tx

  def trajectory(opt, p):
    state = opt.init(p)
    for _ in range(3):
      u, state = opt.update(grad_fn(p), state, p, grad_fn=grad_fn)
      p = optax.apply_updates(p, u)
    return p

  a = jax.jit(lambda p: trajectory(control, p))(params)
  b = jax.jit(lambda p: trajectory(sam, p))(params)
  np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)


def test_symmetric_label_noise_changes_the_asked_fraction_to_other_classes():
  y = np.random.default_rng(0).integers(0, 10, 20000).astype(np.int32)
  noisy = study.symmetric_label_noise(y, 0.2, 10, seed=5)
  changed = noisy != y
  assert abs(changed.mean() - 0.2) < 0.01
  # Uniform over the 9 other classes: each shift 1..9 about 1/9 of the changes.
  shifts = np.bincount((noisy[changed] - y[changed]) % 10, minlength=10)
  assert shifts[0] == 0 and np.all(np.abs(shifts[1:] / changed.sum() - 1 / 9) < 0.02)
  np.testing.assert_array_equal(study.symmetric_label_noise(y, 0.2, 10, seed=5), noisy)
  with pytest.raises(ValueError, match="label noise"):
    study.symmetric_label_noise(y, 1.0, 10, seed=0)


def test_split_is_disjoint_noisy_on_train_and_validation_only():
  from xsam_optax.train import data as data_lib
  clean = data_lib.load_dataset("digits")
  split = study.load_split("digits", label_noise=0.2, train_size=None)
  n = len(clean.x_train)
  assert len(split.x_train) + len(split.x_val) == n
  assert len(split.x_val) == round(study.VALIDATION_FRACTION * n)
  # Every training and validation image is a distinct original training image.
  rows = {x.tobytes(): y for x, y in zip(clean.x_train, clean.y_train)}
  seen = [x.tobytes() for x in np.concatenate([split.x_train, split.x_val])]
  assert len(set(seen)) == n and set(seen) == set(rows)
  for part_x, part_y in ((split.x_train, split.y_train), (split.x_val, split.y_val)):
    flipped = np.mean([rows[x.tobytes()] != y for x, y in zip(part_x, part_y)])
    assert 0.12 < flipped < 0.28  # noisy on both
  np.testing.assert_array_equal(split.y_test, clean.y_test)  # test labels clean
  assert abs(split.noisy_fraction - 0.2) < 0.04


def _res(correct, of=100, finite=True):
  return {"val_accuracy": correct / of, "finite": finite}


def test_tie_rule_counts_and_smaller_rate():
  # Equal counts tie whatever float rounding of a mean of accuracies would say.
  assert study.best_rate({0.16: 795, 0.08: 795, 0.04: 794}) == 0.08
  assert study.best_rate({0.1: 10, 0.2: None}) == 0.1  # diverged ranks last
  assert study.best_rate({0.1: None, 0.2: None}) == 0.1
  assert study.correct_count(_res(265, 269), 269) == 265
  assert study.correct_count(_res(265, 269, finite=False), 269) is None
  with pytest.raises(ValueError, match="not a count"):
    study.correct_count({"val_accuracy": 0.5012, "finite": True}, 269)
  # The stored float32 accuracies of digits, sign-invariant rule, seeds 0-2: 795 of 807 correct
  # at both rates, but the float means differ in the 8th digit and ranked 0.16 first.
  acc = {0.08: (0.9776951670646667, 0.988847553730011, 0.988847553730011),
         0.16: (0.9814126491546631, 0.9925650358200073, 0.9814126491546631)}
  runs = {lr: {k: {"val_accuracy": v, "finite": True} for k, v in enumerate(vals)}
          for lr, vals in acc.items()}
  assert np.mean(acc[0.16]) > np.mean(acc[0.08])
  choice = report.choose(runs, (0.08, 0.16), 269, max_extend=0)
  assert (choice.lr, choice.totals) == (0.08, {0.08: 795, 0.16: 795})


def test_select_rate_extends_only_while_the_rule_sits_on_an_edge():
  counts = {0.01: 700, 0.02: 790, 0.04: 795, 0.08: 795, 0.16: 798, 0.32: 799}
  asked = []

  def totals_of(lrs):
    asked.append(list(lrs))
    return {lr: counts[lr] for lr in lrs}

  # 0.04 on the edge: extend to 0.08; the tie 0.04 / 0.08 goes to 0.04, inside: stop.
  assert study.select_rate((0.01, 0.02, 0.04), totals_of) == ([0.01, 0.02, 0.04, 0.08], 0.04,
                                                              False)
  assert asked == [[0.01, 0.02, 0.04], [0.01, 0.02, 0.04, 0.08]]
  # Low edge: extended downwards; after max_extend extensions still on the edge.
  down = {0.1: 5, 0.2: 4, 0.05: 6, 0.025: 7}
  assert study.select_rate((0.1, 0.2), lambda lrs: {lr: down[lr] for lr in lrs}, 2) == (
      [0.025, 0.05, 0.1, 0.2], 0.025, True)
  # A missing extension stops the search (the report on an incomplete study).
  assert study.select_rate((0.1, 0.2), lambda lrs: {lr: down[lr] for lr in lrs if lr >= 0.1},
                           2) == ([0.1, 0.2], 0.1, True)


def test_report_replays_the_rule_and_excludes_rates_outside_the_visited_grid():
  r = lambda c: _res(c, 100)
  # 0.2 and 0.4 tie; the rule stops at 0.2 (inside), so 0.8, run by an earlier
  # selection that extended the grid, is no candidate although it scores higher.
  by_lr = {0.1: {0: r(50), 1: r(52)}, 0.2: {0: r(60), 1: r(58), 3: r(1), 4: r(1)},
           0.4: {0: r(59), 1: r(59)}, 0.8: {0: r(99), 1: r(99)}}
  c = report.choose(by_lr, (0.1, 0.2, 0.4), 100)
  assert (c.lr, c.note, c.visited, c.grid_seeds) == (0.2, "", [0.1, 0.2, 0.4], [0, 1])
  # The chosen rate's extra seeds (3, 4) do not enter the counts.
  assert c.totals == {0.1: 102, 0.2: 118, 0.4: 118}
  # Edge after the extensions allowed: noted.
  c = report.choose({0.1: {0: r(5)}, 0.2: {0: r(4)}}, (0.1, 0.2), 100, max_extend=0)
  assert (c.lr, c.note) == (0.1, "low edge")
  c = report.choose({0.1: {0: r(5)}, 0.2: {0: _res(9, finite=False)}}, (0.1, 0.2), 100, 0)
  assert c.lr == 0.1


def test_statistics_against_independent_oracles():
  from scipy import stats
  rng = np.random.default_rng(0)
  for n in (3, 5, 10):
    a, b = rng.normal(0.8, 1.0, n), rng.normal(0.0, 1.0, n)
    assert math.isclose(report.paired_p(a - b), stats.ttest_rel(a, b).pvalue, rel_tol=1e-10)
    mean, lo, hi = report.t_interval(a - b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert math.isclose(lo, ci.low, rel_tol=1e-10) and math.isclose(hi, ci.high, rel_tol=1e-10)
  d = [1.0, 2.0, 3.0, 4.0, 5.0]
  mean, lo, hi = report.t_interval(d)
  half = 2.7764451051977987 * np.std(d, ddof=1) / math.sqrt(5)  # t_{0.975, 4}
  assert mean == 3.0 and math.isclose(hi - mean, half) and math.isclose(mean - lo, half)
  # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04;
  # running maximum 0.02, 0.03, 0.06, 0.06; back in input order. Capped at 1.
  assert report.holm([0.01, 0.04, 0.03, 0.005]) == [0.03, 0.06, 0.06, 0.02]
  assert report.holm([0.5, 0.2, 0.01]) == [0.5, 0.4, 0.03]  # 0.5 x 1 kept: no cap needed
  assert report.holm([0.7, 0.6, 0.01]) == [1.0, 1.0, 0.03]  # 0.6 x 2 capped at 1
  assert report.holm([0.04]) == [0.04]


def test_minimum_detectable_difference_has_the_stated_power():
  """Simulated paired t-tests at the MDE reject in 80% of trials (Monte Carlo oracle)."""
  from scipy import stats
  rng = np.random.default_rng(1)
  for n in (5, 10):
    delta = report.mde_factor(n)  # sd 1
    d = rng.normal(delta, 1.0, (200_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert abs(power - 0.8) < 0.005, (n, power)
    approx = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) / math.sqrt(n)
    assert approx < delta < 1.05 * approx
  assert math.isclose(report.mde([1.0, 2.0, 4.0]), report.mde_factor(3) * np.std([1, 2, 4], ddof=1))


def test_stored_run_reproduces_its_accuracies(tmp_path):
  """A stored record's rerun_row_command, sent to another folder, retrains it to the same numbers."""
  name = "digits_mlp__sgd__lr0.1__seed0.json"
  with open(os.path.join(ROOT, "experiments", "results", name), encoding="utf-8") as f:
    stored = json.load(f)
  argv = shlex.split(stored["rerun_row_command"])
  assert argv[:2] == ["python", "experiments/study.py"]
  assert argv[argv.index("--out") + 1] == study.RERUN_OUT  # not the results folder
  argv[argv.index("--out") + 1] = str(tmp_path)
  # Fewer Lanczos products for the final lambda_max (compiled unrolled: the slow part); training
  # does not depend on them.
  assert study.main(argv[2:] + ["--cache-dir", "", "--eig-iters", "2"]) == 0
  with open(tmp_path / name, encoding="utf-8") as f:
    rerun = json.load(f)
  for key in ("val_accuracy", "test_accuracy", "train_accuracy"):
    assert rerun["results"][key] == stored["results"][key], key
  for key in ("val_loss", "test_loss", "train_loss", "final_grad_norm"):
    assert math.isclose(rerun["results"][key], stored["results"][key], rel_tol=1e-6), key


def test_committed_page_is_what_the_report_writes(tmp_path):
  """docs/study.md is regenerated from the stored runs, not edited by hand."""
  page = tmp_path / "study.md"
  runs = report.load_runs(os.path.join(ROOT, "experiments", "results"))
  a = report.analyse(runs)
  with open(os.path.join(ROOT, "docs", "study.md"), encoding="utf-8") as f:
    assert f.read() == report.format_page(a, runs)
  # Every cell has 10 seeds at its chosen rate.
  assert {len(s) for s in a.seeds.values()} == {10}
  del page


def test_readme_study_answer_is_the_reports():
  """The README's study answer quotes the report's numbers, each with its configuration."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  text = " ".join(readme.split("## The study's answer")[1].split("\n## ")[0].split())
  a = report.analyse(report.load_runs(os.path.join(ROOT, "experiments", "results")))
  assert f"Holm-adjusted over {len(a.vs_sam)} comparisons with SAM" in text
  assert "Lanczos, 4 products every 5 steps" in text
  assert "one power product every 2 steps" in text
  lanczos = [a.vs_sam[s, "xsam"] for s in ("mnist1d_cnn", "mnist1d_cnn_noise20", "digits_mlp")]
  defaults = [a.vs_sam[s, "xsam_default"]
              for s in ("mnist1d_cnn", "mnist1d_cnn_noise20", "digits_mlp")]
  assert (f"beat SAM by {lanczos[0].mean:.2f} pp on an MNIST-1D CNN and {lanczos[1].mean:.2f} pp "
          f"under 20% label noise; on digits ({lanczos[2].mean:+.2f} pp) no difference") in text
  assert all(c.p_holm < 0.05 for c in lanczos[:2]) and lanczos[2].p_holm >= 0.05
  said = lambda c: f"{c.mean:+.2f} pp ({'detected' if c.p_holm < 0.05 else 'not detected'})"
  assert f"{said(defaults[0])}, {said(defaults[1])} and {said(defaults[2])}" in text
  assert all(c.p_holm >= 0.05 for c in a.vs_source.values())
  mdes = [c.mde_holm for c in a.vs_source.values()]
  assert f"(detectable: {min(mdes):.2f}-{max(mdes):.2f} pp)" in text


def test_quick_study_and_report(tmp_path, capsys):
  out = str(tmp_path / "results")
  assert study.main(["--quick", "--out", out, "--cache-dir", ""]) == 0
  runs = report.load_runs(out)
  by = {}
  for run in runs:
    by.setdefault(run["method"], {}).setdefault(run["seed"], []).append(run["peak_lr"])
  assert sorted(by) == ["sgd", "xsam"]
  for method, seeds in by.items():
    grid = study.initial_grid(study.METHODS[method], "digits_mlp")
    assert set(grid) <= set(seeds[0])  # the whole grid on the grid seed
    assert len(seeds[0]) <= len(grid) + 1  # at most one extension (--max-extend 1)
    assert len(seeds[1]) == 1  # the other seed at the chosen rate only
    chosen = report.tuned(runs)["digits_mlp"][method][0].lr
    assert seeds[1] == [chosen]
  for run in runs:
    assert run["command"] == "python experiments/study.py --quick --out " + out + " --cache-dir ''"
    assert f"--lrs {run['peak_lr']:g} --seeds {run['seed']}" in run["rerun_row_command"]
    assert run["rerun_row_command"].endswith("--out " + study.RERUN_OUT)
    results = run["results"]
    for field in ("val_accuracy", "test_accuracy", "top_eigenvalue", "final_grad_norm"):
      assert np.isfinite(results[field]), (run["method"], field)
    assert run["config"]["total_steps"] == 4 and run["config"]["val_examples"] == 64
    if run["method"] == "xsam":
      assert run["config"]["refreshes"] and -1 <= results["mean_cos_angle"] <= 1
    else:
      assert results["mean_cos_angle"] is None
  # Rerunning skips every existing run.
  before = {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)}
  assert study.main(["--quick", "--out", out, "--cache-dir", ""]) == 0
  assert {p: os.path.getmtime(os.path.join(out, p)) for p in os.listdir(out)} == before

  capsys.readouterr()
  page = str(tmp_path / "docs" / "study.md")
  assert report.main(["--results", out, "--page", page]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3 and "[docs/study.md](docs/study.md)" in lines[2]
  text = open(page, encoding="utf-8").read()
  assert "| SGD | " in text and "| X-SAM reference (normalised) | " in text
  assert "](../results/grid.png)" in text  # figures by relative path from the page
  figures = {f: open(os.path.join(out, f), "rb").read() for f in report.FIGURES}
  assert all(len(b) > 1000 for b in figures.values())
  # Regenerating gives the same page and the same bytes.
  assert report.main(["--results", out, "--page", page]) == 0
  assert open(page, encoding="utf-8").read() == text
  assert {f: open(os.path.join(out, f), "rb").read() for f in report.FIGURES} == figures


@pytest.mark.parametrize("module", [study, report], ids=["study", "report"])
def test_docstring_examples(module):
  # The examples import `experiments.study`: run them with the repository root on the path.
  sys.path.insert(0, ROOT)
  try:
    failures, tried = doctest.testmod(module, verbose=False)
  finally:
    sys.path.remove(ROOT)
  assert tried > 0 and failures == 0
