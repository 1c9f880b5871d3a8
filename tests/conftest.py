"""Shared fixtures. Shared helpers and oracles live in ``_oracles.py``."""

import os

# Most of the suite's time is XLA:CPU compiling small programs. Backend
# optimisation level 0 compiles them about a fifth faster and runs the same
# HLO (the numbers are the same to rounding). Set before any JAX backend
# starts; subprocesses and notebook kernels the tests start inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    (os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0")).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def x64():
  """Runs the test in float64 (where precision is the point)."""
  with jax.enable_x64(True):
    yield
