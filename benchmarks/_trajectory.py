"""A fixed training trajectory: the parameters and the batch of every step.

Every estimator schedule of the quality benchmark is streamed over the same
trajectory, so schedules differ only in how they estimate the eigenvector,
never in where they are. The trajectory is one whole SAM run of the training
CLI's protocol (``xsam_optax.train.loop``: SGD momentum 0.9, weight decay
5e-4, cosine learning rate from 0.05 to 0 over the run, shuffles from
``(seed, epoch)``), so it covers the fast early phase and the slow end of
training. SAM, not X-SAM: the trajectory must not depend on any of the
schedules being compared.

Recorded once per ``(problem, seed, steps)`` into an ``.npz`` cache, leaf by
leaf (no ravelling), with the parameters *before* each step.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_optax.train import loop, optimizers

import _problems

LEARNING_RATE = 0.05
RHO = 0.05


class Trajectory(NamedTuple):
  """Parameters (leaves stacked over steps) and batch indices of a run."""

  params: Any  # pytree, leaves of shape (steps, ...)
  batch_stats: Any
  batch_indices: np.ndarray  # (steps, batch_size)

  @property
  def steps(self) -> int:
    return self.batch_indices.shape[0]

  def at(self, t: int):
    """``(params, batch_stats)`` before step ``t``."""
    take = lambda a: a[t]
    return jax.tree.map(take, self.params), jax.tree.map(take, self.batch_stats)

  def batch(self, problem: _problems.Problem, t: int):
    idx = self.batch_indices[t]
    return jnp.asarray(problem.x_train[idx]), jnp.asarray(problem.y_train[idx])


def _batch_indices(problem, steps: int, seed: int) -> np.ndarray:
  per_epoch = len(problem.x_train) // problem.batch_size
  epochs = -(-steps // per_epoch)
  return np.concatenate([
      loop.epoch_batches(len(problem.x_train), problem.batch_size, seed=seed,
                         epoch=e) for e in range(epochs)])[:steps]


def record(problem: _problems.Problem, steps: int, seed: int) -> Trajectory:
  """Runs SAM for ``steps`` steps and keeps every step's parameters."""
  indices = _batch_indices(problem, steps, seed)
  tx = optimizers.make_optimizer(
      "sam", learning_rate=optax.cosine_decay_schedule(LEARNING_RATE, steps),
      rho=RHO).tx
  x0 = jnp.asarray(problem.x_train[indices[0]])
  state = loop.init_state(problem.model, tx, x0, seed=seed)
  step = jax.jit(loop.make_train_step(problem.model, tx))
  params, stats = [], []
  for t in range(steps):
    params.append(state.params)
    stats.append(state.batch_stats)
    state, _ = step(state, *(jnp.asarray(a[indices[t]]) for a in
                             (problem.x_train, problem.y_train)))
  stack = lambda trees: jax.tree.map(lambda *xs: np.stack(xs), *trees)
  return Trajectory(stack(params), stack(stats), indices)


def _save(path: str, trajectory: Trajectory) -> None:
  arrays = {"batch_indices": trajectory.batch_indices}
  for name in ("params", "batch_stats"):
    for i, leaf in enumerate(jax.tree.leaves(getattr(trajectory, name))):
      arrays[f"{name}/{i}"] = np.asarray(leaf)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **arrays)


def _load(path: str, like: Trajectory) -> Trajectory:
  with np.load(path) as f:
    fields = {}
    for name in ("params", "batch_stats"):
      leaves, treedef = jax.tree.flatten(getattr(like, name))
      fields[name] = jax.tree.unflatten(
          treedef, [f[f"{name}/{i}"] for i in range(len(leaves))])
    return Trajectory(fields["params"], fields["batch_stats"],
                      f["batch_indices"])


def cached(problem: _problems.Problem, steps: int, seed: int,
           cache_dir: str) -> Trajectory:
  """:func:`record`, or its copy from ``cache_dir`` if one was saved."""
  path = os.path.join(cache_dir, f"trajectory-{problem.name}-seed{seed}-"
                                 f"steps{steps}.npz")
  if os.path.exists(path):
    x0 = jnp.asarray(problem.x_train[:problem.batch_size])
    variables = loop.init_variables(problem.model, x0, seed=seed)
    like = Trajectory(variables["params"], variables.get("batch_stats", {}),
                      np.zeros((steps, problem.batch_size), np.int64))
    return _load(path, like)
  trajectory = record(problem, steps, seed)
  _save(path, trajectory)
  return trajectory
