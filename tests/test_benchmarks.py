"""The benchmarks' bookkeeping: FLOP amortisation and the performance page.

No timing and no compilation here, except the compile-time benchmark's
smoke run (tiny trees, about half a minute on 2 cores): the arithmetic that
turns compiled programs' counts into a row's cost, and the page written from
the committed results (its code blocks are commands and tables, never Python
that the documentation tests would run).
"""

import json
import os
import re
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _schedules  # noqa: E402  pylint: disable=wrong-import-position
import compile_time  # noqa: E402  pylint: disable=wrong-import-position
import report  # noqa: E402  pylint: disable=wrong-import-position
import step_overhead  # noqa: E402  pylint: disable=wrong-import-position
from _steps import Row  # noqa: E402  pylint: disable=wrong-import-position


def test_host_rows_amortise_one_refresh_over_the_period():
  s = _schedules.Schedule("power", 1, 3)
  row = Row("x", "xsam", s, "host")
  flops = {str(("xsam", s.program, True)): 10.0,
           str(("xsam", "plain", False)): 4.0}
  assert step_overhead.row_flops(row, flops) == pytest.approx((10 + 2 * 4) / 3)
  every = Row("y", "xsam", _schedules.Schedule("power", 1, 1), "host")
  assert step_overhead.row_flops(every, flops) == 10.0


def test_traced_periodic_programs_are_not_counted():
  """A lax.cond program's count includes both branches: never reported."""
  s = _schedules.Schedule("power", 1, 2)
  for path in ("none", "cond"):
    row = Row("x", "xsam", s, path)
    flops = {str(key): 1.0 for key in row.programs().values()}
    assert step_overhead.row_flops(row, flops) is None


def test_periodic_schedules_have_their_every_step_twin_priced():
  """refresh=None every k steps is compared with the same products every step."""
  names = {name for name, _ in step_overhead.schedules()}
  for row in step_overhead.rows():
    if row.optimizer == "xsam" and row.period > 1 and (
        row.schedule.product == "hvp" or row.schedule.num_iters == 1):
      assert step_overhead.every_step_twin(row).removeprefix("X-SAM ") in names


def test_gauss_newton_twins_of_whole_batch_hessian_schedules():
  sweep = _schedules.sweep()
  for s in sweep:
    if s.product == "hvp" and s.fraction == 1.0:
      assert _schedules.Schedule(s.method, s.num_iters, s.update_every,
                                 product="gn") in sweep


def test_page_from_the_committed_results(tmp_path):
  text = report.page(os.path.join(BENCHMARKS, "results"))
  assert text.startswith("# Performance\n")
  assert text.index("## Cost in FLOPs") < text.index("## Wall time on CPU")
  assert "```python" not in text
  # Headings never skip a level (MyST warns, and the docs build fails).
  levels = [len(m) for m in re.findall(r"^(#+) ", text, flags=re.M)]
  assert all(b <= a + 1 for a, b in zip(levels, levels[1:]))
  report.main(["--out", str(tmp_path / "performance.md")])
  assert (tmp_path / "performance.md").read_text() == text


def test_compile_time_smoke(tmp_path):
  """Every candidate compiles; the HLO grows with the number of leaves."""
  path = tmp_path / "c.json"
  assert compile_time.main(["--smoke", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())["rows"]
  small, large = compile_time.SMOKE_LEAVES
  for leaves in (small, large):
    got = {r["candidate"] for r in rows if r["leaves"] == leaves}
    assert got == {c.name for c in compile_time.CANDIDATES}
  assert all(r["compile_s"] > 0 and r["hlo_instructions"] > 0 for r in rows)
  contrib = {r["leaves"]: r["hlo_instructions"] for r in rows
             if r["candidate"] == "contrib.sam"}
  assert contrib[large] > contrib[small]


def test_flop_rows_only_a_smaller_run_priced_are_merged_in():
  row = lambda name, ratio, path="host", optimizer="xsam": {
      "name": name, "path": path, "optimizer": optimizer,
      "flops_ratio_to_sam": ratio}
  big = {"command": "big", "rows": [row("SAM", 1.0, None, "sam"),
                                    row("X-SAM a", 1.5), row("X-SAM b", 1.2),
                                    row("X-SAM d", 2.0)]}
  small = {"command": "small", "rows": [row("SAM", 1.01, None, "sam"),
                                        row("X-SAM c", 1.1),
                                        row("X-SAM c", 1.3, "none")]}
  merged = report._merged_flops([small, big])  # pylint: disable=protected-access
  assert [(r["name"], r["flops_ratio_to_sam"]) for r in merged["rows"]] == [
      ("SAM", 1.0), ("X-SAM a", 1.5), ("X-SAM b", 1.2), ("X-SAM d", 2.0),
      ("X-SAM c", 1.1)]
  assert merged["command"] == "big\nsmall"
  assert big["rows"][-1]["name"] == "X-SAM d"  # the inputs are left alone
