"""README.md: a front page whose every Python snippet runs, as written.

The snippet runner and the stand-ins are in ``_snippets.py``; the manual's
snippets (docs/*.md) run in ``test_docs_snippets.py``.
"""

import re

import numpy as np
import optax
import pytest

import _snippets

README = _snippets.Snippets(_snippets.ROOT / "README.md")
MAX_LINES = 250
# Words about how the project is run, not about the product.
PROCESS_WORDS = re.compile(
    r"\bissues?\b|\bsessions?\b|\bthis machine\b|no GPU was available|"
    r"\bthe GPU (run|issue)\b", re.IGNORECASE)


@README.register("Add it to a training step", 0)
def _():
  def setup():
    return _snippets.classifier_namespace()

  def check(before, ns):
    assert _snippets.leaves_differ(ns["params"], before["params"])
    # Step 0 refreshes at the defaults: the eigenvalue is the Hessian's.
    eigenvalue = float(optax.tree.get(ns["opt_state"], "eigenvalue"))
    assert np.isfinite(eigenvalue) and eigenvalue > 0.0
  return setup, check


def test_every_readme_snippet_has_a_stand_in():
  README.check_coverage()


@README.parametrize()
def test_readme_snippet_runs(heading, index, code):
  README.run(heading, index, code)


def _text():
  return README.path.read_text(encoding="utf-8")


def test_readme_is_a_front_page():
  assert len(_text().splitlines()) <= MAX_LINES


# The pages written by hand; performance.md and study.md are generated.
HAND_WRITTEN = ("README.md", "docs/install.md", "docs/guide.md", "docs/design.md",
                "docs/index.rst", "docs/api.rst")


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_says_nothing_about_how_the_project_is_run(name):
  text = (_snippets.ROOT / name).read_text(encoding="utf-8")
  found = [m.group(0) for m in PROCESS_WORDS.finditer(text)]
  assert not found, f"{name} talks about how the project is run: {found}"


def test_readme_keeps_the_two_commands():
  # .ci/run calls the test command; the main job is the other one.
  text = _text()
  assert "python -m pip install -e '.[train]' && xsam-train\n" in text
  assert "python -m pip install -e '.[test]' && python -m pytest -q\n" in text


def test_readme_cites_the_paper_and_the_package():
  blocks = re.findall(r"```bibtex\n(.*?)```", _text(), flags=re.DOTALL)
  paper = [b for b in blocks if re.match(r"@(misc|article)\{", b)]
  assert paper and "2601.10251" in paper[0]
  assert any(b.startswith("@software{xsam_optax,") for b in blocks)
  for block in blocks:  # balanced braces: each entry parses
    assert block.count("{") == block.count("}"), block


def test_readme_links_to_the_authors_code_and_the_docs():
  text = _text()
  assert "https://github.com/huang5467/X-SAM" in text
  for page in ("guide.md", "performance.md", "study.md", "design.md", "api.rst"):
    assert f"](docs/{page}" in text, page
    assert (_snippets.ROOT / "docs" / page).exists(), page


def test_python_blocks_finds_indented_fences():
  text = "# A\n```python\nx = 1\n```\n- item\n\n  ```python\n  y = 2\n  ```\n"
  assert _snippets.python_blocks(text) == [("A", 0, "x = 1\n"), ("A", 1, "y = 2\n")]
