"""The manual (docs/, Sphinx): a warning-free build, the API reference, the docstrings."""

import inspect
import os
import re
import subprocess
import sys

import pytest

import xsam_optax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("Args:", "Returns:", "Examples:", "References:")  # optax's order


def test_api_reference_builds_without_warnings(tmp_path):
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E",
       "-b", "html", os.path.join(ROOT, "docs"), str(out)],
      capture_output=True, text=True, check=False, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for name in xsam_optax.__all__:
    page = out / "_autosummary" / f"xsam_optax.{name}.html"
    assert page.exists(), name
    assert f"xsam_optax.{name}" in page.read_text(encoding="utf-8"), name
  api = (out / "api.html").read_text(encoding="utf-8")
  assert 'id="xsam_optax.flax_utils.TrainState"' in api
  # The install page comes first in the manual's table of contents.
  index = (out / "index.html").read_text(encoding="utf-8")
  assert index.index('href="install.html"') < index.index('href="guide.html"')
  pages = {"install": "Install and first steps", "guide": "The training step", "performance": "Performance",
           "study": "Reproduction study", "design": "Why each hand-written helper exists",
           "CHANGELOG": "Changelog"}
  for page, heading in pages.items():
    assert heading in (out / f"{page}.html").read_text(encoding="utf-8"), page


def test_api_reference_lists_every_public_name_once():
  with open(os.path.join(ROOT, "docs", "api.rst"), encoding="utf-8") as f:
    text = f.read()
  listed = re.findall(r"^   ([A-Za-z_]\w*)$", text, flags=re.MULTILINE)
  assert sorted(listed) == sorted(xsam_optax.__all__)


def _public_callables():
  for name in xsam_optax.__all__:
    obj = getattr(xsam_optax, name)
    if inspect.isfunction(obj):
      yield name, obj


@pytest.mark.parametrize("name, fn", list(_public_callables()))
def test_public_docstrings_have_optax_sections_in_order(name, fn):
  doc = inspect.getdoc(fn)
  found = [s for s in SECTIONS if re.search(rf"^{s}$", doc, flags=re.MULTILINE)]
  assert found[:3] == ["Args:", "Returns:", "Examples:"], (name, found)
  positions = [re.search(rf"^{s}$", doc, flags=re.MULTILINE).start() for s in found]
  assert positions == sorted(positions), (name, found)
  assert ">>> " in doc.split("Examples:")[1], name  # doctested


def test_library_docstrings_state_no_benchmark_figures():
  """Speed-ups drift; the generated Performance page (docs/performance.md) has them."""
  package = os.path.join(ROOT, "xsam_optax")
  for module in sorted(os.listdir(package)) + sorted(
      os.path.join("train", m) for m in os.listdir(os.path.join(package, "train"))):
    if not module.endswith(".py"):
      continue
    with open(os.path.join(package, module), encoding="utf-8") as f:
      text = f.read()
    for figure in re.findall(r"[^\n]*\b\d+(?:\.\d+)?x\b[^\n]*", text):
      pytest.fail(f"{module}: a speed figure in the source: {figure.strip()}")


def test_readme_links_to_the_api_reference():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert "](docs/" in readme and "sphinx" in readme


def _code_of_every_page():
  """(name, code) of every page's and example's Python: README and docs/*.md fences,
  examples/*.py, the notebooks' code cells."""
  import json  # pylint: disable=g-import-not-at-top
  fence = re.compile(r"```python\n(.*?)```", re.DOTALL)
  names = ["README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(
      os.path.join(ROOT, "docs"))) if n.endswith(".md")]
  for name in names:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
      for code in fence.findall(f.read()):
        yield name, code
  for folder, ext in (("examples", ".py"), ("notebooks", ".ipynb")):
    for n in sorted(os.listdir(os.path.join(ROOT, folder))):
      if not n.endswith(ext):
        continue
      with open(os.path.join(ROOT, folder, n), encoding="utf-8") as f:
        text = f.read()
      if ext == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"]
                         if c["cell_type"] == "code")
      yield os.path.join(folder, n), text


def test_no_page_writes_the_refresh_period_twice_or_not_at_all():
  # A host schedule whose period is not the transform's refreshes on other
  # steps, silently: pages take it from the transform (refresh_schedule) or
  # pass the period explicitly, never rely on refresh_due's default.
  readme = ""
  for name, code in _code_of_every_page():
    for args in re.findall(r"refresh_due\(([^()]*)\)", code):
      assert "," in args, f"{name}: refresh_due({args}) assumes period 2"
    readme += code if name == "README.md" else ""
  assert "schedule = xsam_optax.refresh_schedule(tx)" in readme
  assert "refresh=schedule(step)" in readme
