"""The ``xsam-train`` CLI: short real runs, the files they write, and bad flags."""

import contextlib
import io
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xsam_optax
from xsam_optax.train import cli
from xsam_optax.train import data as data_lib
from xsam_optax.train import loop
from xsam_optax.train import optimizers
from xsam_optax.train import models

# Few steps, few products: the point is the plumbing, not the numbers.
QUICK = ["--optimizer", "all", "--epochs", "2", "--batch-size", "64", "--eig-iters", "2",
         "--eval-batch-size", "128", "--update-every", "3", "--num-iters", "2", "--no-progress"]
RUN_FIELDS = {"config", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
              "top_eigenvalue", "mean_cos_angle", "mean_abs_cos_angle", "ms_per_step",
              "mean_ms_per_step", "compile_seconds", "mean_grad_norm", "eval_seconds"}


def run_cli(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = cli.main(argv)
  return status, out.getvalue()


def _quick_run(tmp_path_factory, dataset, model, train_size=None, extra=()):
  out_dir = tmp_path_factory.mktemp(dataset)
  argv = QUICK + ["--dataset", dataset, "--model", model, "--out", str(out_dir), *extra]
  if train_size:
    argv += ["--train-size", str(train_size)]
  status, stdout = run_cli(argv)
  with open(out_dir / "metrics.json", encoding="utf-8") as f:
    metrics = json.load(f)
  return {"dataset": dataset, "status": status, "stdout": stdout, "metrics": metrics,
          "out_dir": out_dir}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """The default model (CNN with BatchNorm) on a third of the digits training set.

  Refreshing every step: one compiled X-SAM step of the CNN instead of two
  (the MLP run below takes the host-chosen refreshes)."""
  return _quick_run(tmp_path_factory, "digits", "cnn", train_size=480,
                    extra=("--update-every", "1", "--batch-size", "32"))


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
  """The MLP (no BatchNorm) on a slice of MNIST-1D."""
  return _quick_run(tmp_path_factory, "mnist1d", "mlp", train_size=512)


@pytest.fixture(params=["digits_run", "mnist1d_run"])
def quick_run(request):
  return request.getfixturevalue(request.param)


def test_writes_metrics_with_every_field(quick_run):
  assert quick_run["status"] == 0
  metrics = quick_run["metrics"]
  assert metrics["dataset"] == quick_run["dataset"]
  assert set(metrics["runs"]) == {"sgd", "sam", "xsam"}
  epochs = metrics["protocol"]["epochs"]
  for name, run in metrics["runs"].items():
    assert RUN_FIELDS <= set(run), name
    for field in ("train_loss", "test_loss", "test_accuracy", "top_eigenvalue", "ms_per_step"):
      assert len(run[field]) == epochs and all(np.isfinite(run[field])), (name, field)
    assert run["config"]["optimizer"] == name
    assert run["config"]["gradient_given_to_base"]
    assert run["mean_ms_per_step"] > 0
  assert metrics["runs"]["sgd"]["mean_cos_angle"] is None
  cos = metrics["runs"]["xsam"]["mean_cos_angle"]
  assert len(cos) == epochs and all(-1 <= c <= 1 for c in cos)
  assert metrics["runs"]["xsam"]["config"]["alpha"] == 0.2


def test_writes_png(quick_run):
  with open(quick_run["out_dir"] / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_prints_final_table(quick_run):
  lines = quick_run["stdout"].splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
  assert "test acc" in lines[header] and "ms/step" in lines[header]
  rows = [line.split()[0] for line in lines[header + 1: header + 4]]
  assert rows == ["sgd", "sam", "xsam"]
  # Each row states its configuration: the flags that set it (QUICK and the fixture's).
  update_every = "1" if quick_run["dataset"] == "digits" else "3"
  assert lines[header + 1].endswith("  -")
  assert lines[header + 2].endswith("  rho 0.05")
  assert lines[header + 3].endswith(
      f"  rho 0.05, alpha 0.2, power 2 every {update_every}, hessian")


def test_metrics_record_the_code_that_produced_them(quick_run):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  environment = quick_run["metrics"]["environment"]
  for name in ("jax", "jaxlib", "optax", "flax"):
    assert environment["versions"][name] == importlib.metadata.version(name)
  commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(xsam_optax.__file__), check=False).stdout.strip()
  assert environment["git_commit"] == (commit or "unknown")


def test_table_names_each_rows_settings():
  """Another curvature, rule or normalisation shows in the X-SAM row."""
  from xsam_optax.train import report  # pylint: disable=g-import-not-at-top
  args = cli.parse_args(["--curvature", "gauss-newton", "--rule", "sign_invariant",
                         "--no-normalize", "--method", "lanczos", "--num-iters", "3",
                         "--update-every", "5", "--rho", "0.1", "--alpha", "0.5"])
  config = cli._run_config(args, "xsam")  # pylint: disable=protected-access
  assert report.describe(config) == (
      "rho 0.1, alpha 0.5, lanczos 3 every 5, gauss-newton, sign_invariant, not normalised")
  assert report.describe(cli._run_config(args, "sam")) == "rho 0.1"  # pylint: disable=protected-access
  assert report.describe(cli._run_config(args, "sgd")) == "-"  # pylint: disable=protected-access


def test_digits_accuracy_well_above_chance(digits_run):
  for name, run in digits_run["metrics"]["runs"].items():
    assert run["test_accuracy"][-1] > 0.6, name  # Chance is 0.1.


def test_same_data_order_for_every_optimizer():
  first = loop.epoch_batches(64, 16, seed=3, epoch=0)
  np.testing.assert_array_equal(first, loop.epoch_batches(64, 16, seed=3, epoch=0))
  assert not np.array_equal(first, loop.epoch_batches(64, 16, seed=3, epoch=1))
  assert sorted(first.ravel()) == list(range(64))


def test_same_initialisation_for_every_optimizer():
  model = models.make_model("mlp", num_classes=3)
  x = jnp.ones((2, 5))
  init = lambda name, seed: loop.init_state(
      model, optimizers.make_optimizer(name, learning_rate=0.1).tx, x, seed=seed).params
  sgd, xsam = init("sgd", 3), init("xsam", 3)
  jax.tree.map(np.testing.assert_array_equal, sgd, xsam)
  assert float(jnp.abs(sgd["Dense_0"]["kernel"]).sum()) > 0


def test_train_step_compiles_once_per_variant():
  x = jnp.ones((8, 4, 4, 1))
  y = jnp.arange(8) % 3
  model = models.make_model("mlp", num_classes=3)
  tx = optimizers.make_optimizer("xsam", learning_rate=0.1, update_every=2, num_iters=1,
                           method="power").tx
  state = loop.init_state(model, tx, x, seed=0)
  step = jax.jit(loop.make_train_step(model, tx), static_argnames="refresh")
  for i in range(4):
    state, _ = step(state, x, y, refresh=i % 2 == 0)
  assert step._cache_size() == 2  # pylint: disable=protected-access


def _tiny_dataset(num_train=80, num_test=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_train + num_test, 6)).astype(np.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
  return data_lib.Dataset("tiny", x[:num_train], y[:num_train], x[num_train:],
                          y[num_train:], 3)


def _training_kwargs(model, dataset):
  eval_x, eval_y = jnp.asarray(dataset.x_train[:16]), jnp.asarray(dataset.y_train[:16])
  return dict(epochs=2, batch_size=16, seed=0, eval_x=eval_x, eval_y=eval_y,
              top_eigenvalue_fn=jax.jit(loop.make_top_eigenvalue_fn(model, num_iters=2)),
              eval_fn=jax.jit(loop.make_eval_fn(model)))


@pytest.mark.parametrize("refresh_every", [3, None])
def test_run_training_picks_refreshes_on_the_optimizers_schedule(monkeypatch,
                                                                 refresh_every):
  """Which compiled step the loop runs at each step, with stand-ins for the
  compiled steps: refresh at global steps 0, k, 2k, ... across epoch
  boundaries that are not multiples of k (5 steps per epoch, k = 3), the
  transform's own schedule (count % k == 0); one program without a period."""
  calls = []

  def fake_compile_steps(model, optimizer, state, x, y):
    del model, x, y
    assert optimizer.refresh_every == refresh_every

    def step_for(refresh):
      def step(state, x, y):
        calls.append(refresh)
        metrics = {"loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0, "cos_angle": 0.0}
        return state._replace(step=state.step + 1), metrics
      return step

    keys = (None,) if optimizer.refresh_every is None else (True, False)
    return {k: step_for(k) for k in keys}

  monkeypatch.setattr(loop, "compile_steps", fake_compile_steps)
  dataset, model = _tiny_dataset(), models.make_model("mlp", num_classes=3)
  tx = optax.with_extra_args_support(optax.sgd(0.1))  # never run: cheap to init
  loop.run_training(model, optimizers.Optimizer(tx, refresh_every), dataset,
                    **dict(_training_kwargs(model, dataset),
                           top_eigenvalue_fn=lambda *a: 0.0,
                           eval_fn=lambda *a: (0.0, 0.0)))
  if refresh_every is None:
    assert calls == [None] * 10
  else:
    assert calls == [count % 3 == 0 for count in range(10)]


def test_run_training_with_host_refreshes_equals_the_in_graph_schedule():
  """End to end: the two compiled steps picked on the host give the run of the
  transform following its own schedule under lax.cond."""
  dataset, model = _tiny_dataset(), models.make_model("mlp", num_classes=3)
  optimizer = optimizers.make_optimizer("xsam", learning_rate=0.1, update_every=3,
                                  num_iters=1, method="power")
  kwargs = _training_kwargs(model, dataset)
  host = loop.run_training(model, optimizer, dataset, **kwargs)[0]
  in_graph = loop.run_training(model, optimizer.tx, dataset, **kwargs)[0]
  assert int(host.step) == 10
  assert float(optax.tree.get(host.opt_state, "eigenvalue")) != 0.0
  chex.assert_trees_all_close((host.params, host.opt_state),
                              (in_graph.params, in_graph.opt_state), rtol=1e-5, atol=1e-6)


# Every setting make_optimizer takes, a non-default value for each.
SETTINGS = {"momentum": 0.5, "weight_decay": 0.05, "rho": 0.3, "alpha": 0.9,
            "update_every": 3, "num_iters": 3, "method": "lanczos", "normalize": False,
            "rule": "sign_invariant", "seed": 7}
USED_BY = {"sgd": ("momentum", "weight_decay"),
           "sam": ("momentum", "weight_decay", "rho"),
           "xsam": tuple(SETTINGS),
           "eigensam": ("momentum", "weight_decay", "rho", "alpha", "update_every",
                        "num_iters", "method", "seed")}


def _explicit(name, *, learning_rate, momentum=0.9, weight_decay=5e-4, rho=0.05,
              alpha=0.2, update_every=2, num_iters=1, method="power",
              normalize=True, rule="reference", seed=0):
  """What make_optimizer documents, built from the library directly."""
  base = optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))
  tracking = dict(update_every=update_every, num_iters=num_iters, method=method,
                  seed=seed)
  return {"sgd": lambda: base,
          "sam": lambda: optax.chain(xsam_optax.sam_ascent(rho), base),
          "xsam": lambda: optax.chain(
              xsam_optax.sam_ascent(rho),
              xsam_optax.eigenvector_correction(alpha, rule=rule,
                                                normalize=normalize, **tracking), base),
          "eigensam": lambda: optax.chain(
              xsam_optax.eigen_sam_ascent(rho, alpha, **tracking), base)}[name]()


def _program(tx):
  """The jaxprs of ``init`` and of one ``update`` (refreshes under lax.cond)."""
  params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([0.3])}
  grad_fn = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) * p["b"][0])
  tx = optax.with_extra_args_support(tx)
  update = lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn)
  return (str(jax.make_jaxpr(tx.init)(params))
          + str(jax.make_jaxpr(update)(tx.init(params))))


@pytest.mark.parametrize("name", list(USED_BY))
def test_make_optimizer_forwards_every_setting(name):
  """Each setting reaches the transform (the same program as the library built
  with it) and matters (another program than the default's); the refresh
  period the loop reads is the transform's ``update_every``."""
  default = _program(optimizers.make_optimizer(name, learning_rate=0.1).tx)
  assert default == _program(_explicit(name, learning_rate=0.1))
  for setting in USED_BY[name]:
    kw = {setting: SETTINGS[setting]}
    if setting == "method":  # Lanczos needs at least 2 products.
      kw["num_iters"] = SETTINGS["num_iters"]
    optimizer = optimizers.make_optimizer(name, learning_rate=0.1, **kw)
    got = _program(optimizer.tx)
    assert got == _program(_explicit(name, learning_rate=0.1, **kw)), setting
    assert got != default, setting
    refreshes = name in ("xsam", "eigensam")
    # The period the host chooses refreshes on: the transform's (default 2).
    assert optimizer.refresh_every == (kw.get("update_every", 2) if refreshes else None)


def test_gauss_newton_curvature_reaches_the_refresh():
  """--curvature gauss-newton: the step's refresh equals one built by hand
  from xsam_optax.gauss_newton_fn of the model's logits, and differs from the
  Hessian refresh."""
  import optax
  import xsam_optax
  x = jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
  y = jnp.arange(16) % 3
  model = models.make_model("mlp", num_classes=3)
  tx = optimizers.make_optimizer("xsam", learning_rate=0.1, num_iters=3).tx
  state = loop.init_state(model, tx, x, seed=0)
  eigenvector = lambda s: optax.tree.get(s.opt_state, "eigenvector")
  gn_state, _ = jax.jit(loop.make_train_step(model, tx, curvature="gauss-newton"),
                        static_argnames="refresh")(state, x, y, refresh=True)
  hessian_state, _ = jax.jit(loop.make_train_step(model, tx),
                             static_argnames="refresh")(state, x, y, refresh=True)

  logits = lambda p: model.apply({"params": p}, x, train=True)
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  grad_fn = jax.grad(lambda p: ce(logits(p)))
  _, by_hand = jax.jit(lambda s, p: tx.update(  # jitted: eagerly each op compiles
      grad_fn(p), s, p, grad_fn=grad_fn, refresh=True,
      curvature_fn=xsam_optax.gauss_newton_fn(logits, ce)))(state.opt_state, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               eigenvector(gn_state), optax.tree.get(by_hand, "eigenvector"))
  difference = jax.tree.map(lambda a, b: jnp.abs(a - b).max(),
                            eigenvector(gn_state), eigenvector(hessian_state))
  assert max(jax.tree.leaves(difference)) > 1e-3


def test_finite_difference_curvature_reaches_the_refresh():
  """--curvature finite-difference: the step's refresh equals one built by
  hand from xsam_optax.finite_difference_fn of the step's own gradient."""
  import optax
  import xsam_optax
  x = jax.random.normal(jax.random.key(0), (16, 4, 4, 1))
  y = jnp.arange(16) % 3
  model = models.make_model("mlp", num_classes=3)
  opt = optimizers.make_optimizer("xsam", learning_rate=0.1, num_iters=2,
                                  curvature="finite-difference")
  assert opt.curvature == "finite-difference"
  state = loop.init_state(model, opt.tx, x, seed=0)
  fd_state, _ = jax.jit(loop.make_train_step(model, opt.tx, curvature=opt.curvature),
                        static_argnames="refresh")(state, x, y, refresh=True)

  logits = lambda p: model.apply({"params": p}, x, train=True)
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  grad_fn = jax.grad(lambda p: ce(logits(p)))
  _, by_hand = jax.jit(lambda s, p: opt.tx.update(
      grad_fn(p), s, p, grad_fn=grad_fn, refresh=True,
      curvature_fn=xsam_optax.finite_difference_fn(grad_fn, grad_fn(p))))(
          state.opt_state, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               optax.tree.get(fd_state.opt_state, "eigenvector"),
               optax.tree.get(by_hand, "eigenvector"))


def test_config_states_what_xsam_hands_the_base_optimizer():
  args = cli.parse_args(["--no-normalize", "--rule", "sign_invariant", "--alpha", "0.5"])
  config = cli._run_config(args, "xsam")  # pylint: disable=protected-access
  assert config["normalize"] is False and config["rule"] == "sign_invariant"
  assert config["alpha"] == 0.5 and "length kept" in config["gradient_given_to_base"]
  default = cli._run_config(cli.parse_args([]), "xsam")  # pylint: disable=protected-access
  assert default["normalize"] is True and "unit norm" in default["gradient_given_to_base"]
  assert default["curvature"] == "hessian"
  gauss_newton = cli._run_config(cli.parse_args(["--curvature", "gauss-newton"]), "xsam")  # pylint: disable=protected-access
  assert gauss_newton["curvature"] == "gauss-newton"
  assert "raw" in cli._run_config(args, "sgd")["gradient_given_to_base"]  # pylint: disable=protected-access


def test_xsam_defaults_are_the_librarys():
  """The CLI and make_optimizer run X-SAM at the library's defaults."""
  import inspect
  import xsam_optax
  library = inspect.signature(xsam_optax.xsam).parameters
  helper = inspect.signature(optimizers.make_optimizer).parameters
  args = cli.parse_args([])
  for name in ("rho", "alpha", "update_every", "num_iters", "method", "normalize",
               "rule"):
    assert helper[name].default == library[name].default, name
    assert getattr(args, name) == library[name].default, name


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar10"], "--dataset"),
    (["--rho", "-0.1"], "--rho"),
    (["--alpha", "2.5"], "--alpha"),
    (["--alpha", "-0.1"], "--alpha"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--update-every", "0"], "--update-every"),
    (["--curvature", "fisher"], "--curvature"),
    (["--method", "lanczos", "--num-iters", "1"],
     "--num-iters must be >= 2 with --method lanczos, got 1"),
    (["--rule", "sign-invariant"], "--rule"),
    (["--out", "/proc/no/such/folder"], "--out '/proc/no/such/folder' cannot be created"),
    (["--train-size", "10", "--batch-size", "64"], "--train-size"),
    # Larger than the training split (digits has 1347 examples), with or
    # without --train-size: an epoch would have no step.
    (["--dataset", "digits", "--batch-size", "2000"],
     "--batch-size must be <= the 1347 training examples of digits, got 2000"),
    (["--dataset", "digits", "--train-size", "3000", "--batch-size", "1500"],
     "--batch-size must be <= the 1347 training examples of digits "
     "(--train-size 3000), got 1500"),
    (["--lr", "inf"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["--rho", "inf"], "--rho must be a finite number >= 0"),
    (["--seed", str(2 ** 63)], "--seed must be in [0, 2**63)"),
    (["--sam-groups", "0"], "--sam-groups must be >= 1, got 0"),
    (["--sam-groups", "3"], "--sam-groups must divide --batch-size (128), got 3"),
])
def test_bad_flags_exit_nonzero_with_one_line(argv, message, capsys,
                                              monkeypatch):
  def compiled(*args, **kwargs):
    raise AssertionError("a bad flag must be reported before compiling")

  monkeypatch.setattr(loop, "init_variables", compiled)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code != 0
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("xsam-train: error:"), err
  assert message in err


def test_cli_choices_are_the_names_the_library_accepts():
  """The choices the parser lists (without importing them) are exactly the names
  the library and the training modules accept."""
  from xsam_optax import _correction, _tracking  # the names' one home
  assert cli.METHODS == tuple(_tracking.METHODS)
  assert cli.RULES == tuple(_correction.RULES)
  assert cli.MODELS == models.MODELS
  assert cli.OPTIMIZERS == optimizers.OPTIMIZERS
  assert cli.CURVATURES == optimizers.CURVATURES
  assert set(cli.DATASET_PACKAGES) == set(data_lib.DATASETS)


def test_library_exports_every_public_name():
  """``xsam_optax`` imports its names on first use: each one resolves, as ``__all__`` says."""
  assert set(xsam_optax.__all__) == set(xsam_optax._EXPORTS)  # pylint: disable=protected-access
  for name in xsam_optax.__all__:
    assert getattr(xsam_optax, name).__module__ == xsam_optax._EXPORTS[name], name  # pylint: disable=protected-access
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    getattr(xsam_optax, "nonexistent")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs xsam-train's main() with sys.argv[1:] (after an optional setup line) and
# prints, last on stdout, the heavy packages that were imported by then.
SHELL = """
import sys
{setup}
from xsam_optax.train import cli
try:
  status = cli.main(sys.argv[1:])
except SystemExit as e:
  status = e.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & {{"jax", "jaxlib", "flax", "optax"}})
print("imported:", heavy)
sys.exit(status)
"""


def _shell(*argv, setup=""):
  return subprocess.run([sys.executable, "-c", SHELL.format(setup=setup), *argv],
                        capture_output=True, text=True, check=False, cwd=ROOT)


def test_help_and_bad_flags_answer_before_jax_is_imported(tmp_path):
  """--help and every flag error need no JAX (it takes seconds to import)."""
  helped = _shell("--help")
  assert helped.returncode == 0 and "--overwrite" in helped.stdout
  assert helped.stdout.splitlines()[-1] == "imported: []"
  for argv in (["--rho", "-1"], ["--method", "lanczos", "--num-iters", "1"],
               ["--dataset", "cifar10"]):
    bad = _shell(*argv, "--out", str(tmp_path))
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("xsam-train: error:")
    assert bad.stdout.splitlines()[-1] == "imported: []", argv


def test_without_the_train_extra_one_line_names_it(tmp_path):
  """A plain `pip install` lacks Flax: one line says which extra to install."""
  proc = _shell(*TINY, "--out", str(tmp_path), setup="sys.modules['flax'] = None")
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith("xsam-train: error:") and "flax" in proc.stderr
  assert proc.stderr.rstrip().endswith("pip install 'xsam-optax[train]'")
  assert not os.listdir(tmp_path)


def test_out_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys):
  (tmp_path / "metrics.json").write_text("{}")
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_args(["--out", str(tmp_path)])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "holds an earlier run (metrics.json)" in err
  assert "--overwrite" in err
  assert cli.parse_args(["--out", str(tmp_path), "--overwrite"]).overwrite
  assert (tmp_path / "metrics.json").read_text() == "{}"  # parsing writes nothing


# ------------------------------------------------------------------- Ctrl-C


TINY = ["--dataset", "digits", "--model", "mlp", "--train-size", "64", "--batch-size", "32",
        "--epochs", "1", "--eig-iters", "2", "--eval-batch-size", "32", "--update-every", "1",
        "--no-progress"]


def test_ctrl_c_ends_with_130_and_writes_what_finished(tmp_path):
  """SIGINT to the shell command once sgd has finished: status 130, one line on
  stderr and no traceback, and the metrics and curves of sgd in a folder --out
  created (it did not exist)."""
  import signal  # pylint: disable=g-import-not-at-top
  out = tmp_path / "new" / "folder"
  proc = subprocess.Popen(
      [sys.executable, "-m", "xsam_optax.train.cli", *TINY, "--out", str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    finished = []
    for line in proc.stdout:  # The line that says sgd has finished.
      if line.startswith("sgd: finished"):
        finished.append(line)
        proc.send_signal(signal.SIGINT)
        break
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert finished, err
  assert proc.returncode == 130, err
  assert "Traceback" not in err, err
  assert err.count("\n") == 1 and err.startswith("xsam-train: interrupted; wrote "), err
  with open(out / "metrics.json", encoding="utf-8") as f:
    metrics = json.load(f)
  assert "sgd" in metrics["runs"] and "xsam" not in metrics["runs"]
  assert metrics["interrupted"]["finished"] == list(metrics["runs"])
  assert "xsam" in metrics["interrupted"]["not_finished"]
  with open(out / "curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_before_any_optimizer_finished_writes_nothing(tmp_path, monkeypatch,
                                                             capsys):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(loop, "init_variables", interrupted)  # while compiling
  assert cli.main([*TINY, "--out", str(tmp_path)]) == 130
  err = capsys.readouterr().err
  assert err == ("xsam-train: interrupted before any optimizer finished; "
                 "nothing written\n")
  assert not os.listdir(tmp_path)


def test_out_creates_a_folder_that_does_not_exist(tmp_path):
  out = tmp_path / "a" / "b"
  cli.parse_args(["--out", str(out)])
  assert out.is_dir()


@pytest.mark.parametrize("name, curvature, message", [
    ("adam", "hessian",
     "optimizer must be one of ('sgd', 'sam', 'xsam', 'eigensam'), got 'adam'"),
    ("xsam", "fisher",
     "curvature must be one of ('hessian', 'gauss-newton', 'finite-difference'), "
     "got 'fisher'"),
    ("sgd", "fisher",  # checked for every optimizer, used or not
     "curvature must be one of ('hessian', 'gauss-newton', 'finite-difference'), "
     "got 'fisher'"),
], ids=["optimizer", "curvature", "curvature of sgd"])
def test_make_optimizer_names_an_unknown_optimizer_or_curvature(name, curvature,
                                                                message):
  with pytest.raises(ValueError) as info:
    optimizers.make_optimizer(name, learning_rate=0.1, curvature=curvature)
  assert str(info.value) == message


def _trained_optimizers(monkeypatch, tmp_path, *flags):
  """The optimizers the CLI's comparison hands to the training loop, per name."""
  captured = {}

  def run_training(model, optimizer, dataset, **kwargs):
    del model, dataset, kwargs
    captured[optimizer.tx] = optimizer
    curve = [0.5]
    return None, loop.RunResult(curve, curve, curve, curve, curve, None, None,
                                [1.0, 1.0], 0.0)

  monkeypatch.setattr(loop, "run_training", run_training)
  args = cli.parse_args(["--optimizer", "xsam", "--out", str(tmp_path), *flags])
  protocol = loop.make_protocol("digits", "mlp", batch_size=16, epochs=1, lr=0.1,
                                eval_batch_size=16, train_size=32)
  runs = {}
  cli._train_all(args, protocol, None, None, None, runs)  # pylint: disable=protected-access
  assert list(runs) == ["xsam"]
  (optimizer,) = captured.values()
  return optimizer


def _anti_aligned_update(tx):
  """``tx``'s update, no refresh, with the stored eigenvector at -g/||g||:
  the cosine is negative, where the rules differ (|c| against c)."""
  params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([0.3])}
  grad_fn = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) ** 2) * p["b"][0])
  g = grad_fn(params)
  state = tx.init(params)
  norm = optax.tree.norm(g)
  v = jax.tree.map(lambda x: -x / norm, g)
  state = (state[0], state[1]._replace(eigenvector=v), *state[2:])
  # Jitted: eagerly each operation would compile on its own.
  return jax.jit(lambda s: tx.update(g, s, params, grad_fn=grad_fn,
                                     refresh=False)[0])(state)


def test_cli_trains_xsam_with_the_rule_its_flag_names(monkeypatch, tmp_path):
  """--rule reaches the transform the loop trains (not only the recorded config):
  its update is the one of make_optimizer(rule=...), not the default's."""
  optimizer = _trained_optimizers(monkeypatch, tmp_path, "--rule", "sign_invariant")
  got = _anti_aligned_update(optimizer.tx)
  build = lambda rule: optimizers.make_optimizer("xsam", learning_rate=0.1, rule=rule).tx
  chex.assert_trees_all_close(got, _anti_aligned_update(build("sign_invariant")),
                              rtol=1e-6)
  difference = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), got,
                            _anti_aligned_update(build("reference")))
  assert max(jax.tree.leaves(difference)) > 1e-3


def test_cli_refreshes_with_the_curvature_its_flag_names(monkeypatch, tmp_path):
  """--curvature gauss-newton reaches the step the loop compiles: a refresh by
  the optimizer the CLI built moves the eigenvector otherwise than a Hessian
  refresh (that a Gauss-Newton step refreshes as by hand is
  test_gauss_newton_curvature_reaches_the_refresh)."""
  optimizer = _trained_optimizers(monkeypatch, tmp_path, "--curvature", "gauss-newton")
  assert optimizer.curvature == "gauss-newton"
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 6)), jnp.float32)
  y = jnp.arange(8) % 3
  model = models.make_model("mlp", num_classes=3)

  # The same transform refreshing with Hessian products: one initial state.
  hessian = optimizer._replace(curvature="hessian")
  state = loop.init_state(model, optimizer.tx, x, seed=0)

  def refreshed(opt):
    step = jax.jit(loop.make_train_step(model, opt.tx, curvature=opt.curvature),
                   static_argnames="refresh")
    return optax.tree.get(step(state, x, y, refresh=True)[0].opt_state, "eigenvector")

  difference = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), refreshed(optimizer),
                            refreshed(hessian))
  assert max(jax.tree.leaves(difference)) > 1e-3


def test_sam_groups_flag_reaches_the_step(monkeypatch, tmp_path):
  """--sam-groups 4: the loop gets the setting, and its step equals one built by
  hand with xsam_optax.grouped_grad_fn of the training loss, not the global step."""
  import xsam_optax
  optimizer = _trained_optimizers(monkeypatch, tmp_path, "--sam-groups", "4",
                                  "--batch-size", "16")
  assert optimizer.sam_groups == 4
  assert cli._run_config(cli.parse_args(["--sam-groups", "4"]), "sam")["sam_groups"] == 4  # pylint: disable=protected-access
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  y = jnp.arange(16) % 3
  model = models.make_model("mlp", num_classes=3)
  tx = optimizers.make_optimizer("sam", learning_rate=0.1).tx
  state = loop.init_state(model, tx, x, seed=0)
  params = lambda groups: jax.jit(loop.make_train_step(model, tx, sam_groups=groups))(
      state, x, y)[0].params
  loss = lambda p, b: loop.cross_entropy(model.apply({"params": p}, b[0]), b[1])
  grad_fn = xsam_optax.grouped_grad_fn(loss, (x, y), 4)
  updates, _ = jax.jit(lambda s, p: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))(
      state.opt_state, state.params)
  chex.assert_trees_all_close(params(4), optax.apply_updates(state.params, updates),
                              rtol=1e-5, atol=1e-7)
  difference = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), params(4), params(1))
  assert max(jax.tree.leaves(difference)) > 1e-6
