"""X-SAM on several devices: pmap, shard_map and sharded jit.

XLA fixes the number of devices when JAX starts, and the rest of the suite
runs on one; so ``distributed_checks.py`` runs once, in a fresh process with 8
simulated CPU devices, and these tests assert on the JSON it prints. The
oracle is the same step on one device over the whole batch.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5  # float32, the bar

# 8 CPU devices; backend optimisation level 0 halves XLA:CPU compile time,
# which is most of what these subprocesses spend.
ENV = {
    **os.environ,
    "XLA_FLAGS": " ".join((
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0")).strip(),
    "JAX_PLATFORMS": "cpu",
}


SCRIPTS = {
    "checks": ["tests/distributed_checks.py"],
    "sharded_example": ["examples/sharded_training.py", "--steps", "3",
                        "--update-every", "2", "--num-iters", "2",
                        "--batch-size", "32", "--hidden", "32",
                        "--features", "8"],
    "pmap_example": ["examples/pmap_training.py", "--steps", "3",
                     "--update-every", "2", "--num-iters", "2",
                     "--batch-size", "32", "--hidden", "32",
                     "--features", "8"],
}


class Script:
  """A script started in the background; ``output()`` waits for it."""

  def __init__(self, args, log_dir):
    self.args = args
    self.stdout = open(log_dir / "stdout", "w+")
    self.stderr = open(log_dir / "stderr", "w+")
    self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV,
                                 stdout=self.stdout, stderr=self.stderr,
                                 text=True)

  def output(self, timeout=600):
    returncode = self.proc.wait(timeout=timeout)
    self.stdout.seek(0)
    self.stderr.seek(0)
    stdout, stderr = self.stdout.read(), self.stderr.read()
    assert returncode == 0, (
        f"{self.args} failed ({returncode}):\n{stderr[-5000:]}")
    return stdout

  def close(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    self.stdout.close()
    self.stderr.close()


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
  # All three start at once: each spends most of its time in single-threaded
  # XLA compilation, so they overlap well on a few cores.
  started = {name: Script(args, tmp_path_factory.mktemp(name))
             for name, args in SCRIPTS.items()}
  yield started
  for script in started.values():
    script.close()


@pytest.fixture(scope="module")
def results(scripts):
  res = json.loads(scripts["checks"].output())
  assert res["device_count"] == 8
  return res


def assert_matches_one_device(res):
  for quantity in ("updates", "eigenvector", "eigenvalue", "params", "loss"):
    assert res[quantity] < RTOL, (quantity, res[quantity])
  assert res["cos_angle"] < RTOL
  # The comparison is between nontrivial numbers: a refresh moved the
  # eigenvalue, which is well away from 0.
  eigenvalues = res["eigenvalues"]
  assert min(abs(e) for e in eigenvalues) > 0.1
  assert eigenvalues[0] != eigenvalues[-1]


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_pmap_equals_one_device_on_the_whole_batch(results, method):
  res = results["pmap"][method]
  assert_matches_one_device(res)
  assert res["replica_spread"] < 1e-6
  assert res["compiles_after_first_step"] == 0


def test_shard_map_with_a_global_mean_loss_equals_one_device(results):
  res = results["shard_map"]["power"]
  assert_matches_one_device(res)
  assert res["compiles_after_first_step"] == 0


def test_reference_steps_do_not_recompile(results):
  assert results["reference_compiles_after_first_step"] == {
      "power": 0, "lanczos": 0}


def test_sharded_jit_equals_unsharded(results):
  res = results["sharded_jit"]["power"]
  assert_matches_one_device(res)
  assert res["compiles_after_first_step"] == 0


def test_sharded_jit_keeps_the_eigenvector_sharded_like_the_params(results):
  res = results["sharded_jit"]["power"]
  # The check is not vacuous: the kernels really are split over "model".
  assert "model" in res["param_shardings"]["hidden"]["kernel"]
  assert "model" in res["param_shardings"]["out"]["kernel"]
  assert res["eigenvector_sharding_matches"], (
      res["eigenvector_shardings"], res["param_shardings"])


def test_sharded_jit_gathers_no_parameter(results):
  res = results["sharded_jit"]["power"]
  assert res["param_sized_all_gathers"] == [], res["all_gathers"]


def test_the_all_gather_check_sees_a_ravelled_estimator(results):
  # Control for the test above: the same power iteration on a ravelled
  # vector (jax.flatten_util.ravel_pytree) gathers whole parameters, and the
  # HLO scan reports it; the pytree version compiled the same way does not.
  control = results["all_gather_detection"]
  assert control["ravelled"]["param_sized_all_gathers"]
  assert control["pytree"]["param_sized_all_gathers"] == []


def test_explicit_mesh_axes(results):
  # With AxisType.Explicit the shardings are part of the types: the state
  # from a plain jax.jit(tx.init) is sharded like the params without any
  # out_shardings, and Lanczos' basis keeps it.
  res = results["explicit_mesh"]["lanczos"]
  assert_matches_one_device(res)
  assert res["init_eigenvector_sharding_matches"]
  assert res["eigenvector_sharding_matches"], res["eigenvector_shardings"]
  assert res["param_sized_all_gathers"] == [], res["all_gathers"]
  assert res["compiles_after_first_step"] == 0


STEP_LINE = re.compile(r"^step +(\d+) +loss ([\d.]+) +eigenvalue (-?[\d.]+)",
                       re.M)


def test_sharded_training_example_runs(scripts):
  out = scripts["sharded_example"].output()
  assert "mesh: {'data': 2, 'model': 4}" in out
  steps = STEP_LINE.findall(out)
  assert [int(s) for s, _, _ in steps] == [0, 1, 2]
  assert all(float(e) != 0.0 for _, _, e in steps)
  assert "eigenvector sharded like the parameters: True" in out


def test_pmap_training_example_runs(scripts):
  out = scripts["pmap_example"].output()
  steps = STEP_LINE.findall(out)
  assert [int(s) for s, _, _ in steps] == [0, 1, 2]
  assert all(float(e) != 0.0 for _, _, e in steps)
  spread = float(re.search(r"between replicas: (\S+)", out).group(1))
  assert spread < 1e-6


def test_one_group_per_device_equals_one_device_computing_the_groups(results):
  # grouped_grad_fn(loss, batch, 8) on a mesh sharding the batch over 8
  # devices, and pmap with each device's local gradient as the incoming one,
  # both equal one device computing the 8-group formula.
  res = results["groups"]
  for name in ("sharded_jit", "pmap"):
    for quantity in ("updates", "eigenvector", "eigenvalue", "params", "loss"):
      assert res[name][quantity] < RTOL, (name, quantity, res[name][quantity])
    assert res[name]["cos_angle"] < RTOL
  assert res["sharded_jit"]["compiles_after_first_step"] == 0
  assert res["pmap"]["replica_spread"] < 1e-6
  # Not vacuous: 8 groups give another update than the global perturbation.
  assert res["grouped_vs_global_updates"] > 1e-3


def test_one_group_per_device_needs_no_collective_before_the_sam_point(results):
  counts = results["groups"]["sam_point_all_reduces"]
  assert counts["grouped"] == 0
  assert counts["global"] >= 1  # control: the global point sums gradients across devices
