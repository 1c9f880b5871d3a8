"""Shared fixtures. Shared helpers and oracles live in ``_oracles.py``."""

import os
import shutil
import tempfile

# Most of the suite's time is XLA:CPU compiling small programs. Backend
# optimisation level 0 compiles them about a fifth faster and runs the same
# HLO (the numbers are the same to rounding). Set before any JAX backend
# starts; subprocesses and notebook kernels the tests start inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    (os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0")).strip()

# One persistent compilation cache per test run, shared by the pytest-xdist
# workers (which split a module's tests and would each compile its programs)
# and by the processes the tests start. The controller loads this file before
# it starts the workers, which inherit its environment; it removes the cache
# when the run ends.
CACHE_DIR = os.environ.setdefault(
    "XSAM_OPTAX_TEST_CACHE",
    os.path.join(tempfile.gettempdir(), f"xsam-optax-tests-{os.getpid()}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controller, once
    shutil.rmtree(CACHE_DIR, ignore_errors=True)


@pytest.fixture
def x64():
  """Runs the test in float64 (where precision is the point)."""
  with jax.enable_x64(True):
    yield
