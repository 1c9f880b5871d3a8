"""The benchmarks' bookkeeping: FLOP amortisation and the performance page.

No timing and no compilation here: the arithmetic that turns compiled
programs' counts into a row's cost, and the page written from the committed
results (its code blocks are commands and tables, never Python that the
documentation tests would run). The scripts themselves run, in their smoke
mode, in ``test_page_commands.py``.
"""

import json
import os
import re
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _schedules  # noqa: E402  pylint: disable=wrong-import-position
import groups  # noqa: E402  pylint: disable=wrong-import-position
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


def test_page_opens_with_the_answer_and_is_the_committed_one():
  results = os.path.join(BENCHMARKS, "results")
  text = report.page(results)
  with open(os.path.join(BENCHMARKS, os.pardir, "docs", "performance.md")) as f:
    assert f.read() == text  # generated, not edited by hand
  headings = re.findall(r"^#+ (.*)$", text, flags=re.M)
  assert headings[1] == "In short"
  assert len(headings) == len(set(headings)), "repeated headings"
  short = text.split("## In short")[1].split("\n## ")[0]
  assert len(short.splitlines()) <= 12
  # Oracle: the ResNet-18 run's XLA memory, read here from the JSON itself.
  with open(os.path.join(results, "cpu-resnet18-cpu2.json")) as f:
    d = json.load(f)
  per_param = {k: v / d["config"]["param_bytes"] for k, v in d["memory_xla"].items()}
  sam, refresh = per_param["('sam',)"], per_param["('xsam', ('power', 1, 1.0, 'hvp'), True)"]
  assert f"SAM's step {sam:.1f}x" in short
  assert f"a Hessian refresh step (one power product) {refresh:.1f}x" in short
  assert "No GPU or TPU measurement" in short  # every committed result is a CPU's
  # Every printed command runs from the repository root: its script exists there.
  root = os.path.join(BENCHMARKS, os.pardir)
  commands = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
              for line in block.splitlines() if line.strip()]
  assert commands
  for line in commands:
    script = re.match(r"python (\S+\.py) ", line)
    assert script and os.path.exists(os.path.join(root, script.group(1))), line


def test_from_root_rewrites_commands_run_inside_benchmarks():
  assert report.from_root("cd benchmarks && python quality.py --json results/a.json") == (
      "python benchmarks/quality.py --json benchmarks/results/a.json")
  same = "python benchmarks/estimators.py --json benchmarks/results/e.json"
  assert report.from_root(same) == same


def test_collective_count_reads_tuple_and_async_all_reduces():
  hlo = ("%all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %x), to_apply=%add\n"
         "%ar = (f32[2,3]{1,0}, f32[]) all-reduce(f32[2,3]{1,0} %a, f32[] %b)\n"
         "%s = (f32[2]{0}, f32[2]{0}) all-reduce-start(f32[2]{0} %c)\n"
         "%d = f32[2]{0} all-reduce-done(%s)\n"
         "%g = f32[8]{0} all-gather(f32[1]{0} %e), dimensions={0}\n"
         "%f = f32[] add(f32[] %all-reduce.1, f32[] %b)")
  assert groups.count_collectives(hlo) == {"all-reduce": 3, "all-gather": 1}


def test_guide_states_the_committed_group_costs():
  """The guide's FLOP ratios and all-reduce counts are those of the results file."""
  with open(os.path.join(BENCHMARKS, "results", "groups-cpu2.json"), encoding="utf-8") as f:
    res = json.load(f)
  with open(os.path.join(BENCHMARKS, os.pardir, "docs", "guide.md"), encoding="utf-8") as f:
    guide = " ".join(f.read().split())
  user, cli = res["flops"]["user_step"], res["flops"]["xsam_train_step"]
  mega = lambda x: f"{x / 1e6:.1f} M"
  for name, refresh in (("sam", None), ("xsam", False), ("xsam", True)):
    grouped = user[f"{name} groups=4 refresh={refresh}"]
    global_ = user[f"{name} groups=1 refresh={refresh}"]
    assert f"{mega(grouped)} against {mega(global_)} (x{grouped / global_:.3f})" in guide
    assert grouped / global_ < 1.05  # the shared gradient is computed once
  ratio = cli["sam groups=4 refresh=None"] / cli["sam groups=1 refresh=None"]
  assert f"SAM x{ratio:.2f}" in guide
  c = res["collectives"]
  assert (c["sam groups=1"]["sam_point"], c["sam groups=8"]["sam_point"]) == (1, 0)
  assert (f"a whole SAM step has {c['sam groups=1']['step']} and {c['sam groups=8']['step']}, "
          f"an X-SAM step refreshing its eigenvector {c['xsam groups=1']['step']} and "
          f"{c['xsam groups=8']['step']}") in guide


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
