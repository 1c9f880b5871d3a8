"""Sphinx configuration: the manual (Markdown pages) and the API reference.

Build (warnings are errors, as in tests/test_docs.py)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import shutil
import sys

from docutils import nodes

# The checkout's package, ahead of any installed copy.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import xsam_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "xsam-optax"
author = "xsam-optax authors"
copyright = "the xsam-optax authors, Apache-2.0"  # pylint: disable=redefined-builtin
release = xsam_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
templates_path = ["_templates"]
exclude_patterns = ["_build"]

autosummary_generate = True
# autosummary writes a page per listed name and never deletes one: start from
# nothing, so that a name which left the API leaves no stale page behind.
shutil.rmtree(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_autosummary"),
              ignore_errors=True)
autodoc_typehints = "none"  # the docstrings' Args say what each argument is
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # types come from the Attributes text
myst_heading_anchors = 3
# The generated pages (performance.md, study.md) may jump heading levels.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_static_path = []


# Images that a run writes (xsam-train's runs/curves.png) exist only after the
# run: in a fresh clone they become a line of text instead of a warning. Images
# committed to the repository (experiments/results/*.png) must exist.
RUN_OUTPUTS = ("runs",)


def _run_outputs_as_text(app, doctree):
  docdir = os.path.dirname(app.env.doc2path(app.env.docname))
  for image in list(doctree.findall(nodes.image)):
    uri = image["uri"]
    path = os.path.normpath(os.path.join(docdir, uri))
    relative = os.path.relpath(path, os.path.dirname(app.srcdir))
    if relative.split(os.sep)[0] in RUN_OUTPUTS and not os.path.exists(path):
      text = nodes.emphasis(text=f"{relative} (written by the run)")
      image.replace_self(text)


def setup(app):
  # Before Sphinx's image collector (priority 500), which warns on a missing file.
  app.connect("doctree-read", _run_outputs_as_text, priority=400)
