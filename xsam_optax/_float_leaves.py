"""Parameters with integer leaves: the transforms compute on the float leaves.

A step counter or an embedding index kept in the parameter tree is an
integer leaf; ``jax.grad(..., allow_int=True)`` gives it a ``float0``
gradient. Such a leaf is not a direction of the loss: the SAM perturbation,
the eigenvector, the norms and the correction live on the float leaves
alone, and the integer leaves' incoming updates pass through untouched.
One wrapper does this for every transform, so that their own code only ever
sees float trees: :func:`on_float_leaves`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from xsam_optax import _groups
from xsam_optax import _tree
from xsam_optax import _validation


def _all_float(params: _tree.PyTree) -> bool:
  return all(_tree.is_float(x) for x in jax.tree.leaves(params))


class _Split:
  """Which leaves of ``params`` are float, and how to rebuild full trees.

  The float part of a tree is the same tree with every other leaf replaced
  by ``None`` (an empty subtree), so it keeps the parameters' structure:
  the stored eigenvector is still read as ``state.eigenvector["w"]``.
  """

  def __init__(self, params: _tree.PyTree):
    self.params = params
    leaves, self.treedef = jax.tree.flatten(params)
    self.keep = [_tree.is_float(x) for x in leaves]

  def part(self, tree: _tree.PyTree) -> _tree.PyTree:
    """``tree`` with the leaves at ``params``' non-float leaves set to ``None``."""
    leaves = self.treedef.flatten_up_to(tree)
    return self.treedef.unflatten(
        [x if keep else None for keep, x in zip(self.keep, leaves)])

  def whole(self, part: _tree.PyTree, rest: _tree.PyTree) -> _tree.PyTree:
    """The float leaves from ``part``, the others from the full tree ``rest``."""
    floats = iter(jax.tree.leaves(part))
    leaves = self.treedef.flatten_up_to(rest)
    return self.treedef.unflatten(
        [next(floats) if keep else x for keep, x in zip(self.keep, leaves)])

  def tangent(self, part: _tree.PyTree) -> _tree.PyTree:
    """A direction on the float leaves as a tangent of the whole ``params``.

    ``jax.jvp`` wants a ``float0`` tangent for an integer primal.
    """
    zeros = jax.tree.map(
        lambda x: np.zeros(jnp.shape(x), jax.dtypes.float0), self.params)
    return self.whole(part, zeros)

  def output_part(self, tree: _tree.PyTree, *, what: str) -> _tree.PyTree:
    """The float part of a function's output shaped like ``params`` (checked)."""
    if jax.tree.structure(tree) != self.treedef:
      _tree.check_same_structure(self.params, tree, what=what)
    return self.part(tree)

  def grad_fn(self, grad_fn):
    """``grad_fn`` as a function of the float part (integer leaves fixed)."""
    return lambda part: self.output_part(
        grad_fn(self.whole(part, self.params)), what="grad_fn")

  def curvature_fn(self, curvature_fn):
    """``curvature_fn(params, v)`` on float parts (``float0`` tangents elsewhere)."""
    if not callable(curvature_fn):
      return curvature_fn  # The transform reports it.
    return lambda part, v: self.output_part(
        curvature_fn(self.whole(part, self.params), self.tangent(v)),
        what="curvature_fn")


def on_float_leaves(
    tx: optax.GradientTransformationExtraArgs, *, owner: str,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` run on the float leaves of the parameters; other leaves untouched.

  Complex leaves in ``params`` (or ``updates``) raise a ``ValueError`` that
  names the leaf and ``owner``, the transform's name, in ``init`` and in
  ``update``: the transforms compute in a real vector space.

  When every leaf of ``params`` is a float (the usual case) ``tx`` runs as
  it is. Otherwise ``init`` gets the float part of ``params`` (the state's
  eigenvector has ``None`` at the integer leaves), and ``update`` gets the
  float parts of ``updates`` and ``params``, ``grad_fn`` and
  ``curvature_fn`` as functions of that part, and returns the incoming
  updates of the integer leaves unchanged (a ``float0`` gradient stays
  ``float0``; a zero gradient stays zero).
  """

  def init_fn(params):
    _validation.reject_complex(params, what="params", owner=f"{owner}.init")
    arrays = _tree.as_arrays(params)
    if _all_float(arrays):
      return tx.init(params)
    return tx.init(_Split(arrays).part(arrays))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    _validation.reject_complex(params, what="params", owner=f"{owner}.update")
    _validation.reject_complex(updates, what="updates",
                               owner=f"{owner}.update")
    if params is None or not callable(grad_fn):
      # Missing arguments: the transform raises its own error.
      return tx.update(updates, state, params, grad_fn=grad_fn, **extra_args)
    arrays = _tree.as_arrays(params)
    if _all_float(arrays):
      return tx.update(updates, state, params, grad_fn=grad_fn, **extra_args)
    if _groups.is_grouped(grad_fn):
      raise ValueError(
          f"{owner}: grad_fn from grouped_grad_fn needs float parameters; "
          "params has integer or boolean leaves. Keep them out of the "
          "optimized parameters (close the loss over them).")
    split = _Split(arrays)
    if "curvature_fn" in extra_args:
      extra_args["curvature_fn"] = split.curvature_fn(
          extra_args["curvature_fn"])
    new, state = tx.update(split.part(updates), state, split.part(arrays),
                           grad_fn=split.grad_fn(grad_fn), **extra_args)
    return split.whole(new, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def zero_integer_updates(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """The base ``optimizer``, with a zero update for every integer leaf.

  What :func:`sam` and :func:`xsam` put after the ascent. An integer leaf's
  incoming update is ``float0`` (``jax.grad(..., allow_int=True)``), which
  optax's optimizers cannot compute with: the base gets a zero of the leaf's
  dtype instead, as plain optax would be given, so its state is the one it
  keeps for such a leaf. The leaf's outgoing update is a zero of its dtype
  too, whatever the base made of it, so ``optax.apply_updates`` leaves a
  step counter where it was. When every leaf is a float, ``optimizer`` runs
  as it is.
  """
  optimizer = optax.with_extra_args_support(optimizer)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:  # The ascent before it has raised already.
      return optimizer.update(updates, state, params, **extra_args)
    arrays = _tree.as_arrays(params)
    if _all_float(arrays):
      return optimizer.update(updates, state, params, **extra_args)
    split = _Split(arrays)
    zeros = jax.tree.map(
        lambda x: jnp.zeros(jnp.shape(x), jnp.result_type(x)), arrays)
    new, state = optimizer.update(split.whole(split.part(updates), zeros),
                                  state, params, **extra_args)
    return split.whole(split.part(new), zeros), state

  return optax.GradientTransformationExtraArgs(optimizer.init, update_fn)
