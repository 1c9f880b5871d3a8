"""The package's shape: layered modules, short functions, what ships with it."""

import ast
import io
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "xsam_optax")

# Each private module may import only private modules of lower layers (the
# design page). The public modules above them (the package, flax_utils and the
# train/ harness) may import only public names: what a user could write.
LAYERS = {
    "_validation": 0, "_tree": 0,
    "_hvp": 1, "_gauss_newton": 1, "_finite_difference": 1, "_estimators": 1,
    "_groups": 1,
    "_accumulate": 2, "_float_leaves": 2, "_tracking": 2, "_ascent": 2,
    "_sam": 3, "_correction": 3, "_eigen_sam": 3,
    "_alias": 4,
}
MAX_FUNCTION_LINES = 60


def _library_files():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def _module_name(path):
  relative = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return relative[:-len(".__init__")] if relative.endswith(".__init__") else relative


def imported_modules(source, module):
  """Every ``xsam_optax`` module ``source`` imports, in any import form.

  ``import xsam_optax._m [as x]``, ``from xsam_optax import _m``,
  ``from xsam_optax._m import name``, and the relative forms ``from . import
  _m`` / ``from ._m import name`` (resolved against ``module``); a name
  imported from a package counts as its submodule when one exists.
  """
  found = set()
  package = module.split(".")
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names
                   if alias.name.split(".")[0] == "xsam_optax")
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[:len(package) - node.level]
        origin = ".".join(base + ([node.module] if node.module else []))
      else:
        origin = node.module or ""
      if origin.split(".")[0] != "xsam_optax":
        continue
      for alias in node.names:
        candidate = f"{origin}.{alias.name}"
        path = os.path.join(ROOT, *candidate.split("."))
        is_module = os.path.exists(path + ".py") or os.path.isdir(path)
        found.add(candidate if is_module else origin)
  return found


def test_import_finder_sees_every_form():
  source = "\n".join([
      "import xsam_optax._tree", "import xsam_optax._hvp as h",
      "from xsam_optax import _estimators", "from xsam_optax._sam import sam_ascent",
      "from . import _tracking", "from ._ascent import sam_point",
      "from xsam_optax import xsam", "import numpy"])
  assert imported_modules(source, "xsam_optax._alias") == {
      "xsam_optax._tree", "xsam_optax._hvp", "xsam_optax._estimators",
      "xsam_optax._sam", "xsam_optax._tracking", "xsam_optax._ascent", "xsam_optax"}


def test_every_private_module_has_a_layer():
  modules = {f[:-3] for f in os.listdir(PACKAGE) if f.startswith("_") and f != "__init__.py"}
  assert modules == set(LAYERS)


def _private(module):
  return [part for part in module.split(".")[1:] if part.startswith("_")]


@pytest.mark.parametrize("path", [os.path.relpath(p, ROOT) for p in _library_files()])
def test_modules_import_only_lower_layers_or_public_names(path):
  module = _module_name(os.path.join(ROOT, path))
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    imported = imported_modules(f.read(), module)
  name = module.split(".")[-1]
  if module == "xsam_optax":  # The package re-exports its private modules.
    assert all(m == "xsam_optax" or m.split(".")[1] in LAYERS for m in imported)
    return
  if name in LAYERS and module.count(".") == 1:
    private = {m.split(".")[1] for m in imported if _private(m)}
    higher = {m for m in private if LAYERS[m] >= LAYERS[name]}
    assert not higher, f"{module} (layer {LAYERS[name]}) imports {higher}"
    assert "xsam_optax" not in imported, f"{module} imports the package itself"
    return
  private = sorted(m for m in imported if _private(m))
  assert not private, f"{module} is public and imports private {private}"


def _code_lines(source: str, node: ast.AST) -> int:
  """Lines of ``node`` holding code: no docstring, comment or blank line."""
  docstring = set()
  if ast.get_docstring(node, clean=False) is not None:
    docstring = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
  lines = set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                      tokenize.DEDENT, tokenize.ENDMARKER):
      continue
    lines.update(line for line in range(token.start[0], token.end[0] + 1)
                 if node.lineno <= line <= node.end_lineno and line not in docstring)
  return len(lines)


def test_no_library_function_is_longer_than_sixty_lines_of_code():
  long = []
  for path in _library_files():
    with open(path, encoding="utf-8") as f:
      source = f.read()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.FunctionDef):
        lines = _code_lines(source, node)
        if lines > MAX_FUNCTION_LINES:
          long.append(f"{os.path.relpath(path, ROOT)}:{node.name} ({lines})")
  assert not long, long


def test_the_package_ships_a_type_marker_and_its_license():
  assert os.path.exists(os.path.join(PACKAGE, "py.typed"))
  with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
    pyproject = f.read()
  assert re.search(r'xsam_optax = \[[^\]]*"py\.typed"', pyproject)
  # The SPDX expression (PEP 639), which setuptools reads from version 77 on.
  assert '\nlicense = "Apache-2.0"\n' in pyproject
  assert '\nlicense-files = ["LICENSE"]\n' in pyproject
  assert 'requires = ["setuptools>=77"]' in pyproject
  with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
    license_text = f.read()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text
