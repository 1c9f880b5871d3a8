"""The tuned study (experiments/study.py) and its report (experiments/report.py)."""

import doctest
import importlib.util
import math
import os
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
    for _ in range(total):
      u, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
      params = optax.apply_updates(params, u)
    return params

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


def test_choose_and_t_interval():
  r = lambda v: {"val_accuracy": v, "finite": True}
  # The chosen rate's extra seeds (3, 4) must not enter the choice.
  by_lr = {0.1: {0: r(0.50), 1: r(0.52)}, 0.2: {0: r(0.60), 1: r(0.58), 3: r(0.1), 4: r(0.1)},
           0.4: {0: r(0.55), 1: r(0.57)}}
  assert report.choose(by_lr) == (0.2, "")
  # A rate missing a grid seed (an interrupted run) is not a candidate.
  by_lr[0.8] = {0: r(0.99)}
  assert report.choose(by_lr) == (0.2, "")
  assert report.choose({0.1: {0: r(0.5)}, 0.2: {0: r(0.4)}}) == (0.1, "low edge")
  diverged = {"val_accuracy": 0.9, "finite": False}
  assert report.choose({0.1: {0: r(0.5)}, 0.2: {0: diverged}}) == (0.1, "low edge")
  d = [1.0, 2.0, 3.0, 4.0, 5.0]
  mean, lo, hi = report.t_interval(d)
  half = 2.7764451051977987 * np.std(d, ddof=1) / math.sqrt(5)  # t_{0.975, 4}
  assert mean == 3.0 and math.isclose(hi - mean, half) and math.isclose(mean - lo, half)


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
    chosen, _ = report.choose({lr: {0: next(
        r["results"] for r in runs if r["method"] == method and r["seed"] == 0
        and r["peak_lr"] == lr)} for lr in seeds[0]})
    assert seeds[1] == [chosen]
  for run in runs:
    assert run["command"] == "python experiments/study.py --quick --out " + out + " --cache-dir ''"
    assert f"--lrs {run['peak_lr']:g} --seeds {run['seed']}" in run["rerun_row_command"]
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
  assert report.main(["--results", out]) == 0
  summary = open(os.path.join(out, "summary.md"), encoding="utf-8").read()
  assert "| SGD | " in summary and "| X-SAM reference (normalised) | " in summary
  assert "python experiments/study.py --quick" in summary
  for figure in ("grid.png", "tuned.png"):
    assert os.path.getsize(os.path.join(out, figure)) > 1000


@pytest.mark.parametrize("module", [study, report], ids=["study", "report"])
def test_docstring_examples(module):
  # The examples import `experiments.study`: run them with the repository root on the path.
  sys.path.insert(0, ROOT)
  try:
    failures, tried = doctest.testmod(module, verbose=False)
  finally:
    sys.path.remove(ROOT)
  assert tried > 0 and failures == 0
