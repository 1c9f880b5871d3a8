"""Shared fixtures. Shared helpers and oracles live in ``_oracles.py``."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test in float64 (where precision is the point)."""
  with jax.enable_x64(True):
    yield
