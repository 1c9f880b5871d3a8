"""Shared by the benchmark scripts: interleaved timing, environment, tables.

Timings on a shared, noisy machine: every candidate is compiled and warmed up
first, then the candidates run in rounds, one sample each per round in a
rotating order, so slow periods hit all of them alike; each sample ends with
``jax.block_until_ready``. A candidate's time is the median of its samples;
the ratios that matter are between medians taken in the same process.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from xsam_optax.train import report


def path_label(row: dict) -> str:
  """How a step-cost row's X-SAM step chose its refreshes, for the tables."""
  if row["optimizer"] != "xsam":
    return "-"
  if row["schedule"]["update_every"] == 1:
    return "both (no cond)"
  return {"host": "host", "none": "refresh=None",
          "cond": "refresh=None, lax.cond"}[row["path"]]


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def command(script: str, argv: Sequence[str] | None) -> str:
  """The command that reruns ``script`` with ``argv``, from the repository root.

  ``argv`` is what ``main(argv)`` received (``None``: the process's own
  arguments), so the recorded command does not depend on where it was run from.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  return shlex.join(["python", f"benchmarks/{script}.py", *argv])


def smoke_dir() -> str:
  """A fresh folder for a ``--smoke`` run's caches (never ``benchmarks/.cache``).

  Removed when the process exits.
  """
  path = tempfile.mkdtemp(prefix="xsam-benchmark-smoke-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def environment() -> dict[str, Any]:
  """What the numbers were measured on, and which code measured them.

  ``git_commit``, ``git_modified`` and ``versions`` (jax, jaxlib, optax, flax,
  xsam-optax): ``xsam_optax.train.report.provenance()``.
  """
  device = jax.local_devices()[0]
  return {
      **report.provenance(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.local_device_count(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "load_average_at_start": load_average(),
      "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  }


def time_interleaved(
    candidates: dict[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 2,
    per_call: dict[str, int] | None = None,
) -> dict[str, dict[str, float]]:
  """Median wall time (ms) per unit of each zero-argument callable.

  Args:
    candidates: name -> callable that launches the work and returns its
      output (anything ``jax.block_until_ready`` accepts).
    rounds: samples per candidate; round ``r`` starts at candidate ``r``
      (rotation), so no candidate always runs first.
    warmup: untimed calls of each candidate before the rounds.
    per_call: name -> how many units one call performs (e.g. steps); the
      sample is divided by it. Default 1.

  Returns:
    name -> ``{"median_ms", "q1_ms", "q3_ms", "samples"}``.
  """
  per_call = per_call or {}
  names = list(candidates)
  for name in names:
    for _ in range(warmup):
      jax.block_until_ready(candidates[name]())
  samples = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      jax.block_until_ready(candidates[name]())
      samples[name].append(
          1e3 * (time.perf_counter() - t0) / per_call.get(name, 1))
  out = {}
  for name, xs in samples.items():
    qs = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    out[name] = {"median_ms": statistics.median(xs), "q1_ms": qs[0],
                 "q3_ms": qs[2], "samples": len(xs)}
  return out


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table (also readable as plain text)."""
  cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
           for row in cells]
  lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
  return "\n".join(lines)


def _fmt(x: Any) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    if x != x:  # NaN
      return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
  return str(x)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_json(path: str, payload: dict[str, Any]) -> None:
  """Writes ``payload``; a smoke run's never goes into ``benchmarks/results``."""
  inside = os.path.commonpath([os.path.realpath(path), os.path.realpath(RESULTS)])
  if payload.get("smoke") and inside == os.path.realpath(RESULTS):
    raise SystemExit(f"--smoke: not writing {path} into benchmarks/results "
                     "(published results); pass --json elsewhere")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, sort_keys=False)
    f.write("\n")
  print(f"wrote {path}")


def cache_dir() -> str:
  """Where the quality benchmark keeps trajectories and oracle eigenvectors.

  ``benchmarks/.cache`` (not committed): reruns reuse what is there.
  """
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache under ``directory``/jax.

  On the shared 2-core machine a refresh program takes 10-30 s to compile;
  reruns and identical programs (another seed) then load it instead.
  """
  jax.config.update("jax_compilation_cache_dir", os.path.join(directory, "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
