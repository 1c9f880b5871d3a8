"""The package's shape: layered modules, short functions, what ships with it."""

import ast
import io
import os
import re
import tokenize

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "xsam_optax")

# Each module may import only modules of lower layers (README, Design).
LAYERS = {
    "_validation": 0, "_tree": 0,
    "_hvp": 1, "_gauss_newton": 1, "_finite_difference": 1, "_estimators": 1,
    "_accumulate": 1,
    "_tracking": 2, "_ascent": 2,
    "_sam": 3, "_correction": 3, "_eigen_sam": 3,
    "_sam_point": 4,
    "_alias": 5,
}
MAX_FUNCTION_LINES = 60


def _library_files():
  for folder, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def test_every_private_module_has_a_layer():
  modules = {f[:-3] for f in os.listdir(PACKAGE) if f.startswith("_") and f != "__init__.py"}
  assert modules == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_modules_import_only_lower_layers(module):
  with open(os.path.join(PACKAGE, module + ".py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              and node.module == "xsam_optax" for alias in node.names}
  higher = {m for m in imported if LAYERS[m] >= LAYERS[module]}
  assert not higher, f"{module} (layer {LAYERS[module]}) imports {higher}"


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
  assert 'license = { text = "Apache-2.0" }' in pyproject
  with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
    license_text = f.read()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text
