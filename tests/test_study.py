"""Smoke test of the reproduction study: experiments/study.py, then experiments/report.py."""

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(
      f"study_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_study_writes_runs_and_report(tmp_path, capsys):
  study, report = _load("study"), _load("report")
  out = str(tmp_path / "results")
  # Tiny: the point is the plumbing and the fields, not the numbers.
  argv = ["--datasets", "digits", "--seeds", "0", "--optimizers", "sgd", "xsam",
          "--epochs", "1", "--batch-size", "64", "--train-size", "256", "--num-iters", "1",
          "--eig-iters", "4", "--curve-eig-iters", "2", "--probes", "2", "--eval-batch-size", "64", "--out", out,
          "--cache-dir", ""]
  assert study.main(argv) == 0
  files = sorted(os.listdir(out))
  assert files == ["digits__sgd__seed0.json", "digits__xsam__seed0.json"]
  for name in files:
    with open(os.path.join(out, name), encoding="utf-8") as f:
      run = json.load(f)
    assert run["command"].startswith("python experiments/study.py --datasets digits")
    assert "--optimizers " + run["optimizer"] in run["rerun_row_command"]
    assert run["config"]["total_steps"] == 4
    results = run["results"]
    for field in ("test_accuracy", "top_eigenvalue", "lanczos_residual", "hutchinson_trace",
                  "hutchinson_trace_stderr", "final_grad_norm", "wall_seconds"):
      assert np.isfinite(results[field]), (name, field)
    assert 0 <= results["test_accuracy"] <= 1
    if run["optimizer"] == "xsam":
      assert run["config"]["alpha"] == 0.2 and run["config"]["update_every"] == 5
      assert -1 <= results["mean_cos_angle"] <= 1
    else:
      assert results["mean_cos_angle"] is None

  capsys.readouterr()
  assert report.main(["--results", out]) == 0
  summary = open(os.path.join(out, "summary.md"), encoding="utf-8").read()
  assert "| SGD | 1 |" in summary and "| X-SAM (reference rule, alpha 0.2) | 1 |" in summary
  assert "python experiments/study.py" in summary
  assert os.path.getsize(os.path.join(out, "study.png")) > 1000
