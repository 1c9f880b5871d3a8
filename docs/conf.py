"""Sphinx configuration: the API reference from the docstrings, and the README.

Build (warnings are errors, as in tests/test_docs.py)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

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
autodoc_typehints = "none"  # the docstrings' Args say what each argument is
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False  # types come from the Attributes text
myst_heading_anchors = 3
# README.md jumps from a section (##) to the generated tables' headings (####).
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_static_path = []
