"""The notebooks run top to bottom and draw their plots; the committed copies carry no outputs.

Each notebook is executed with nbclient in a fresh ``python3`` kernel, from the
``notebooks`` directory, as a new user's "Run all" would, except that a cell
after the settings cell shrinks the run (fewer epochs, coarser slices: every
cell still runs the same code). Their own ``SMALL = True`` settings keep a run to
a minute or two on a 2-core CPU; the test's to seconds. The install cell is
skipped because the package is importable, so no network is used.
(These tests execute the notebooks themselves: do not also run pytest with
``--nbmake``.)
"""

import ast
import builtins
import json
import pathlib
import subprocess
import sys

import nbformat
from nbclient import NotebookClient
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart.ipynb", "sharpness.ipynb")
CELL_TIMEOUT_S = 600
KERNEL_STARTUP_TIMEOUT_S = 180  # Generous: CI machines may be busy.
ROOT = NOTEBOOK_DIR.parent
# Settings the test overrides, after the notebook's settings cell.
TEST_SETTINGS = {
    "quickstart.ipynb": "EPOCHS, EIG_ITERS, EVAL_BATCH = 1, 4, 128",
    "sharpness.ipynb": ("EPOCHS, EVAL_BATCH, LANCZOS_ITERS = 1, 128, 8\n"
                        "NUM_RANDOM, SLICE_POINTS, GRID_POINTS = 2, 9, 5"),
}


def _read(name):
  return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _code_cells(nb):
  return [cell for cell in nb.cells if cell.cell_type == "code"]


def _with_test_settings(nb, name):
  """``nb`` with a cell of :data:`TEST_SETTINGS` right after its settings cell."""
  settings = [i for i, cell in enumerate(nb.cells)
              if cell.cell_type == "code" and cell.source.startswith("SMALL = True")]
  assert len(settings) == 1, f"{name}: one settings cell starting with 'SMALL = True'"
  for assignment in TEST_SETTINGS[name].splitlines():  # Only names the notebook sets.
    for variable in assignment.split("=")[0].split(","):
      assert f"\n{variable.strip()} = " in "\n" + nb.cells[settings[0]].source, variable
  nb.cells.insert(settings[0] + 1, nbformat.v4.new_code_cell(TEST_SETTINGS[name]))
  return nb


def test_every_notebook_is_tested():
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells)
           if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, (
      f"{name}: cells {dirty} have outputs or execution counts; clear all outputs "
      "(Jupyter: Edit > Clear Outputs of All Cells) before committing")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_from_a_clone_only_when_needed(name, tmp_path, monkeypatch):
  """The package comes from a clone: the install cell pip-installs the path the user sets."""
  nb = _read(name)
  for cell in _code_cells(nb):
    ast.parse(cell.source)  # Plain Python: no `!pip` / `%magic` lines.
  assert "github.com/xsam-optax" not in json.dumps(nb)  # no placeholder repository
  install = [c.source for c in _code_cells(nb) if "pip" in c.source]
  assert len(install) == 1 and "except ImportError:" in install[0]
  # Run the cell as a kernel without the package would: the imports fail, and
  # pip is called (here recorded, not run) on the path it names.
  real_import = builtins.__import__

  def without_package(module, *args, **kwargs):
    if module in ("xsam_optax", "mnist1d"):
      raise ImportError(module)
    return real_import(module, *args, **kwargs)

  calls = []
  monkeypatch.setattr(builtins, "__import__", without_package)
  monkeypatch.setattr(subprocess, "check_call", calls.append)
  monkeypatch.chdir(NOTEBOOK_DIR)
  exec(install[0], {})  # pylint: disable=exec-used  (XSAM_OPTAX_PATH = "..": the clone)
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", str(ROOT) + "[train]"]]
  source = install[0].replace('XSAM_OPTAX_PATH = ".."', f"XSAM_OPTAX_PATH = {str(tmp_path)!r}")
  with pytest.raises(FileNotFoundError, match="XSAM_OPTAX_PATH="):
    exec(source, {})  # pylint: disable=exec-used  (not a clone)
  assert len(calls) == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws_every_plot(name, tmp_path, monkeypatch):
  # The kernel inherits this environment; ipykernel installs its inline
  # (image/png) backend only when MPLBACKEND is unset.
  monkeypatch.delenv("MPLBACKEND", raising=False)
  nb = _with_test_settings(_read(name), name)
  client = NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, startup_timeout=KERNEL_STARTUP_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  try:
    client.execute()  # Raises CellExecutionError naming the failing cell.
  finally:
    nbformat.write(nb, tmp_path / name)  # The executed copy, to inspect a failure.

  cells = _code_cells(nb)
  errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
  assert not errors
  plotting = [cell for cell in cells if "plt.show()" in cell.source]
  assert plotting
  for cell in plotting:
    images = [out for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1, f"{name}: no plot from the cell\n{cell.source[:200]}"
