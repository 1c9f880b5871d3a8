"""One training protocol for every optimizer: losses, the jitted step, evaluation.

The protocol, shared by SGD, SAM and X-SAM so that only the optimizer differs:

* the same initial parameters (``jax.random.key(seed)``), the same per-epoch
  shuffles (``numpy`` generator seeded by ``(seed, epoch)``), the same number of
  steps (the last partial batch is dropped so every step has one shape);
* the base optimizer is SGD with momentum, L2 weight decay added to the
  incoming direction (as ``torch.optim.SGD(weight_decay=...)``) and a cosine
  learning-rate schedule over all steps;
* the whole step -- clean forward/backward, SAM ascent, eigenvector refresh,
  correction, base update -- is one ``jax.jit``-ed function, compiled ahead of
  time (for an optimizer with refreshes twice: with and without the
  eigenvector refresh, the host choosing on the optimizer's own schedule), so
  no step ever recompiles;
* BatchNorm: every gradient and Hessian-vector product of the step is taken of
  the *training-mode* loss (batch statistics) on the step's mini-batch, and the
  running statistics are updated once per step, from the clean forward pass;
* after every epoch: test loss/accuracy (running statistics) and the top
  Hessian eigenvalue of the training-mode loss on a fixed evaluation batch,
  by Lanczos from a fixed start vector, for every optimizer alike.

Example:
  >>> import jax.numpy as jnp, optax
  >>> from xsam_optax.train.models import make_model
  >>> model = make_model("mlp", num_classes=3)
  >>> state = init_state(model, optax.sgd(0.1), jnp.zeros((4, 5)), seed=0)
  >>> step = jax.jit(make_train_step(model, optax.sgd(0.1)))
  >>> state, metrics = step(state, jnp.ones((4, 5)), jnp.array([0, 1, 2, 0]))
  >>> int(state.step), sorted(metrics)
  (1, ['accuracy', 'cos_angle', 'grad_norm', 'loss'])
"""

from __future__ import annotations

from collections.abc import Callable
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_optax
from xsam_optax.train import data as data_lib
from xsam_optax.train import models
from xsam_optax.train import optimizers as optimizers_lib

PyTree = Any  # a parameter pytree (the library's alias is private)
class TrainState(NamedTuple):
  """Everything a step reads and writes (all arrays; no Python-side state)."""

  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  step: jax.Array


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_loss(model) -> Callable[..., tuple[jax.Array, tuple[PyTree, jax.Array]]]:
  """Training-mode loss: ``(params, batch_stats, x, y) -> (loss, (new_batch_stats, logits))``.

  BatchNorm normalises with the mini-batch's own statistics, so the loss does
  not depend on ``batch_stats``; the updated running statistics come back as
  auxiliary output and it is up to the caller to keep or drop them.
  """

  def loss_fn(params, batch_stats, x, y):
    logits, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"])
    return cross_entropy(logits, y), (mutated.get("batch_stats", {}), logits)

  return loss_fn


def make_grad_fn(
    model, batch_stats: PyTree, x: jax.Array, y: jax.Array
) -> Callable[[PyTree], PyTree]:
  """``params -> grad`` of the training-mode loss on ``(x, y)``; running stats discarded.

  This is the ``grad_fn`` handed to the SAM ascent and the eigenvector
  estimator: their extra forward passes and Hessian-vector products never touch
  the running statistics.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xsam_optax.train.models import make_model
    >>> model = make_model("mlp", num_classes=2)
    >>> v = init_variables(model, jnp.zeros((4, 6)), seed=0)
    >>> g = make_grad_fn(model, {}, jnp.ones((4, 6)), jnp.array([0, 1, 0, 1]))
    >>> grads = jax.jit(g)(v["params"])
    >>> jax.tree.structure(grads) == jax.tree.structure(v["params"])
    True
  """
  loss_fn = make_train_loss(model)
  return jax.grad(lambda p: loss_fn(p, batch_stats, x, y)[0])


def make_gauss_newton_fn(
    model, batch_stats: PyTree, x: jax.Array, y: jax.Array
) -> Callable[[PyTree, PyTree], PyTree]:
  """``(params, v) -> G v`` for the training-mode logits and the mean cross-entropy.

  :func:`xsam_optax.gauss_newton_fn` of the same forward pass as
  :func:`make_grad_fn` (batch statistics, running statistics discarded): the
  ``curvature_fn`` of ``--curvature gauss-newton``.
  """
  def logits_fn(params):
    return model.apply({"params": params, "batch_stats": batch_stats}, x,
                       train=True, mutable=["batch_stats"])[0]

  return xsam_optax.gauss_newton_fn(logits_fn, lambda z: cross_entropy(z, y))


def init_variables(model, sample_x: jax.Array, *, seed: int) -> dict[str, PyTree]:
  """``model.init`` from ``jax.random.key(seed)``, jitted (eagerly it compiles op by op).

  Example:
    >>> from xsam_optax.train.models import make_model
    >>> sorted(init_variables(make_model("cnn", num_classes=2), jnp.zeros((1, 6, 1)), seed=0))
    ['batch_stats', 'params']
  """
  return jax.jit(model.init)(jax.random.key(seed), sample_x)


def init_state(
    model,
    tx: optax.GradientTransformation,
    sample_x: jax.Array,
    *,
    seed: int,
    variables: dict[str, PyTree] | None = None,
) -> TrainState:
  """Initial :class:`TrainState`: model variables from ``seed`` (or the given ones) and ``tx.init``.

  Pass the same ``variables`` to every optimizer's run to share one
  initialisation without recomputing it.
  """
  if variables is None:
    variables = init_variables(model, sample_x, seed=seed)
  params = variables["params"]
  return TrainState(
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=jax.jit(tx.init)(params),
      step=jnp.zeros([], jnp.int32),
  )


def lanczos_start(params: PyTree, seed: int) -> PyTree:
  """A Gaussian pytree like ``params``: the fixed start vector of the eigenvalue measurement.

  Drawn with NumPy on the host: a JAX PRNG would compile a sampler per leaf
  shape, which on CPU cost more than the draw is worth.

  Example:
    >>> v = lanczos_start({"w": jnp.zeros((2, 3))}, seed=0)
    >>> v["w"].shape, v["w"].dtype
    ((2, 3), dtype('float32'))
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


def make_train_step(model, tx: optax.GradientTransformationExtraArgs, *,
                    curvature: str | Callable[..., Any] = "hessian", sam_groups: int = 1):
  """The whole training step ``(state, x, y) -> (state, metrics)``, to be jitted once.

  One clean ``value_and_grad`` pass gives the loss, the gradient and the new
  running statistics; ``tx.update`` may call ``grad_fn`` again (SAM ascent,
  Hessian-vector products) on the same mini-batch in training mode; its
  running-statistic updates are discarded.

  ``refresh`` (static) is forwarded to ``tx.update`` when given: X-SAM then
  refreshes its eigenvector (``True``) or not (``False``) without ``lax.cond``.
  ``curvature="gauss-newton"`` hands ``tx.update`` a ``curvature_fn``
  (:func:`make_gauss_newton_fn`), so refreshes use the Gauss-Newton matrix;
  ``"finite-difference"`` one of :func:`xsam_optax.finite_difference_fn`
  from the step's clean gradient (one more gradient per product, guarded);
  ``"hessian"`` hands none, so they use the Hessian of ``grad_fn``.
  ``sam_groups > 1`` hands ``tx.update`` a ``grad_fn`` from
  :func:`xsam_optax.grouped_grad_fn` over that many equal groups of ``(x, y)``
  (each group's BatchNorm statistics its own): the SAM ascent perturbs each
  group along its own gradient.

  Returns metrics ``loss``, ``accuracy``, ``grad_norm`` (of the clean pass) and
  ``cos_angle`` (the optimizer's cos(g_hat, v) when its state has one, else NaN).
  """
  if not callable(curvature) and curvature not in optimizers_lib.CURVATURES:
    raise ValueError(f"curvature must be one of {optimizers_lib.CURVATURES} or a callable, "
                     f"got {curvature!r}")
  loss_fn = make_train_loss(model)
  tx = optax.with_extra_args_support(tx)

  def train_step(state: TrainState, x: jax.Array, y: jax.Array,
                 refresh: bool | None = None):
    (loss, (new_batch_stats, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state.batch_stats, x, y)
    if sam_groups == 1:
      grad_fn = make_grad_fn(model, state.batch_stats, x, y)
    else:
      grad_fn = xsam_optax.grouped_grad_fn(
          lambda p, b: loss_fn(p, state.batch_stats, *b)[0], (x, y), sam_groups)
    extra = {} if refresh is None else {"refresh": refresh}
    if callable(curvature):
      extra["curvature_fn"] = curvature(state.batch_stats, x, y, grads)
    elif curvature == "gauss-newton":
      extra["curvature_fn"] = make_gauss_newton_fn(model, state.batch_stats, x, y)
    elif curvature == "finite-difference":
      extra["curvature_fn"] = xsam_optax.finite_difference_fn(grad_fn, grads)
    updates, opt_state = tx.update(
        grads, state.opt_state, state.params, grad_fn=grad_fn, **extra)
    params = optax.apply_updates(state.params, updates)
    cos_angle = optax.tree.get(opt_state, "cos_angle")
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
        "grad_norm": optax.tree.norm(grads),
        "cos_angle": jnp.nan if cos_angle is None else jnp.asarray(cos_angle, jnp.float32),
    }
    new_state = TrainState(params, new_batch_stats, opt_state, state.step + 1)
    return new_state, metrics

  return train_step


def make_eval_fn(model):
  """``(params, batch_stats, x, y) -> (loss, accuracy)`` in eval mode (running statistics)."""

  def eval_fn(params, batch_stats, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

  return eval_fn


def make_top_eigenvalue_fn(model, *, num_iters: int = 10):
  """``(params, batch_stats, x, y, v0) -> lambda_max`` of the training-mode loss Hessian.

  Lanczos (algebraically largest eigenvalue) with ``num_iters`` Hessian-vector
  products from the start vector ``v0``; the same for every optimizer. The
  default agreed with 40 products to the digits the report prints on the
  CLI's MNIST-1D CNN.
  """

  def top_eigenvalue(params, batch_stats, x, y, v0):
    grad_fn = make_grad_fn(model, batch_stats, x, y)
    # Unrolled: on XLA:CPU, conv-net HVPs inside a rolled loop run slower.
    result = xsam_optax.lanczos(
        lambda v: xsam_optax.hvp(grad_fn, params, v), v0, num_iters=num_iters,
        unroll=True)
    return result.eigenvalue

  return top_eigenvalue


class Protocol(NamedTuple):
  """What every optimizer of one comparison shares (see the module notes)."""

  dataset: data_lib.Dataset
  model: Any
  steps_per_epoch: int
  total_steps: int
  schedule: optax.Schedule
  eval_x: jax.Array  # the fixed batch of the eigenvalue measurement
  eval_y: jax.Array


def make_protocol(dataset_name: str, model_name: str, *, batch_size: int, epochs: int,
                  lr: float, eval_batch_size: int, train_size: int | None = None,
                  dataset: data_lib.Dataset | None = None) -> Protocol:
  """Data, model, cosine schedule over all steps and evaluation batch.

  ``dataset``: the data of ``dataset_name`` (and ``train_size``) if the caller has
  loaded it already. A ``batch_size`` larger than the training split raises a
  ``ValueError``: an epoch would have no step.

  Example:
    >>> p = make_protocol("digits", "mlp", batch_size=64, epochs=2, lr=0.1,
    ...                   eval_batch_size=32)
    >>> p.steps_per_epoch, p.total_steps, p.eval_x.shape[0]
    (21, 42, 32)
  """
  if dataset is None:
    dataset = data_lib.load_dataset(dataset_name, train_size=train_size)
  model = models.make_model(model_name, num_classes=dataset.num_classes)
  steps_per_epoch = len(dataset.x_train) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(
        f"batch_size {batch_size} is larger than the {len(dataset.x_train)} "
        f"training examples of {dataset_name}: an epoch would have no step.")
  total_steps = steps_per_epoch * epochs
  return Protocol(
      dataset=dataset, model=model, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      schedule=optax.cosine_decay_schedule(lr, decay_steps=total_steps),
      eval_x=jnp.asarray(dataset.x_train[:eval_batch_size]),
      eval_y=jnp.asarray(dataset.y_train[:eval_batch_size]))


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
  """Index array ``(steps, batch_size)`` of one epoch's shuffle; the partial batch is dropped.

  Depends only on ``(seed, epoch)``, so every optimizer sees the same order.

  Example:
    >>> epoch_batches(10, 4, seed=0, epoch=0).shape
    (2, 4)
  """
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = num_examples // batch_size
  return order[: steps * batch_size].reshape(steps, batch_size)


class RunResult(NamedTuple):
  """Per-epoch curves and timings of one optimizer's run."""

  train_loss: list[float]
  train_accuracy: list[float]
  test_loss: list[float]
  test_accuracy: list[float]
  top_eigenvalue: list[float]
  mean_cos_angle: list[float] | None
  mean_abs_cos_angle: list[float] | None
  ms_per_step: list[float]
  compile_seconds: float
  # Mean norm of the clean mini-batch gradient: what SGD/SAM's step scales
  # with, while X-SAM (normalize=True) hands the base a unit direction.
  mean_grad_norm: list[float] | None = None
  # Wall time of the per-epoch test evaluation and eigenvalue measurement.
  eval_seconds: float | None = None


def compile_steps(model, optimizer: optimizers_lib.Optimizer, state: TrainState,
                  x: jax.Array, y: jax.Array) -> dict:
  """The step compiled ahead of time, keyed by the ``refresh`` it is run with.

  ``{True: ..., False: ...}`` when ``optimizer.refresh_every`` is set (the
  host picks one per step, and neither has a ``lax.cond``), else ``{None: ...}``
  (one program; refreshes, if any, under the transform's own ``lax.cond``).
  """
  jitted = jax.jit(make_train_step(model, optimizer.tx, curvature=optimizer.curvature,
                                   sam_groups=optimizer.sam_groups),
                   static_argnames="refresh", donate_argnums=0)
  if optimizer.refresh_every is None:
    return {None: jitted.lower(state, x, y).compile()}
  return {r: jitted.lower(state, x, y, refresh=r).compile() for r in (True, False)}


def run_epoch(steps: dict, refresh_every: int | None, state: TrainState, x_train,
              y_train, batches: np.ndarray, *, first_step: int,
              progress: Any = None) -> tuple[TrainState, list[dict[str, Any]]]:
  """Runs one epoch of ``batches`` (index rows); returns the state and each step's metrics.

  ``first_step`` is the global step count before the epoch: with
  ``refresh_every`` set, step ``first_step + i`` refreshes exactly when
  :func:`xsam_optax.refresh_due` says so, the transform's own schedule.
  """
  history = []
  for i, idx in enumerate(batches):
    refresh = (None if refresh_every is None
               else xsam_optax.refresh_due(first_step + i, refresh_every))
    state, metrics = steps[refresh](state, x_train[idx], y_train[idx])
    history.append(metrics)
    if progress is not None:
      progress.update(1)
  return state, jax.device_get(history)  # device_get waits for the last step.


def _summarise(history: list[dict[str, Any]]) -> dict[str, float]:
  cos = np.array([m["cos_angle"] for m in history])
  return {
      "train_loss": float(np.mean([m["loss"] for m in history])),
      "train_accuracy": float(np.mean([m["accuracy"] for m in history])),
      "grad_norm": float(np.mean([m["grad_norm"] for m in history])),
      "cos": float(np.mean(cos)),
      "abs_cos": float(np.mean(np.abs(cos))),
  }


def run_training(
    model,
    optimizer: optimizers_lib.Optimizer | optax.GradientTransformation,
    dataset,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    eval_x: jax.Array,
    eval_y: jax.Array,
    top_eigenvalue_fn: Callable[..., jax.Array],
    eval_fn: Callable[..., tuple[jax.Array, jax.Array]],
    progress: Any = None,
    variables: dict[str, PyTree] | None = None,
) -> tuple[TrainState, RunResult]:
  """Runs the protocol for one optimizer and returns the final state and curves.

  ``optimizer``: an :class:`~xsam_optax.train.optimizers.Optimizer` from
  :func:`~xsam_optax.train.optimizers.make_optimizer`; with a
  ``refresh_every`` the step is compiled twice ahead of time, with
  ``refresh=True`` (eigenvector refresh) and ``refresh=False``, and the host
  picks one per step on the transform's own schedule (steps 0, k, 2k, ...),
  the fast way on CPU. A plain optax transform runs as one program, its
  refreshes (if any) under ``lax.cond``.

  ``eval_fn`` and ``top_eigenvalue_fn`` should be the same jitted callables for
  every optimizer (compiled once). ``progress`` is an optional object
  with tqdm's ``update(n)`` / ``set_postfix(**kw)``. ``variables``: initial
  model variables shared by every run (default: :func:`init_variables` from
  ``seed``).
  """
  if not isinstance(optimizer, optimizers_lib.Optimizer):
    optimizer = optimizers_lib.Optimizer(optax.with_extra_args_support(optimizer), None)
  x_train, y_train = dataset.x_train, dataset.y_train
  if len(x_train) // batch_size < 1:
    raise ValueError(
        f"batch_size {batch_size} exceeds the {len(x_train)} training examples")
  state = init_state(model, optimizer.tx, jnp.asarray(x_train[:batch_size]),
                     seed=seed, variables=variables)
  v0 = lanczos_start(state.params, seed)
  # The step donates its state (the old parameters and optimizer state are
  # dead after it), so copy what may be shared with other runs' `variables`.
  state = jax.tree.map(jnp.copy, state)
  t0 = time.perf_counter()
  steps = compile_steps(model, optimizer, state, x_train[:batch_size],
                        y_train[:batch_size])
  compile_seconds = time.perf_counter() - t0

  curves = {k: [] for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                            "top_eigenvalue", "cos", "abs_cos", "ms", "grad_norm")}
  global_step, eval_seconds = 0, 0.0
  for epoch in range(epochs):
    batches = epoch_batches(len(x_train), batch_size, seed=seed, epoch=epoch)
    t0 = time.perf_counter()
    state, history = run_epoch(steps, optimizer.refresh_every, state, x_train, y_train,
                               batches, first_step=global_step, progress=progress)
    curves["ms"].append(1e3 * (time.perf_counter() - t0) / len(batches))
    global_step += len(batches)

    t0 = time.perf_counter()
    test_loss, test_acc = eval_fn(state.params, state.batch_stats, dataset.x_test, dataset.y_test)
    eig = float(top_eigenvalue_fn(state.params, state.batch_stats, eval_x, eval_y, v0))
    eval_seconds += time.perf_counter() - t0
    summary = dict(_summarise(history), test_loss=float(test_loss),
                   test_accuracy=float(test_acc), top_eigenvalue=eig)
    for key, value in summary.items():
      curves[key].append(value)
    if progress is not None:
      progress.set_postfix(loss=f"{summary['train_loss']:.3f}",
                           acc=f"{summary['test_accuracy']:.3f}", eig=f"{eig:.3g}")
  return state, _run_result(curves, compile_seconds, eval_seconds)


def _run_result(curves: dict[str, list[float]], compile_seconds: float,
                eval_seconds: float) -> RunResult:
  has_cos = not np.isnan(curves["cos"]).any()
  return RunResult(
      train_loss=curves["train_loss"],
      train_accuracy=curves["train_accuracy"],
      test_loss=curves["test_loss"],
      test_accuracy=curves["test_accuracy"],
      top_eigenvalue=curves["top_eigenvalue"],
      mean_cos_angle=curves["cos"] if has_cos else None,
      mean_abs_cos_angle=curves["abs_cos"] if has_cos else None,
      ms_per_step=curves["ms"],
      compile_seconds=compile_seconds,
      mean_grad_norm=curves["grad_norm"],
      eval_seconds=eval_seconds,
  )
