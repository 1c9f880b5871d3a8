"""Outputs of a comparison: ``metrics.json``, ``curves.png`` and the final table.

Example:
  >>> runs = {"sgd": {"test_accuracy": [0.5, 0.9], "top_eigenvalue": [3.0, 2.0],
  ...                 "mean_ms_per_step": 1.25}}
  >>> print(format_table(runs))
  optimizer  test acc  top eigenvalue  ms/step
  sgd          0.9000           2.000     1.25
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


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


def format_table(runs: dict[str, dict[str, Any]]) -> str:
  """One row per optimizer: final test accuracy, final top eigenvalue, mean ms/step."""
  lines = [f"{'optimizer':<9}  {'test acc':>8}  {'top eigenvalue':>14}  {'ms/step':>7}"]
  for name, run in runs.items():
    lines.append(
        f"{name:<9}  {run['test_accuracy'][-1]:>8.4f}  {run['top_eigenvalue'][-1]:>14.3f}"
        f"  {run['mean_ms_per_step']:>7.2f}")
  return "\n".join(lines)
