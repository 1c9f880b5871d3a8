"""Outputs of a comparison: ``metrics.json``, ``curves.png`` and the final table.

Example:
  >>> runs = {"sgd": {"test_accuracy": [0.5, 0.9], "top_eigenvalue": [3.0, 2.0],
  ...                 "mean_ms_per_step": 1.25, "config": {"optimizer": "sgd"}},
  ...         "xsam": {"test_accuracy": [0.6, 0.92], "top_eigenvalue": [3.0, 1.5],
  ...                  "mean_ms_per_step": 2.5,
  ...                  "config": {"optimizer": "xsam", "rho": 0.05, "alpha": 0.2,
  ...                             "method": "power", "num_iters": 1, "update_every": 2,
  ...                             "curvature": "gauss-newton", "normalize": True,
  ...                             "rule": "reference"}}}
  >>> print(format_table(runs))
  optimizer  test acc  top eigenvalue  ms/step  configuration
  sgd          0.9000           2.000     1.25  -
  xsam         0.9200           1.500     2.50  rho 0.05, alpha 0.2, power 1 every 2, gauss-newton
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import subprocess
from typing import Any

# The packages whose versions a result records (not imported: reading their
# metadata is enough, and keeps this module light).
VERSIONED = ("xsam-optax", "jax", "jaxlib", "optax", "flax")


def provenance() -> dict[str, Any]:
  """What produced a result: the library's git commit and the packages' versions.

  ``git_commit`` is the commit of the checkout the imported ``xsam_optax`` lives
  in, with ``git_modified`` true when its tracked files differ from it; both
  ``"unknown"`` outside a checkout (an installed wheel) or without git.
  ``versions`` maps each of :data:`VERSIONED` to its installed version (``None``
  when it is not installed).
  """
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    try:
      out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True,
                           timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
      return None
    return out.stdout.strip()

  commit = git("rev-parse", "HEAD")
  modified = git("status", "--porcelain", "--untracked-files=no") if commit else None
  versions = {}
  for name in VERSIONED:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"git_commit": commit or "unknown",
          "git_modified": "unknown" if modified is None else bool(modified),
          "versions": versions}


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
  """Writes ``metrics`` as indented JSON (non-finite floats become ``null``)."""

  def clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
      return None
    if isinstance(obj, dict):
      return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
      return [clean(v) for v in obj]
    return obj

  with open(path, "w", encoding="utf-8") as f:
    json.dump(clean(metrics), f, indent=2, allow_nan=False)
    f.write("\n")


def plot_curves(path: str, runs: dict[str, dict[str, Any]], *, title: str = "") -> None:
  """Test accuracy and top Hessian eigenvalue vs epoch, one line per optimizer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax_acc, ax_eig) = plt.subplots(1, 2, figsize=(10, 4))
  for name, run in runs.items():
    epochs = range(1, len(run["test_accuracy"]) + 1)
    ax_acc.plot(epochs, run["test_accuracy"], marker=".", label=name)
    ax_eig.plot(epochs, run["top_eigenvalue"], marker=".", label=name)
  ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
  ax_eig.set(xlabel="epoch", ylabel="top Hessian eigenvalue",
             title="Top eigenvalue (Lanczos, fixed batch)")
  for ax in (ax_acc, ax_eig):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def describe(config: dict[str, Any] | None) -> str:
  """A run's settings beyond the shared base optimizer, for the table ("-": none)."""
  if not config or config.get("optimizer") == "sgd":
    return "-"
  parts = [f"rho {config['rho']:g}"] if "rho" in config else []
  if config.get("optimizer") == "xsam":
    parts += [f"alpha {config['alpha']:g}",
              f"{config['method']} {config['num_iters']} every {config['update_every']}",
              config["curvature"]]
    if config["rule"] != "reference":
      parts.append(config["rule"])
    if not config["normalize"]:
      parts.append("not normalised")
  return ", ".join(parts) or "-"


def format_table(runs: dict[str, dict[str, Any]]) -> str:
  """One row per optimizer: final test accuracy, final top eigenvalue, mean ms/step, settings."""
  lines = [f"{'optimizer':<9}  {'test acc':>8}  {'top eigenvalue':>14}  {'ms/step':>7}"
           "  configuration"]
  for name, run in runs.items():
    lines.append(
        f"{name:<9}  {run['test_accuracy'][-1]:>8.4f}  {run['top_eigenvalue'][-1]:>14.3f}"
        f"  {run['mean_ms_per_step']:>7.2f}  {describe(run.get('config'))}")
  return "\n".join(lines)
