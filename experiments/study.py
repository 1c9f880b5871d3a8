"""Tuned comparison: SGD, SAM, X-SAM variants and Eigen-SAM, each at its own best learning rate.

Every method gets a grid of peak learning rates; the rate is chosen on a
validation split carved from the training set (never on test) by
``experiments/report.py``, which then reports test accuracy and lambda_max at
the chosen rate. This script only trains and measures; it writes one JSON per
(setting, method, learning rate, seed) run as soon as the run ends, and skips
runs whose JSON already exists, so an interrupted study resumes where it
stopped.

Protocol (shared by every run, see :mod:`xsam_optax.train.loop`): the same
initialisation (``jax.random.key(seed)``) and data order (``(seed, epoch)``)
for every method and learning rate, SGD base with momentum 0.9 and weight
decay 5e-4, cosine schedule over all steps, batch 128 (last partial batch
dropped), rho 0.05, alpha 0.2. BatchNorm: gradients and Hessian-vector
products of the training-mode loss (:func:`xsam_optax.train.loop.make_train_step`).

Speed: the peak learning rate is a runtime value kept in the optimizer state
(``scale_by_peak_lr``; the cosine schedule is built with peak 1 and the
update multiplied by the peak afterwards, which is the same update since SGD's
learning rate multiplies the momentum trace linearly), so one compiled step
serves every learning rate and seed of a (setting, method); those runs train
one after another. ``--workers`` splits the (setting, method) groups across
processes.

Choice of the rate (here, to decide where to extend the grid, and in
``experiments/report.py``): validation results are compared as integer counts
of correct predictions summed over the grid seeds; the rate with the highest
count wins, a tie goes to the smaller rate (:func:`best_rate`). A rate with a
diverged run ranks below every rate without one.

Rerun: every JSON stores ``rerun_row_command``, the command that trains that
one run again into ``RERUN_OUT`` (not the results folder, whose existing file
would be skipped); pass another ``--out`` to write elsewhere.

Data: a fixed validation split (``VALIDATION_FRACTION`` of the training set,
drawn with ``SPLIT_SEED``) is held out of training. With label noise, a
fraction of the *training set* labels (before the split) is replaced by a
uniformly drawn *other* class with a fixed seed, so validation labels are as
noisy as training labels (the only validation set one would have in
practice); test labels stay clean.

After training, on a fixed batch (the first ``--eval-batch-size`` examples of
the training split, training-mode loss): lambda_max by Lanczos
(``--eig-iters`` products, start vector ones/sqrt(size) per leaf) and its Ritz
residual.

Example (shell)::

  python experiments/study.py --quick --out /tmp/study

Example (Python):
  >>> from experiments.study import METHODS
  >>> METHODS["xsam_nn"]["normalize"], METHODS["xsam_nn"]["grid"]
  (False, 'plain')
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, NamedTuple

import numpy as np

# Settings: dataset, model, label noise on the training set, epochs.
SETTINGS: dict[str, dict[str, Any]] = {
    "mnist1d_cnn": {"dataset": "mnist1d", "model": "cnn", "label_noise": 0.0, "epochs": 10},
    "mnist1d_cnn_noise20": {"dataset": "mnist1d", "model": "cnn", "label_noise": 0.2,
                            "epochs": 10},
    "digits_mlp": {"dataset": "digits", "model": "mlp", "label_noise": 0.0, "epochs": 30},
}

# Peak learning-rate grids (factor 2 apart). "normalised": the base optimizer
# gets a unit-norm direction (X-SAM normalize=True and its alpha 0 control), so
# its rate is on another scale (step length lr instead of lr * ||g||); its grid
# is wider and lower.
GRIDS: dict[str, tuple[float, ...]] = {
    "plain": (0.025, 0.05, 0.1, 0.2),
    "normalised": (0.0025, 0.005, 0.01, 0.02, 0.04),
    # With BatchNorm the gradient is small (scale-invariant weights), so unit
    # steps need larger rates: X-SAM's first pass on the CNN went from 0.0025
    # through three extensions to 0.32 before validation accuracy peaked.
    "normalised_bn": (0.02, 0.04, 0.08, 0.16, 0.32),
}


def initial_grid(spec: dict[str, Any], setting: str) -> tuple[float, ...]:
  """The method's initial grid of peak rates in a setting (extended past an edge if needed)."""
  if spec["grid"] == "normalised" and SETTINGS[setting]["model"] == "cnn":
    return GRIDS["normalised_bn"]
  return GRIDS[spec["grid"]]

_XSAM = {"name": "xsam", "alpha": 0.2, "normalize": True, "rule": "reference"}
LANCZOS = {"method": "lanczos", "num_iters": 4}  # the library default when the study ran (every 5 steps)
POWER = {"method": "power", "num_iters": 5}  # the reference's schedule
# The library's defaults today (xsam_optax.xsam): one power-iteration product
# every 2 steps. Methods without "update_every" refresh every UPDATE_EVERY.
DEFAULTS = {"method": "power", "num_iters": 1, "update_every": 2}
# Methods: make_optimizer name and keywords, the grid, and the estimator.
METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "grid": "plain"},
    "sam": {"name": "sam", "grid": "plain"},
    "xsam": {**_XSAM, "grid": "normalised", **LANCZOS},
    # Control: the normalised direction without the correction. alpha 0 makes
    # the eigenvector irrelevant, so it is never refreshed (refresh=False).
    "xsam_a0": {**_XSAM, "alpha": 0.0, "grid": "normalised", **LANCZOS},
    # The correction alone: SAM's gradient length kept. Its alpha 0 control is
    # SAM itself (unit * ||g|| = g), so SAM is that control.
    "xsam_nn": {**_XSAM, "normalize": False, "grid": "plain", **LANCZOS},
    "xsam_si": {**_XSAM, "rule": "sign_invariant", "grid": "normalised", **LANCZOS},
    "eigensam": {"name": "eigensam", "alpha": 0.2, "grid": "plain", **LANCZOS},
    "xsam_pow": {**_XSAM, "grid": "normalised", **POWER},
    "xsam_nn_pow": {**_XSAM, "normalize": False, "grid": "plain", **POWER},
    "xsam_si_pow": {**_XSAM, "rule": "sign_invariant", "grid": "normalised", **POWER},
    "eigensam_pow": {"name": "eigensam", "alpha": 0.2, "grid": "plain", **POWER},
    # X-SAM as a user gets it today, at the rate chosen for "xsam" (its
    # "rate_of"): no grid of its own, every seed at that rate, so the two
    # estimator schedules are compared at one rate, paired by seed.
    "xsam_default": {**_XSAM, "grid": "normalised", "rate_of": "xsam", **DEFAULTS},
    # Per-group perturbations (m-sharpness): the batch of 128 as 4 groups of
    # 32, each perturbed along its own gradient (xsam_optax.grouped_grad_fn),
    # trained at the rate chosen for the global method ("rate_of"), every seed.
    "sam_g4": {"name": "sam", "grid": "plain", "sam_groups": 4, "rate_of": "sam"},
    "xsam_g4": {**_XSAM, "grid": "normalised", **LANCZOS, "sam_groups": 4, "rate_of": "xsam"},
}
DEFAULT_METHODS = tuple(METHODS)
UPDATE_EVERY = 5
RHO = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
VALIDATION_FRACTION = 0.2
SPLIT_SEED = 0
NOISE_SEED = 1


MAX_EXTEND = 3
GRID_SEEDS = (0, 1, 2)
RERUN_OUT = os.path.join("/tmp", "xsam-study-rerun")


def update_every(spec: dict[str, Any]) -> int:
  """The method's eigenvector refresh period (``UPDATE_EVERY`` unless it sets its own)."""
  return spec.get("update_every", UPDATE_EVERY)


def refreshes(spec: dict[str, Any]) -> bool:
  """Whether the method refreshes an eigenvector that it uses (alpha > 0)."""
  return spec["name"] in ("xsam", "eigensam") and spec.get("alpha", 0.0) > 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add = p.add_argument
  add("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  add("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
  add("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
  add("--grid-seeds", nargs="+", type=int, default=list(GRID_SEEDS),
      help="seeds that run the whole grid; the other --seeds run at the chosen rate only")
  add("--lrs", nargs="+", type=float, default=None,
      help="run exactly these peak rates for every seed (default: the method's grid, GRIDS, "
           "extended past an edge on which the best validation accuracy sits)")
  add("--max-extend", type=int, default=MAX_EXTEND, help="grid extensions past an edge, at most")
  add("--epochs", type=int, default=None, help="override the setting's epochs")
  add("--batch-size", type=int, default=128)
  add("--eig-iters", type=int, default=20, help="Lanczos products of the final lambda_max")
  add("--eval-batch-size", type=int, default=512)
  add("--train-size", type=int, default=None, help="first N training examples only")
  add("--power-settings", nargs="+", default=None,
      help="run the *_pow methods only on these settings (default: all)")
  add("--workers", type=int, default=1, help="processes sharing the (setting, method) groups")
  add("--worker", action="store_true", help=argparse.SUPPRESS)  # set by --workers
  add("--quick", action="store_true",
      help="smoke test: digits, 320 examples, 1 epoch, SGD and X-SAM, grid on seed 0, seed 1 at "
           "the chosen rate")
  add("--smoke", action="store_true",
      help="any command, tiny: its first setting, of its methods SGD and X-SAM (else its first), "
           "its first two seeds (the grid on the first), 320 examples, 1 epoch, no grid "
           "extension, a CNN of one block, no XLA cache; checks a command end to end in seconds")
  add("--cache-dir", default=os.path.join("/tmp", "xsam-study-jax-cache"),
      help="persistent XLA cache ('' disables)")
  add("--out", default=os.path.join("experiments", "results"))
  return p


QUICK = ["--settings", "digits_mlp", "--methods", "sgd", "xsam", "--seeds", "0", "1",
         "--grid-seeds", "0", "--epochs", "1", "--batch-size", "64", "--train-size", "320",
         "--eig-iters", "3", "--eval-batch-size", "64", "--max-extend", "1"]


SMOKE_METHODS = ("sgd", "xsam")


def apply_smoke(args: argparse.Namespace) -> argparse.Namespace:
  """``args`` cut to a smoke run (``--smoke``): the command's code path on tiny sizes."""
  args.settings = args.settings[:1]
  args.methods = [m for m in args.methods if m in SMOKE_METHODS] or args.methods[:1]
  args.seeds = args.seeds[:2]
  args.grid_seeds = args.seeds[:1]
  args.epochs, args.batch_size, args.train_size = 1, 64, 320
  args.eig_iters, args.eval_batch_size, args.max_extend = 3, 64, 0
  args.cache_dir = ""
  return args


class Split(NamedTuple):
  """Training, validation and test arrays of one setting."""

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  noisy_fraction: float  # of training + validation labels actually changed


def symmetric_label_noise(labels: np.ndarray, fraction: float, num_classes: int,
                          seed: int) -> np.ndarray:
  """Each label replaced with probability ``fraction`` by a uniformly drawn *other* class.

  Example:
    >>> y = np.zeros(10000, np.int32)
    >>> noisy = symmetric_label_noise(y, 0.2, 10, seed=0)
    >>> round(float((noisy != y).mean()), 2), int(noisy.max())
    (0.2, 9)
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"label noise fraction must be in [0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  flip = rng.random(len(labels)) < fraction
  shift = rng.integers(1, num_classes, len(labels))  # never 0: always another class
  return np.where(flip, (labels + shift) % num_classes, labels).astype(labels.dtype)


def load_split(dataset_name: str, *, label_noise: float, train_size: int | None) -> Split:
  """The setting's data: noisy training labels (if asked), then a fixed validation split."""
  from xsam_optax.train import data as data_lib  # pylint: disable=g-import-not-at-top

  ds = data_lib.load_dataset(dataset_name, train_size=train_size)
  y = ds.y_train
  if label_noise:
    y = symmetric_label_noise(y, label_noise, ds.num_classes, NOISE_SEED)
  order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
  n_val = int(round(VALIDATION_FRACTION * len(y)))
  val, train = order[:n_val], np.sort(order[n_val:])
  return Split(ds.x_train[train], y[train], ds.x_train[val], y[val], ds.x_test, ds.y_test,
               ds.num_classes, float((y != ds.y_train).mean()))


class PeakLRState(NamedTuple):
  peak_lr: Any


def scale_by_peak_lr():
  """Multiplies the update by ``state.peak_lr`` (1 at init; set it per run)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def init(params):
    del params
    return PeakLRState(jnp.ones([], jnp.float32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: (state.peak_lr * u).astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def make_method(spec: dict[str, Any], *, total_steps: int, seed: int):
  """The method's optimizer with a cosine schedule of peak 1, times the runtime peak rate."""
  import optax  # pylint: disable=g-import-not-at-top

  from xsam_optax.train import optimizers  # pylint: disable=g-import-not-at-top

  kwargs = {k: spec[k] for k in ("alpha", "normalize", "rule", "method", "num_iters")
            if k in spec}
  inner = optimizers.make_optimizer(
      spec["name"], learning_rate=optax.cosine_decay_schedule(1.0, decay_steps=total_steps),
      momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, rho=RHO, update_every=update_every(spec),
      seed=seed, **kwargs).tx
  return optax.chain(inner, scale_by_peak_lr())


def _command(argv: list[str]) -> str:
  return shlex.join(["python", "experiments/study.py", *argv])


def run_name(setting: str, method: str, lr: float, seed: int) -> str:
  return f"{setting}__{method}__lr{lr:g}__seed{seed}.json"


def _row_argv(args, setting: str, method: str, lr: float, seed: int,
              out: str = RERUN_OUT) -> list[str]:
  """Arguments that train one run again, into ``out`` (by default not the results folder)."""
  argv = ["--settings", setting, "--methods", method, "--lrs", f"{lr:g}", "--seeds", str(seed)]
  for flag in ("epochs", "batch_size", "eig_iters", "eval_batch_size", "train_size"):
    value = getattr(args, flag)
    if value is not None:
      argv += ["--" + flag.replace("_", "-"), str(value)]
  return argv + ["--out", out]


_SETTING_FNS: dict[tuple[str, int], Any] = {}


def _setting_fns(setting: str, model, eig_iters: int):
  """Jitted ``(eval_fn, measure_fn)`` of a setting, built once per process and shared by groups.

  ``measure_fn(params, batch_stats, x, y) -> (lambda_max, Ritz residual)``:
  Lanczos on the training-mode loss from ones/sqrt(size) per leaf.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  import xsam_optax  # pylint: disable=g-import-not-at-top
  from xsam_optax.train import loop  # pylint: disable=g-import-not-at-top

  if (setting, eig_iters) not in _SETTING_FNS:
    def measure(params, batch_stats, x, y):
      grad_fn = loop.make_grad_fn(model, batch_stats, x, y)
      v0 = jax.tree.map(lambda p: jnp.ones_like(p) / np.sqrt(p.size), params)
      # Unrolled: on XLA:CPU conv-net products in a rolled loop run ~10x slower.
      eig = xsam_optax.lanczos(lambda v: xsam_optax.hvp(grad_fn, params, v), v0,
                               num_iters=eig_iters, unroll=True)
      return eig.eigenvalue, eig.residual

    _SETTING_FNS[setting, eig_iters] = (jax.jit(loop.make_eval_fn(model)), jax.jit(measure))
  return _SETTING_FNS[setting, eig_iters]


class Group:
  """One (setting, method): its data, model, compiled steps and measurement, built once.

  Every run of the group (any learning rate, any seed) reuses the compiled
  step: the peak rate and the seed live in the state and the data order.
  """

  def __init__(self, args, setting: str, method: str):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from xsam_optax.train import loop  # pylint: disable=g-import-not-at-top
    from xsam_optax.train import models  # pylint: disable=g-import-not-at-top

    self.args, self.setting, self.method = args, setting, method
    self.cfg, self.spec = SETTINGS[setting], METHODS[method]
    self.epochs = args.epochs or self.cfg["epochs"]
    self.split = split = load_split(self.cfg["dataset"], label_noise=self.cfg["label_noise"],
                                    train_size=args.train_size)
    if args.smoke and self.cfg["model"] == "cnn":  # one block of 4 channels: compiles quickly
      self.model = model = models.CNN(num_classes=split.num_classes, features=(4,))
    else:
      self.model = model = models.make_model(self.cfg["model"], num_classes=split.num_classes)
    bs = args.batch_size
    self.steps_per_epoch = len(split.x_train) // bs
    if self.steps_per_epoch < 1:
      raise ValueError(f"--batch-size {bs} exceeds the {len(split.x_train)} training examples")
    self.total_steps = self.steps_per_epoch * self.epochs
    self.sample = jnp.asarray(split.x_train[:bs])
    tx = make_method(self.spec, total_steps=self.total_steps, seed=0)
    self._init_variables = jax.jit(model.init)
    self._variables = {}
    state = self.init(args.seeds[0], 1.0)
    t0 = time.perf_counter()
    step = loop.make_train_step(model, tx, sam_groups=self.spec.get("sam_groups", 1))
    # X-SAM and Eigen-SAM: two compiled steps (refresh or not), picked by the
    # host; the alpha 0 control never refreshes (its eigenvector is unused).
    self.uses_refresh = self.spec["name"] in ("xsam", "eigensam")
    variants = (((True, False) if refreshes(self.spec) else (False,)) if self.uses_refresh
                else (None,))
    self.variants = variants
    xy = (split.x_train[:bs], split.y_train[:bs])
    self.steps = {r: jax.jit(lambda st, x, y, r=r: step(st, x, y, refresh=r)).lower(state, *xy).compile() for r in variants}
    self.eval_fn, self.measure_fn = _setting_fns(setting, model, args.eig_iters)
    self.compile_seconds = time.perf_counter() - t0

  def init(self, seed: int, lr: float):
    """Initial state: parameters and estimator start vector from ``seed``, peak rate ``lr``.

    The same as :func:`xsam_optax.train.loop.init_state` with ``seed``, without
    its per-call compilations: the model's ``init`` is jitted once per group and
    the optimizer's ``init`` runs eagerly.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from xsam_optax.train import loop  # pylint: disable=g-import-not-at-top

    if seed not in self._variables:
      self._variables[seed] = self._init_variables(jax.random.key(seed), self.sample)
    variables = self._variables[seed]
    params = variables["params"]
    inner, _ = make_method(self.spec, total_steps=self.total_steps, seed=seed).init(params)
    return loop.TrainState(
        params=params, batch_stats=variables.get("batch_stats", {}),
        opt_state=(inner, PeakLRState(jnp.float32(lr))), step=jnp.zeros([], jnp.int32))

  def run(self, lr: float, seed: int, command: str, environment: dict) -> dict[str, Any]:
    """Trains one run, writes its JSON, returns the record."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    import xsam_optax  # pylint: disable=g-import-not-at-top
    from xsam_optax.train import loop  # pylint: disable=g-import-not-at-top

    args, split, bs = self.args, self.split, self.args.batch_size
    t_start = time.perf_counter()
    state = self.init(seed, lr)
    curves = {k: [] for k in ("train_loss", "train_accuracy", "val_accuracy", "val_loss",
                              "test_accuracy", "test_loss", "cos_angle", "grad_norm")}
    sets = {"val": (jnp.asarray(split.x_val), jnp.asarray(split.y_val)),
            "test": (jnp.asarray(split.x_test), jnp.asarray(split.y_test))}
    step_count, train_seconds = 0, 0.0
    for epoch in range(self.epochs):
      t0 = time.perf_counter()
      history = []
      for idx in loop.epoch_batches(len(split.x_train), bs, seed=seed, epoch=epoch):
        refresh = (self.variants[0] if len(self.variants) == 1
                   else xsam_optax.refresh_due(step_count, update_every(self.spec)))
        state, metrics = self.steps[refresh](state, split.x_train[idx], split.y_train[idx])
        history.append(metrics)
        step_count += 1
      history = jax.device_get(history)
      train_seconds += time.perf_counter() - t0
      curves["train_loss"].append(float(np.mean([m["loss"] for m in history])))
      curves["train_accuracy"].append(float(np.mean([m["accuracy"] for m in history])))
      curves["cos_angle"].append(float(np.mean([m["cos_angle"] for m in history])))
      curves["grad_norm"].append(float(np.mean([m["grad_norm"] for m in history])))
      for part, (x, y) in sets.items():
        loss, acc = self.eval_fn(state.params, state.batch_stats, x, y)
        curves[f"{part}_loss"].append(float(loss))
        curves[f"{part}_accuracy"].append(float(acc))
    eig, residual = (float(v) for v in self.measure_fn(
        state.params, state.batch_stats, jnp.asarray(split.x_train[:args.eval_batch_size]),
        jnp.asarray(split.y_train[:args.eval_batch_size])))
    has_cos = not np.isnan(curves["cos_angle"]).any()
    if not has_cos:
      del curves["cos_angle"]
    cfg, spec = self.cfg, self.spec
    record = {
        "command": command,
        "rerun_row_command": _command(_row_argv(args, self.setting, self.method, lr, seed)),
        "setting": self.setting, "method": self.method, "peak_lr": lr, "seed": seed,
        "config": {
            "dataset": cfg["dataset"], "model": cfg["model"], "label_noise": cfg["label_noise"],
            "noisy_label_fraction": split.noisy_fraction,
            "validation": (f"{VALIDATION_FRACTION:g} of the training set (split seed "
                           f"{SPLIT_SEED}), labels as noisy as training"),
            "epochs": self.epochs, "batch_size": bs, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "train_examples": len(split.x_train),
            "val_examples": len(split.x_val), "test_examples": len(split.x_test),
            "base": {"name": "sgd", "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                     "schedule": "cosine_decay", "peak_lr": lr},
            "method": {k: v for k, v in spec.items() if k not in ("grid", "rate_of")},
            "rate_of": spec.get("rate_of"),
            "initial_grid": list(initial_grid(spec, self.setting)),
            "rho": None if spec["name"] == "sgd" else RHO,
            "update_every": update_every(spec) if self.uses_refresh else None,
            "refreshes": refreshes(spec),
            "measurement": {
                "batch": f"first {args.eval_batch_size} examples of the training split, "
                         "training-mode loss",
                "lanczos_iters": args.eig_iters, "lanczos_start": "ones / sqrt(size) per leaf"},
        },
        "environment": environment,
        "results": {
            "val_accuracy": curves["val_accuracy"][-1],
            "val_loss": curves["val_loss"][-1],
            "test_accuracy": curves["test_accuracy"][-1],
            "test_loss": curves["test_loss"][-1],
            "train_loss": curves["train_loss"][-1],
            "train_accuracy": curves["train_accuracy"][-1],
            "top_eigenvalue": eig,
            "lanczos_residual_ritz": residual,
            "mean_cos_angle": float(np.mean(curves["cos_angle"])) if has_cos else None,
            "final_grad_norm": curves["grad_norm"][-1],
            "finite": bool(np.isfinite(curves["train_loss"][-1]) and np.isfinite(eig)),
        },
        "timing": {"run_seconds": time.perf_counter() - t_start,
                   "group_compile_seconds": self.compile_seconds,
                   "ms_per_step": 1e3 * train_seconds / self.total_steps},
        "curves": curves,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, run_name(self.setting, self.method, lr, seed))
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)  # a reader never sees half a file
    r = record["results"]
    print(f"{self.setting:20s} {self.method:13s} lr {lr:<8g} seed {seed}: val "
          f"{r['val_accuracy']:.4f} test {r['test_accuracy']:.4f} lambda_max {eig:.4g} "
          f"({record['timing']['run_seconds']:.1f}s, {record['timing']['ms_per_step']:.1f} ms/step)",
          flush=True)
    return record


def correct_count(results: dict[str, Any], val_examples: int) -> int | None:
  """Correct validation predictions of one run (``None`` if it diverged).

  Counts, not accuracies: two rates with equal counts must tie, whatever the
  float rounding of a mean of accuracies.

  Example:
    >>> correct_count({"val_accuracy": 265 / 269, "finite": True}, 269)
    265
  """
  acc = results["val_accuracy"]
  if not results.get("finite", True) or not np.isfinite(acc):
    return None
  count = acc * val_examples
  if abs(count - round(count)) > 1e-3:
    raise ValueError(f"val_accuracy {acc} is not a count out of {val_examples}")
  return int(round(count))


def best_rate(totals: dict[float, int | None]) -> float:
  """The tie rule: most correct validation predictions; a tie goes to the smaller rate.

  ``totals[lr]`` is the count summed over the grid seeds, ``None`` if a run at
  ``lr`` diverged (such a rate ranks below every other).

  Example:
    >>> best_rate({0.08: 795, 0.16: 795, 0.04: 794})
    0.08
  """
  return min(totals, key=lambda lr: (totals[lr] is None, -(totals[lr] or 0), lr))


def select_rate(initial: tuple[float, ...], totals_of, max_extend: int = MAX_EXTEND):
  """Grid search with extensions: ``(rates visited, chosen rate, still on an edge)``.

  ``totals_of(lrs)`` returns ``{lr: count}`` for the rates (training the
  missing runs first, in :func:`run_group`; reading them, in the report; a
  rate it leaves out stops the search). While :func:`best_rate` sits on an
  edge, the grid is extended by a factor 2 past it, at most ``max_extend``
  times.

  Example:
    >>> counts = {0.01: 700, 0.02: 790, 0.04: 795, 0.08: 795, 0.16: 798}
    >>> select_rate((0.01, 0.02, 0.04), lambda lrs: {lr: counts[lr] for lr in lrs})
    ([0.01, 0.02, 0.04, 0.08], 0.04, False)
  """
  lrs = list(initial)
  for attempt in range(max_extend + 1):
    totals = totals_of(lrs)
    visited = [lr for lr in lrs if lr in totals]
    best = best_rate({lr: totals[lr] for lr in visited})
    edge = len(visited) > 1 and best in (visited[0], visited[-1])
    if not edge or attempt == max_extend or visited != lrs:
      return visited, best, edge
    if best == lrs[0]:
      lrs.insert(0, lrs[0] / 2)
    else:
      lrs.append(lrs[-1] * 2)
  raise AssertionError("unreachable")


def _total_correct(out: str, setting: str, method: str, lr: float, seeds) -> int | None:
  """Correct validation predictions of the runs on disk, summed (``None``: one diverged)."""
  counts = []
  for s in seeds:
    with open(os.path.join(out, run_name(setting, method, lr, s)), encoding="utf-8") as f:
      record = json.load(f)
    counts.append(correct_count(record["results"], record["config"]["val_examples"]))
  return None if None in counts else sum(counts)


def run_group(args, setting: str, method: str, command: str, environment: dict) -> int:
  """Runs one (setting, method); returns the number of runs trained (existing ones skipped).

  With ``--lrs``: exactly those rates for every seed. Otherwise the method's
  grid on ``--grid-seeds``, extended by a factor 2 beyond an edge while the
  best rate (:func:`best_rate`) sits on it (at most ``--max-extend`` times,
  :func:`select_rate`), then the remaining ``--seeds`` at the chosen rate. A
  method with a ``rate_of`` runs every seed at the rate chosen for that other
  method (whose missing grid runs are trained first).
  """
  trainers = {}

  def train(name, lrs, seeds):
    if name not in trainers:
      trainers[name] = _Trainer(args, setting, name, command, environment)
    trainers[name].train(lrs, seeds)

  if args.lrs:
    train(method, args.lrs, args.seeds)
    return sum(t.trained for t in trainers.values())
  grid_seeds = [s for s in args.seeds if s in args.grid_seeds] or args.seeds[:1]
  chooser = METHODS[method].get("rate_of", method)

  def totals_of(lrs):
    train(chooser, lrs, grid_seeds)
    return {lr: _total_correct(args.out, setting, chooser, lr, grid_seeds) for lr in lrs}

  lrs, best, edge = select_rate(initial_grid(METHODS[chooser], setting), totals_of,
                                args.max_extend)
  if edge:
    print(f"{setting} {chooser}: best rate {best:g} still on the grid's edge after "
          f"{args.max_extend} extensions", flush=True)
  if chooser == method:
    train(method, [best], [s for s in args.seeds if s not in grid_seeds])
  else:
    train(method, [best], args.seeds)
  return sum(t.trained for t in trainers.values())


class _Trainer:
  """Trains the missing runs of one (setting, method), building its :class:`Group` once."""

  def __init__(self, args, setting: str, method: str, command: str, environment: dict):
    self.args, self.setting, self.method = args, setting, method
    self.command, self.environment = command, environment
    self.group, self.trained = None, 0

  def train(self, lrs, seeds):
    for lr in lrs:
      for s in seeds:
        if not os.path.exists(os.path.join(self.args.out,
                                           run_name(self.setting, self.method, lr, s))):
          if self.group is None:
            self.group = Group(self.args, self.setting, self.method)
          self.group.run(lr, s, self.command, self.environment)
          self.trained += 1


# Order in which the groups are run (and claimed by workers): the comparison's
# core first on every setting, the reference-schedule duplicates last, so a
# study stopped at its time budget misses the least important runs.
PRIORITY = ("sam", "sgd", "xsam", "xsam_a0", "xsam_nn", "xsam_si", "eigensam", "xsam_pow",
            "xsam_nn_pow", "xsam_si_pow", "eigensam_pow", "xsam_default",
            "sam_g4", "xsam_g4")


def groups(args) -> list[tuple[str, str]]:
  """(setting, method) pairs of the study in run order (``PRIORITY``, then setting)."""
  out = []
  for setting in args.settings:
    for method in args.methods:
      if (method.endswith("_pow") and args.power_settings is not None
          and setting not in args.power_settings):
        continue
      out.append((setting, method))
  return sorted(out, key=lambda g: (PRIORITY.index(g[1]), args.settings.index(g[0])))


def _claim(out: str, setting: str, method: str) -> bool:
  """Atomically claims a group for this worker (a file created with O_EXCL)."""
  os.makedirs(os.path.join(out, ".claims"), exist_ok=True)
  try:
    os.close(os.open(os.path.join(out, ".claims", f"{setting}__{method}"),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return True
  except FileExistsError:
    return False


def main(argv: list[str] | None = None) -> int:
  """Runs the study (or one worker of it); returns the process exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  if args.quick:
    args = build_parser().parse_args(QUICK + [a for a in argv if a != "--quick"])
  if args.smoke:
    args = apply_smoke(args)
  command = _command([a for a in argv if a != "--worker"])
  if args.workers > 1 and not args.worker:
    # Worker processes (one XLA thread each) take the groups from a shared
    # queue of claim files, most expensive first.
    shutil.rmtree(os.path.join(args.out, ".claims"), ignore_errors=True)
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false "
               "intra_op_parallelism_threads=1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--worker"],
                              env=env) for _ in range(args.workers)]
    status = max(p.wait() for p in procs)
    shutil.rmtree(os.path.join(args.out, ".claims"), ignore_errors=True)
    return status

  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from xsam_optax.train import report  # pylint: disable=g-import-not-at-top

  environment = {**report.provenance(), "jax": jax.__version__, "optax": optax.__version__,
                 "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "machine": platform.machine(),
                 "workers": args.workers}
  for setting, method in groups(args):
    if args.worker and not _claim(args.out, setting, method):
      continue
    run_group(args, setting, method, command, environment)
  return 0


if __name__ == "__main__":
  sys.exit(main())
