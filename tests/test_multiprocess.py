"""Several processes: X-SAM's multi-host path, run on this machine.

``examples/sharded_training.py --processes 2`` starts two processes with two
simulated CPU devices each; they form one JAX job over 127.0.0.1
(``jax.distributed.initialize``, gloo collectives), a (data 2, model 2) mesh
over the four global devices, each process feeding its own rows of the batch:
what a job with one process per host does. Checked here:

- with ``--check``, process 0 compares the result with one device on the
  whole batch and fails beyond float32 rounding noise (measured in the same
  run by reordering the sums of the one-device run), and so does a run with
  per-group perturbations, one group per process (``--sam-groups 2``);
- Orbax checkpoints written by both processes, restored into a fresh pair of
  processes, continue bit-identically (a pre-empted job resumed);
- a coordinator that never answers fails a process within its
  initialization timeout instead of hanging;
- the launcher (``examples/local_processes.py``) kills every process when
  one fails or its deadline passes.

Every subprocess runs in its own process group under a timeout, and the whole
group is killed when the test fails or times out.
"""

import importlib.util
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = os.fspath(ROOT / "examples" / "sharded_training.py")
# Backend optimisation level 0 halves XLA:CPU compile time, which is most of
# what these processes spend.
ENV = {
    **os.environ,
    "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "")
                  + " --xla_backend_optimization_level=0").strip(),
    "JAX_PLATFORMS": "cpu",
}
STEPS, CHECKPOINT_EVERY = 8, 4  # refreshes at steps 0 and 5: one on each side
SMALL = ["--steps", str(STEPS), "--batch-size", "32", "--features", "8",
         "--hidden", "32"]
JOB_TIMEOUT = 240  # the launcher's deadline for its processes
INIT_TIMEOUT = 60  # jax.distributed.initialize in each process
STEP_LINE = re.compile(r"^step +(\d+) +loss ([\d.]+) +eigenvalue (-?[\d.]+)",
                       re.M)


def start(args):
  return subprocess.Popen(
      [sys.executable, SCRIPT, *args], cwd=ROOT, env=ENV,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      start_new_session=True)  # its own process group, killed as a whole


def finish(proc, timeout):
  """(exit status, output); on timeout or error the process group is killed."""
  try:
    output, _ = proc.communicate(timeout=timeout)
  except BaseException:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and all it started
    proc.communicate()
    raise
  return proc.returncode, output


def run_job(*args):
  proc = start(["--processes", "2", "--devices-per-process", "2",
                "--timeout", str(JOB_TIMEOUT), "--init-timeout",
                str(INIT_TIMEOUT), *SMALL, *args])
  returncode, output = finish(proc, JOB_TIMEOUT + 60)
  assert returncode == 0, output[-5000:]
  return output


@pytest.fixture(scope="module")
def wedged_coordinator():
  """A loopback port that accepts connections and never answers."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, wedged_coordinator):
  # The process stuck on the wedged coordinator only waits; it starts first
  # and overlaps the two-process job.
  wedged = start(["--multi-host", "--coordinator", wedged_coordinator,
                  "--num-processes", "2", "--process-id", "1",
                  "--init-timeout", "5", *SMALL])
  try:
    checkpoints = tmp_path_factory.mktemp("uninterrupted")
    output = run_job("--check", "--checkpoint-dir", os.fspath(checkpoints),
                     "--checkpoint-every", str(CHECKPOINT_EVERY))
    yield {"output": output, "checkpoints": checkpoints, "wedged": wedged}
  finally:
    if wedged.poll() is None:
      os.killpg(wedged.pid, signal.SIGKILL)
      wedged.communicate()


def numbers(line_start, output):
  line = re.search(rf"^{re.escape(line_start)}.*$", output, re.M).group(0)
  return {name: float(value) for name, value in
          re.findall(r"(params|eigenvector|eigenvalue) (\S+?)(?:,|$)", line)}


def test_two_processes_match_one_device_on_the_whole_batch(jobs):
  output = jobs["output"]
  assert "processes: 2, devices: 4 (cpu), mesh: {'data': 2, 'model': 2}" in (
      output)
  got = numbers("relative difference to one device", output)
  noise = numbers("float32 rounding noise", output)
  bound = numbers("bound", output)
  assert set(got) == set(noise) == set(bound) == {
      "params", "eigenvector", "eigenvalue"}
  for name in got:
    assert got[name] <= bound[name], (name, got, bound)
    # The bound is float32 rounding noise, not something that would accept
    # a wrong average: the reordered one-device runs agree to this.
    assert noise[name] < 1e-5, (name, noise)
  # ... and the reordering did reorder (a scalar may still round the same).
  assert noise["params"] > 0 and noise["eigenvector"] > 0, noise
  assert "within float32 noise" in output
  # The comparison is over a nontrivial run: a refresh at step 5 moved the
  # eigenvalue, and the eigenvector kept the parameters' sharding.
  eigenvalues = [float(e) for _, _, e in STEP_LINE.findall(output)]
  assert len(eigenvalues) == STEPS
  assert eigenvalues[4] != eigenvalues[5] and min(map(abs, eigenvalues)) > 0.1
  assert "eigenvector sharded like the parameters: True" in output


def test_two_processes_with_one_group_each_match_one_device():
  """Per-group perturbations (grouped_grad_fn, 2 groups on a data axis of 2):
  each process's SAM point is its own group's, and the run equals one device
  computing the two groups, within the float32 noise measured the same way
  (rows reordered within each group)."""
  output = run_job("--check", "--sam-groups", "2")
  assert "mesh: {'data': 2, 'model': 2}" in output
  got = numbers("relative difference to one device", output)
  bound = numbers("bound", output)
  noise = numbers("float32 rounding noise", output)
  assert set(got) == {"params", "eigenvector", "eigenvalue"}
  for name in got:
    assert got[name] <= bound[name], (name, got, bound)
    assert noise[name] < 1e-5, (name, noise)
  assert "within float32 noise" in output


def read_checkpoint(step_dir):
  """A checkpoint written by several processes, read here as NumPy arrays."""
  import orbax.checkpoint as ocp
  item = step_dir / "default"
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item).item_metadata.tree
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return checkpointer.restore(item, restore_args=restore_args)


def assert_bit_identical(a, b):
  leaves_a, _ = jax.tree.flatten_with_path(a)
  leaves_b, _ = jax.tree.flatten_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_fresh_processes_resume_from_the_checkpoint_bit_identically(
    jobs, tmp_path):
  saved = jobs["checkpoints"]
  assert sorted(p.name for p in saved.iterdir() if p.name.isdigit()) == [
      str(CHECKPOINT_EVERY), str(STEPS)]
  # The pre-empted job: only the middle checkpoint survived.
  resumed = tmp_path / "resumed"
  shutil.copytree(saved / str(CHECKPOINT_EVERY),
                  resumed / str(CHECKPOINT_EVERY))
  output = run_job("--checkpoint-dir", os.fspath(resumed))
  assert f"resumed at step {CHECKPOINT_EVERY}" in output
  assert [int(s) for s, _, _ in STEP_LINE.findall(output)] == list(
      range(CHECKPOINT_EVERY, STEPS))

  final = read_checkpoint(saved / str(STEPS))
  assert_bit_identical(read_checkpoint(resumed / str(STEPS)), final)
  # Not vacuous: training moved on after the checkpoint, through a refresh
  # of the eigenvector (step 5), and the state holds it.
  middle = read_checkpoint(saved / str(CHECKPOINT_EVERY))
  for name in ("params", "eigenvector"):
    pairs = list(zip(leaves_under(middle, name), leaves_under(final, name)))
    assert len(pairs) == 4  # two kernels, two biases
    for leaf_middle, leaf_final in pairs:
      assert not np.array_equal(leaf_middle, leaf_final), name


def leaves_under(tree, name):
  """The leaves below a key called ``name`` (the state's field names)."""
  return [x for path, x in jax.tree.flatten_with_path(tree)[0]
          if f"['{name}']" in jax.tree_util.keystr(path)]


def test_a_wedged_coordinator_fails_within_the_init_timeout(jobs):
  # A process whose coordinator accepts the connection and never answers
  # gives up after --init-timeout 5 (JAX aborts the process), well inside
  # this wait: nothing in the multi-process path waits forever.
  returncode, output = finish(jobs["wedged"], timeout=120)
  assert returncode != 0
  assert "DEADLINE_EXCEEDED" in output, output[-3000:]


def load_launcher():
  spec = importlib.util.spec_from_file_location(
      "local_processes", ROOT / "examples" / "local_processes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# A stand-in for a JAX process: records what the launcher gave it; then
# process 0 sleeps, and process 1 (once process 0 has written its record)
# exits with 3 ("fail") or sleeps too ("hang").
FAKE_PROCESS = """
import os, sys, time
directory, mode, *args = sys.argv[1:]
process_id = int(args[args.index("--process-id") + 1])
record = " ".join([str(os.getpid()), args[args.index("--coordinator") + 1],
                   os.environ["JAX_PLATFORMS"], os.environ["XLA_FLAGS"]])
with open(os.path.join(directory, f"{process_id}.tmp"), "w") as f:
  f.write(record)
os.rename(os.path.join(directory, f"{process_id}.tmp"),
          os.path.join(directory, f"{process_id}.txt"))
if process_id == 1 and mode == "fail":
  while not os.path.exists(os.path.join(directory, "0.txt")):
    time.sleep(0.01)
  sys.exit(3)
time.sleep(600)
"""


def wait_for_files(directory, count):
  deadline = time.monotonic() + 30
  while len(list(directory.glob("*.txt"))) < count:
    assert time.monotonic() < deadline
    time.sleep(0.05)


@pytest.mark.parametrize("mode, timeout, expected",
                         [("fail", 60, 3), ("hang", 5, 124)])
def test_launcher_stops_every_process_when_one_fails_or_time_runs_out(
    tmp_path, mode, timeout, expected):
  launcher = load_launcher()
  assert launcher.run(["-c", FAKE_PROCESS, os.fspath(tmp_path), mode], 2,
                      devices_per_process=3, timeout=timeout) == expected
  wait_for_files(tmp_path, 2)
  records = [(tmp_path / f"{i}.txt").read_text().split(" ", 3)
             for i in range(2)]
  (pid0, address0, *_), (_, address1, platforms, flags) = records
  assert address0 == address1
  assert re.fullmatch(r"127\.0\.0\.1:\d+", address0)
  assert platforms == "cpu"
  assert "--xla_force_host_platform_device_count=3" in flags
  # Process 0 was sleeping for 600 s: the launcher killed and reaped it.
  with pytest.raises(ProcessLookupError):
    os.kill(int(pid0), 0)
