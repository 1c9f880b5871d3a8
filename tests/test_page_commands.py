"""Every command the Performance and Study pages print runs, in its smoke mode.

The pages are written by ``benchmarks/report.py`` and ``experiments/report.py``
from the results' recorded commands. Each command is run as printed, from the
repository root, with ``--smoke`` appended (every script takes it: the same
code on tiny sizes) and its outputs sent to a temporary folder, so a refactor
that breaks a script, or a flag a page still prints, fails here.
``benchmarks/results`` and ``experiments/results`` are never written.

The commands of one script run in one subprocess (one JAX start for all, and
a persistent compilation cache shared by them: identical smoke programs of two
commands compile once), one subprocess per script, so the scripts' global
settings (XLA flags, caches) never leak into the test process.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = ("docs/performance.md", "docs/study.md")
RESULTS = ("benchmarks/results", "experiments/results")


def page_commands(page: str) -> list[str]:
  """The lines of the page's ``bash`` code blocks, in order."""
  text = (ROOT / page).read_text(encoding="utf-8")
  blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)
  return [line for block in blocks for line in block.splitlines() if line.strip()]


def all_commands() -> list[str]:
  return [c for page in PAGES for c in page_commands(page)]


def _script(command: str) -> str:
  return shlex.split(command)[1]


def smoke_argv(command: str, out: pathlib.Path, index: int) -> list[str]:
  """The command's arguments with ``--smoke`` and every output under ``out``."""
  argv = shlex.split(command)[2:]
  script = _script(command)

  def redirect(flag, value):
    if flag in argv:
      argv[argv.index(flag) + 1] = value
    else:
      argv.extend([flag, value])

  if script.startswith("benchmarks/"):
    if "--json" in argv:
      redirect("--json", str(out / f"{index}.json"))
  elif script == "experiments/study.py":
    # One results folder, as on the page: a later command resumes (skips the
    # runs an earlier one wrote) and report.py reads them. A command that
    # writes elsewhere on the page (a rerun) writes to its own folder.
    redirect("--out", str(out / ("study" if "--out" not in argv else f"study{index}")))
  elif script == "experiments/report.py":
    redirect("--results", str(out / "study"))
    redirect("--page", str(out / "study.md"))
    return argv
  return argv + ["--smoke"]


# Runs each (script, argv) with the script's own main(argv), as
# `python script argv` would (sys.argv, sys.path), and stops at a failure.
DRIVER = """
import importlib.util, json, os, sys
for i, (script, argv) in enumerate(json.loads(sys.argv[1])):
  print(f"$ python {script} {' '.join(argv)}", flush=True)
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  sys.argv = [script] + argv
  spec = importlib.util.spec_from_file_location(f"command{i}", script)
  module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  status = module.main(argv)
  sys.path.pop(0)
  if status:
    sys.exit(f"{script} returned {status}")
"""


def _snapshot():
  return {p: p.stat().st_mtime_ns for d in RESULTS for p in (ROOT / d).rglob("*")}


def test_every_command_runs_from_the_repository_root():
  """Each page command names a script of the repository by its path from the root."""
  commands = all_commands()
  assert len(commands) >= 20
  for command in commands:
    argv = shlex.split(command)
    assert argv[0] == "python", command
    assert (ROOT / argv[1]).is_file(), command
    assert argv[1].split("/")[0] in ("benchmarks", "experiments"), command
    if "--json" in argv:
      assert argv[argv.index("--json") + 1].startswith("benchmarks/results/"), command


SCRIPTS = ("step_overhead", "quality", "fd_accuracy", "estimators", "step_memory",
           "refresh_memory", "compile_time", "study")


def test_every_script_on_the_pages_is_covered():
  scripts = {pathlib.Path(_script(c)).stem for c in all_commands()}
  assert scripts - {"report"} == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_page_commands_run_in_smoke_mode(script, tmp_path):
  commands = [c for c in all_commands()
              if pathlib.Path(_script(c)).stem == script
              or (script == "study" and _script(c) == "experiments/report.py")]
  # Identical commands (a page prints some twice) run once.
  commands = list(dict.fromkeys(commands))
  runs = [(_script(c), smoke_argv(c, tmp_path, i)) for i, c in enumerate(commands)]
  # The environment conftest.py set: XLA's quick compiles and the run's
  # persistent compilation cache (identical programs of two commands compile once).
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  before = _snapshot()
  proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert _snapshot() == before  # the published results are untouched

  if script == "study":
    records = [json.loads(p.read_text()) for p in tmp_path.glob("study*/*.json")]
    assert (tmp_path / "study.md").is_file()
    # Every command trained or found its runs: its first setting, each method.
    for command in commands:
      argv = shlex.split(command)
      if argv[1] == "experiments/study.py":
        setting = argv[argv.index("--settings") + 1]
        assert any(r["setting"] == setting for r in records), command
    environments = [r["environment"] for r in records]
  else:
    written = [json.loads((tmp_path / f"{i}.json").read_text())
               for i, (_, argv) in enumerate(runs) if "--json" in argv]
    assert len(written) == sum("--json" in c for c in commands)
    assert all(d["smoke"] and d["command"].startswith(f"python benchmarks/{script}.py ")
               for d in written)
    environments = [d["environment"] for d in written]
    if script == "compile_time":  # the HLO grows with the leaves
      for d in written:
        sam = {r["leaves"]: r["hlo_instructions"] for r in d["rows"]
               if r["candidate"] == "contrib.sam"}
        assert len(sam) == 2 and sam[max(sam)] > sam[min(sam)], d["command"]
  assert environments
  for environment in environments:  # what produced the numbers
    assert environment["versions"]["jax"] == _version("jax")
    assert environment["versions"]["optax"] == _version("optax")
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", environment["git_commit"])


def _version(name):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  return importlib.metadata.version(name)


def test_every_example_is_run_by_a_test():
  """Each script in examples/ is started by some test (this module or another)."""
  sources = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("*.py"))
  for example in (ROOT / "examples").glob("*.py"):
    assert example.name in sources, example.name


def test_nnx_example_commands_run_in_small():
  """The commands in examples/nnx_training.py's docstring, on 64 examples for one epoch."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = ROOT / "examples" / "nnx_training.py"
  doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
  commands = [line.split("#")[0] for line in doc.splitlines()
              if line.strip().startswith("python examples/nnx_training.py")]
  assert len(commands) == 2
  spec = importlib.util.spec_from_file_location("nnx_training", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for command in commands:
    argv = shlex.split(command)[2:] + ["--epochs", "1", "--train-size", "64",
                                       "--batch-size", "32", "--update-every", "1",
                                       "--num-iters", "2"]
    accuracy = module.main(argv)
    assert 0.0 <= accuracy <= 1.0
