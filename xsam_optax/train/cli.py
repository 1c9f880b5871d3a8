"""``xsam-train``: compare SGD, SAM and X-SAM on offline data under one protocol.

Example (shell)::

  xsam-train                                  # all three on MNIST-1D, CNN+BatchNorm
  xsam-train --dataset digits --optimizer xsam --alpha 0.5 --out runs/digits

Example (Python; ``main(argv)`` runs the same thing and returns the exit status):
  >>> from xsam_optax.train.cli import parse_args
  >>> args = parse_args(["--dataset", "digits", "--alpha", "0.5"])
  >>> args.dataset, args.alpha, args.epochs, args.optimizer
  ('digits', 0.5, 30, 'all')
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from typing import Any

# Only light modules here: --help and flag errors answer before anything imports
# JAX or Flax (the training modules are imported by _training_modules()).
from xsam_optax.train import data as data_lib
from xsam_optax.train import report

DESCRIPTION = """\
Train a small Flax model with SGD, SAM and X-SAM under one protocol (same data
order, initialisation, cosine schedule and number of steps; the base optimizer is
SGD with momentum and weight decay in every case) and compare test accuracy, the
top Hessian eigenvalue and the cost per step.

What each optimizer hands to the base SGD: sgd the raw mini-batch gradient; sam
the raw gradient at the ascent point theta + rho g/||g||; xsam the SAM gradient
normalised to unit length and corrected along the Hessian's dominant eigenvector
(the reference X-SAM rule; --no-normalize keeps the SAM gradient's length).
With normalisation the learning rate of xsam scales a unit direction, so its
step length is not that of sgd/sam at the same --lr; metrics.json records the
mean clean-gradient norm per epoch (mean_grad_norm) to compare them.
X-SAM refreshes its eigenvector at steps 0, k, 2k, ... (k = --update-every,
default 2, the library's); with k > 1 its step is compiled twice, with and
without the refresh, and the host picks one per step, so only refresh steps
pay for the Hessian-vector products. --curvature gauss-newton multiplies by
the Gauss-Newton matrix instead (for losses convex in the outputs such as
cross-entropy); --curvature finite-difference by one-gradient differences of
the gradient, the cheapest product (guarded against ReLU kinks).

The top eigenvalue is measured after every epoch for every optimizer alike:
Lanczos (--eig-iters Hessian-vector products, algebraically largest eigenvalue)
on the training-mode loss of a fixed batch of the first --eval-batch-size
training examples. BatchNorm uses batch statistics in every gradient and
Hessian-vector product; running statistics are updated once per step, from the
clean forward pass. Writes OUT/metrics.json and OUT/curves.png and prints a table.
Ctrl-C stops the run (exit status 130) and writes the results of the optimizers
that finished.
"""


# The library's named estimators and correction rules, and the training
# modules' models, optimizers and curvatures, restated so that parsing imports
# none of them (a test checks that these are exactly the names they accept).
METHODS = ("power", "lanczos")
RULES = ("reference", "sign_invariant")
MODELS = ("cnn", "mlp")
OPTIMIZERS = ("sgd", "sam", "xsam")
CURVATURES = ("hessian", "gauss-newton", "finite-difference")

# The modules of the `train` extra's packages that every run imports, and the
# one each dataset needs.
TRAIN_EXTRA = ("flax", "tqdm", "matplotlib")
DATASET_PACKAGES = {"mnist1d": "mnist1d", "digits": "sklearn"}
INSTALL_TRAIN = "pip install 'xsam-optax[train]'"


def _training_modules(dataset: str):
  """``(loop, optimizers, models)``, or one line naming the extra if a package is missing."""
  import importlib  # pylint: disable=g-import-not-at-top
  for module in (*TRAIN_EXTRA, DATASET_PACKAGES[dataset]):
    try:
      importlib.import_module(module)
    except ImportError as e:
      build_parser().exit(1, f"xsam-train: error: {e}; the training command needs the "
                             f"'train' extra: {INSTALL_TRAIN}\n")
  from xsam_optax.train import loop  # pylint: disable=g-import-not-at-top
  from xsam_optax.train import models  # pylint: disable=g-import-not-at-top
  from xsam_optax.train import optimizers  # pylint: disable=g-import-not-at-top
  return loop, optimizers, models


class _OneLineParser(argparse.ArgumentParser):
  """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  """The ``xsam-train`` argument parser (defaults are the README's main job)."""
  p = _OneLineParser(
      prog="xsam-train", description=DESCRIPTION,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  add = p.add_argument
  add("--dataset", choices=data_lib.DATASETS, default="mnist1d",
      help="mnist1d (generated offline) or digits (scikit-learn 8x8, fixed split); "
           "default %(default)s")
  add("--model", choices=MODELS, default="cnn",
      help="cnn: 3 conv blocks with BatchNorm; mlp: 2 hidden layers, no BatchNorm; "
           "default %(default)s")
  add("--optimizer", choices=OPTIMIZERS + ("all",), default="all",
      help="which optimizer(s) to train; default %(default)s")
  add("--epochs", type=int, default=30, help="default %(default)s")
  add("--batch-size", type=int, default=128, help="default %(default)s")
  add("--lr", type=float, default=0.05,
      help="peak learning rate of the cosine schedule (decays to 0); default %(default)s")
  add("--momentum", type=float, default=0.9, help="SGD momentum; default %(default)s")
  add("--weight-decay", type=float, default=5e-4,
      help="L2 weight decay added to the direction before momentum; default %(default)s")
  add("--rho", type=float, default=0.05, help="SAM radius (sam, xsam); default %(default)s")
  add("--sam-groups", type=int, default=1,
      help="sam, xsam: split each mini-batch into this many equal groups, each perturbed "
           "along its own gradient (m-sharpness; per-device SAM on a pod); default "
           "%(default)s, one global perturbation")
  add("--alpha", type=float, default=0.2,
      help="X-SAM correction strength in [0, 2]; default %(default)s")
  add("--update-every", type=int, default=2,
      help="X-SAM eigenvector refresh period in steps; default %(default)s")
  add("--num-iters", type=int, default=1,
      help="X-SAM Hessian-vector products per refresh; default %(default)s")
  add("--method", choices=METHODS, default="power",
      help="X-SAM eigenvector estimator; default %(default)s")
  add("--curvature", choices=CURVATURES, default="hessian",
      help="X-SAM refreshes: Hessian-vector products, Gauss-Newton products of the "
           "logits (cheaper per product, positive semi-definite; for losses convex in "
           "the outputs, like cross-entropy), or finite differences of the gradient "
           "(one gradient per product); default %(default)s")
  add("--no-normalize", dest="normalize", action="store_false",
      help="X-SAM: keep the SAM gradient's length instead of a unit direction")
  add("--rule", choices=RULES, default="reference",
      help="X-SAM correction rule: reference (g - alpha |c| v, the paper's) or "
           "sign_invariant (g - alpha c v: damps the component along v whatever "
           "v's sign); default %(default)s")
  add("--seed", type=int, default=0,
      help="seed for initialisation, data order and estimators; default %(default)s")
  add("--out", default="runs",
      help="output directory for metrics.json and curves.png; one that already holds "
           "them is refused unless --overwrite; default %(default)s")
  add("--overwrite", action="store_true",
      help="replace the metrics.json and curves.png of an earlier run in --out")
  add("--eig-iters", type=int, default=10,
      help="Lanczos iterations of the per-epoch eigenvalue measurement; default %(default)s")
  add("--eval-batch-size", type=int, default=256,
      help="size of the fixed batch for the eigenvalue measurement; default %(default)s")
  add("--train-size", type=int, default=None,
      help="use only the first N training examples (quick tests); default all")
  add("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
  return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Parses and validates ``argv``; bad values exit with status 2 and one line."""
  parser = build_parser()
  args = parser.parse_args(argv)
  checks = [
      (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
      (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
      # isfinite: an inf passes `> 0` and trains to NaN.
      (math.isfinite(args.lr) and args.lr > 0,
       f"--lr must be a finite number > 0, got {args.lr}"),
      (0 <= args.momentum < 1, f"--momentum must be in [0, 1), got {args.momentum}"),
      (math.isfinite(args.weight_decay) and args.weight_decay >= 0,
       f"--weight-decay must be a finite number >= 0, got {args.weight_decay}"),
      (math.isfinite(args.rho) and args.rho >= 0,
       f"--rho must be a finite number >= 0, got {args.rho}"),
      (0 <= args.alpha <= 2, f"--alpha must be in [0, 2], got {args.alpha}"),
      (args.sam_groups >= 1, f"--sam-groups must be >= 1, got {args.sam_groups}"),
      (args.batch_size % max(args.sam_groups, 1) == 0,
       f"--sam-groups must divide --batch-size ({args.batch_size}), got {args.sam_groups}"),
      (args.update_every >= 1, f"--update-every must be >= 1, got {args.update_every}"),
      (args.num_iters >= 1, f"--num-iters must be >= 1, got {args.num_iters}"),
      (args.method != "lanczos" or args.num_iters >= 2,
       f"--num-iters must be >= 2 with --method lanczos, got {args.num_iters}"),
      (args.eig_iters >= 1, f"--eig-iters must be >= 1, got {args.eig_iters}"),
      (args.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {args.eval_batch_size}"),
      (args.train_size is None or args.train_size >= args.batch_size,
       f"--train-size must be >= --batch-size ({args.batch_size}), got {args.train_size}"),
      # jax.random.key takes a 64-bit signed seed.
      (0 <= args.seed < 2 ** 63, f"--seed must be in [0, 2**63), got {args.seed}"),
  ]
  for ok, message in checks:
    if not ok:
      parser.error(message)
  earlier = [f for f in RESULT_FILES if os.path.exists(os.path.join(args.out, f))]
  if earlier and not args.overwrite:
    parser.error(f"--out {args.out!r} holds an earlier run ({', '.join(earlier)}); "
                 "pass --overwrite to replace it, or another --out")
  if not _writable_folder(args.out):
    parser.error(f"--out {args.out!r} cannot be created or written to")
  return args


RESULT_FILES = ("metrics.json", "curves.png")


def check_xsam_settings(args: argparse.Namespace) -> None:
  """The library's own checks of the X-SAM settings (imports JAX), before any training."""
  try:
    _make_optimizer(args, "xsam", learning_rate=args.lr)
  except ValueError as e:
    build_parser().error(f"X-SAM settings: {e}")


def _writable_folder(path: str) -> bool:
  """Whether ``path`` is a folder (created if missing) that this process can write to.

  Tried for real (``os.access`` says yes to root everywhere): the run's
  results are written only after every optimizer has trained.
  """
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError:
    return False
  return True


def _make_optimizer(args: argparse.Namespace, name: str, *, learning_rate):
  _, optimizers, _ = _training_modules(args.dataset)
  return optimizers.make_optimizer(
      name, learning_rate=learning_rate, momentum=args.momentum,
      weight_decay=args.weight_decay, rho=args.rho, alpha=args.alpha,
      update_every=args.update_every, num_iters=args.num_iters, method=args.method,
      normalize=args.normalize, rule=args.rule,
      curvature=args.curvature if name == "xsam" else "hessian", seed=args.seed,
      sam_groups=args.sam_groups if name in ("sam", "xsam") else 1)


def _run_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
  _, optimizers, _ = _training_modules(args.dataset)
  config = {
      "optimizer": name,
      "base": {"name": "sgd", "momentum": args.momentum, "weight_decay": args.weight_decay,
               "schedule": "cosine_decay", "peak_lr": args.lr},
      "gradient_given_to_base": optimizers.GRADIENT_GIVEN[name],
  }
  if name in ("sam", "xsam"):
    config.update(rho=args.rho, sam_groups=args.sam_groups)
  if name == "xsam":
    config.update(alpha=args.alpha, update_every=args.update_every,
                  num_iters=args.num_iters, method=args.method, curvature=args.curvature,
                  normalize=args.normalize, rule=args.rule, seed=args.seed)
    if not args.normalize:
      config["gradient_given_to_base"] = "X-SAM corrected SAM gradient, SAM gradient's length kept"
  return config


def _names(args: argparse.Namespace) -> tuple[str, ...]:
  """The optimizers the flags ask for, in the order they train."""
  return OPTIMIZERS if args.optimizer == "all" else (args.optimizer,)


def _train_all(args: argparse.Namespace, protocol, variables, eval_fn,
               top_eigenvalue_fn, runs: dict[str, dict[str, Any]]) -> None:
  """Trains every optimizer the flags name under one protocol.

  Each run's metrics go into ``runs`` as soon as it finishes (and a line says so on
  stdout), so that an interrupted comparison still has the finished ones.
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  loop, _, _ = _training_modules(args.dataset)
  for name in _names(args):
    optimizer = _make_optimizer(args, name, learning_rate=protocol.schedule)
    with tqdm(total=protocol.total_steps, desc=f"{name:>4}", unit="step",
              disable=not args.progress, leave=True, file=sys.stderr) as bar:
      _, result = loop.run_training(
          protocol.model, optimizer, protocol.dataset, epochs=args.epochs,
          batch_size=args.batch_size, seed=args.seed, eval_x=protocol.eval_x,
          eval_y=protocol.eval_y, top_eigenvalue_fn=top_eigenvalue_fn, eval_fn=eval_fn,
          progress=bar, variables=variables)
    timed = result.ms_per_step[1:] or result.ms_per_step  # Epoch 1 includes warm-up.
    runs[name] = {
        "config": _run_config(args, name),
        **result._asdict(),
        "mean_ms_per_step": sum(timed) / len(timed),
    }
    print(f"{name}: finished, test accuracy {result.test_accuracy[-1]:.4f}", flush=True)


def _metrics(args: argparse.Namespace, protocol, runs,
             shared_compile_seconds: float) -> dict[str, Any]:
  """``metrics.json``: the protocol, the environment and every run."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  dataset = protocol.dataset
  return {
      "dataset": args.dataset,
      "model": args.model,
      "protocol": {
          "epochs": args.epochs, "batch_size": args.batch_size,
          "steps_per_epoch": protocol.steps_per_epoch, "total_steps": protocol.total_steps,
          "train_examples": len(dataset.x_train), "test_examples": len(dataset.x_test),
          "seed": args.seed, "same_init_data_order_schedule_steps": True,
          "eigenvalue_measurement": {
              "method": "lanczos", "num_iters": args.eig_iters,
              "batch": f"first {len(protocol.eval_x)} training examples, training-mode loss"},
          "ms_per_step": "wall time of the jitted steps per epoch / steps; "
                         "mean_ms_per_step excludes epoch 1",
          "shared_compile_seconds": shared_compile_seconds,
      },
      "environment": {**report.provenance(),
                      "jax": jax.__version__, "optax": optax.__version__,
                      "backend": jax.default_backend(),
                      "devices": str(jax.devices()), "cpu_count": os.cpu_count(),
                      "python": platform.python_version()},
      "runs": runs,
  }


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``xsam-train``; returns the process exit status.

  Ctrl-C ends the run with status 130 and one line on stderr, after writing the
  results of the optimizers that finished (none: nothing is written).
  """
  args = parse_args(argv)
  runs: dict[str, dict[str, Any]] = {}
  shared: dict[str, Any] = {}  # the protocol and its compile time, once known
  try:
    check_xsam_settings(args)
    _run(args, runs, shared)
  except KeyboardInterrupt:
    return _interrupted(args, runs, shared)
  return 0


def _run(args: argparse.Namespace, runs: dict[str, dict[str, Any]],
         shared: dict[str, Any]) -> None:
  """Loads the data, trains every optimizer into ``runs`` and writes the results."""
  import jax  # pylint: disable=g-import-not-at-top

  loop, _, _ = _training_modules(args.dataset)
  dataset = data_lib.load_dataset(args.dataset, train_size=args.train_size)
  if len(dataset.x_train) < args.batch_size:  # Checked before anything compiles.
    limit = "" if args.train_size is None else f" (--train-size {args.train_size})"
    build_parser().error(
        f"--batch-size must be <= the {len(dataset.x_train)} training examples of "
        f"{args.dataset}{limit}, got {args.batch_size}")
  protocol = loop.make_protocol(
      args.dataset, args.model, batch_size=args.batch_size, epochs=args.epochs, lr=args.lr,
      eval_batch_size=args.eval_batch_size, train_size=args.train_size, dataset=dataset)
  model = protocol.model
  # Shared across optimizers, so compiled once.
  variables = loop.init_variables(model, dataset.x_train[: args.batch_size], seed=args.seed)
  eval_fn = jax.jit(loop.make_eval_fn(model))
  top_eigenvalue_fn = jax.jit(loop.make_top_eigenvalue_fn(model, num_iters=args.eig_iters))
  t0 = time.perf_counter()  # Compile both once, outside every optimizer's timings.
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  eval_fn(params, batch_stats, dataset.x_test, dataset.y_test)
  top_eigenvalue_fn(params, batch_stats, protocol.eval_x, protocol.eval_y,
                    loop.lanczos_start(params, args.seed)).block_until_ready()
  shared.update(protocol=protocol, compile_seconds=time.perf_counter() - t0)

  _train_all(args, protocol, variables, eval_fn, top_eigenvalue_fn, runs)
  print(report.format_table(runs))  # First: nothing below can lose the results.
  metrics_path, curves_path = _write_results(args, runs, shared)
  print(f"wrote {metrics_path} and {curves_path}")


def _write_results(args: argparse.Namespace, runs: dict[str, dict[str, Any]],
                   shared: dict[str, Any], *, interrupted: bool = False) -> tuple[str, str]:
  """Writes ``metrics.json`` and ``curves.png`` of ``runs``; returns their paths."""
  metrics = _metrics(args, shared["protocol"], runs, shared["compile_seconds"])
  if interrupted:
    metrics["interrupted"] = {
        "finished": list(runs), "not_finished": [n for n in _names(args) if n not in runs]}
  os.makedirs(args.out, exist_ok=True)
  metrics_path = os.path.join(args.out, "metrics.json")
  curves_path = os.path.join(args.out, "curves.png")
  report.write_metrics(metrics_path, metrics)
  report.plot_curves(curves_path, runs,
                     title=f"{args.dataset} / {args.model}, {args.epochs} epochs")
  return metrics_path, curves_path


def _interrupted(args: argparse.Namespace, runs: dict[str, dict[str, Any]],
                 shared: dict[str, Any]) -> int:
  """After Ctrl-C: the finished runs' results, one line on stderr, status 130."""
  # A second Ctrl-C must not cut the files short; signal handlers can only be
  # set from the main thread.
  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
  try:
    if runs:
      print(report.format_table(runs))
      metrics_path, curves_path = _write_results(args, runs, shared, interrupted=True)
      message = (f"interrupted; wrote {metrics_path} and {curves_path} for "
                 f"{', '.join(runs)}")
    else:
      message = "interrupted before any optimizer finished; nothing written"
  finally:
    if in_main:
      signal.signal(signal.SIGINT, previous)
  print(f"xsam-train: {message}", file=sys.stderr, flush=True)
  return 130


if __name__ == "__main__":
  sys.exit(main())
