"""Pytree arithmetic that the estimators and transforms share.

Everything here works leaf by leaf: parameters are never ravelled into one
vector, so sharded parameters stay sharded.
"""

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# The name of a mapped axis (pmap, shard_map, vmap), or a tuple of them.
AxisName = Optional[Union[str, tuple[str, ...]]]


def as_arrays(tree: PyTree) -> PyTree:
  """Python and NumPy scalar leaves as JAX arrays; other leaves untouched.

  ``jax.grad`` accepts a Python float parameter, so users write them; the
  transforms' arithmetic needs a ``dtype`` on every leaf.
  """
  scalar = (int, float, complex, np.generic)
  return jax.tree.map(
      lambda x: jnp.asarray(x) if isinstance(x, scalar) else x, tree)


def is_float(x: Any) -> bool:
  """Whether a leaf is a direction of the loss: a float (or complex) dtype.

  Integer and boolean leaves (a step counter) are not; their gradients are
  ``float0`` (``jax.grad(..., allow_int=True)``).
  """
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def scalar_dtype(tree: PyTree) -> jnp.dtype:
  """Dtype for scalars and small matrices about ``tree``: at least float32."""
  return jnp.result_type(jnp.float32, *jax.tree.leaves(tree))


def batch_mean(tree: PyTree, batch_axis_name: AxisName) -> PyTree:
  """Averages over the named mapped axis (pmap / shard_map / vmap), if any."""
  if batch_axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name=batch_axis_name)


def safe_normalize(tree: PyTree) -> tuple[PyTree, jax.Array]:
  """Returns ``(tree / ||tree||, ||tree||)``, with zeros where the norm is 0.

  A zero or non-finite norm gives a zero tree (never NaN); callers decide what
  to do with it, e.g. keep a previous vector.
  """
  norm = optax.tree.norm(tree)
  ok = is_usable(norm)
  inv = jnp.where(ok, 1.0 / jnp.where(ok, norm, 1.0), 0.0)
  # where, not just `x * inv`: a NaN or inf entry times 0 would still be NaN.
  return jax.tree.map(
      lambda x: jnp.where(ok, x * inv, 0).astype(x.dtype), tree), norm


def vdot(x: PyTree, y: PyTree) -> jax.Array:
  """``<x, y>`` over all leaves, accumulated in at least float32.

  Not ``optax.tree.vdot``: optax 0.2.8 picks ``jnp.vdot`` when
  ``jax.__version__ < '0.7.2'``, a string comparison that is true for jax
  0.10, and ``jnp.vdot`` ravels each leaf, which all-gathers a sharded leaf.
  A leafwise product and sum reduces shard by shard.
  """
  def leaf(a, b):
    acc = jnp.result_type(jnp.float32, a, b)
    return jnp.sum(a.astype(acc) * b.astype(acc))

  return sum(jax.tree.leaves(jax.tree.map(leaf, x, y)),
             jnp.zeros((), jnp.float32))


def add_scaled(x: PyTree, scale: jax.Array, y: PyTree) -> PyTree:
  """``x + scale * y`` leafwise, keeping the dtypes of ``x``.

  ``scale`` is usually a float32 scalar; without the cast it would silently
  promote bfloat16 leaves to float32.
  """
  return jax.tree.map(lambda a, b: (a + scale * b).astype(a.dtype), x, y)


def is_usable(norm: jax.Array) -> jax.Array:
  """Whether a vector of this norm can be normalised: finite and positive."""
  return jnp.isfinite(norm) & (norm > 0)


def stacked_dots(stacked: PyTree, tree: PyTree) -> jax.Array:
  """``[<stacked[i], tree> for i]`` as one vector, without ravelling."""
  # A product and sum, not a tensordot: contracting sharded axes in a
  # tensordot is a type error under explicit sharding.
  per_leaf = jax.tree.map(
      lambda s, x: jnp.sum(s * x, axis=tuple(range(1, s.ndim))).astype(
          jnp.result_type(s.dtype, x.dtype)),
      stacked,
      tree,
  )
  return sum(jax.tree.leaves(per_leaf))


def stacked_combination(coeffs: jax.Array, stacked: PyTree) -> PyTree:
  """``sum_i coeffs[..., i] * stacked[i]``: one tree, or a stack if 2-D."""
  # Row by row, which XLA fuses into one elementwise pass. A tensordot over
  # the stacked axis copied the whole stack into another layout, and a sum
  # over that axis was far slower on CPU (tests/test_estimators.py bounds the
  # memory per Lanczos product).
  def combine(s):
    c = coeffs.astype(s.dtype)
    if c.ndim == 1:
      return sum(c[i] * s[i] for i in range(s.shape[0]))
    column = lambda i: c[:, i].reshape((-1,) + (1,) * (s.ndim - 1))
    return sum(column(i) * s[i] for i in range(s.shape[0]))

  return jax.tree.map(combine, stacked)


def list_dots(trees: list[PyTree], tree: PyTree) -> jax.Array:
  """``[<trees[i], tree> for i]`` as one vector (the list form of :func:`stacked_dots`)."""
  return jnp.stack([vdot(t, tree) for t in trees])


def list_combination(coeffs: jax.Array, trees: list[PyTree]) -> PyTree:
  """``sum_i coeffs[..., i] * trees[i]``: one tree, or a stack if 2-D.

  The list form of :func:`stacked_combination`: a fused elementwise sum over
  the vectors where they are, without stacking them first.
  """
  def combine(*leaves):
    c = coeffs.astype(leaves[0].dtype)
    if c.ndim == 1:
      return sum(c[i] * x for i, x in enumerate(leaves))
    column = lambda i: c[:, i].reshape((-1,) + (1,) * leaves[0].ndim)
    return sum(column(i) * x[None] for i, x in enumerate(leaves))

  return jax.tree.map(combine, *trees)


def explicit_sharding(x: jax.Array):
  """``x``'s sharding where it is part of its type (explicit mesh axes).

  ``None`` otherwise (unsharded, or a mesh with ``AxisType.Auto`` axes, whose
  shardings jit propagates by itself).
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", ())
  return sharding if any(s is not None for s in spec) else None


@jax.jit
def random_unit_like(key: jax.Array, tree: PyTree) -> PyTree:
  """A Gaussian direction with the structure and dtypes of ``tree``, unit norm.

  Jitted: called eagerly (``tx.init(params)``), its dozens of operations
  would each be compiled on their own, seconds on a CPU; one program is one
  compilation.

  Leaves sharded over explicit mesh axes are drawn with that sharding, so the
  draw never materialises on one device and later ``jnp.where`` against
  arrays sharded like ``tree`` type-checks.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  def draw(k, x):
    sharding = explicit_sharding(x)
    # out_sharding only where it is needed: jax < 0.6 has no such argument.
    kwargs = {} if sharding is None else {"out_sharding": sharding}
    return jax.random.normal(k, jnp.shape(x), jnp.float32,
                             **kwargs).astype(jnp.result_type(x))

  draws = [draw(k, x) for k, x in zip(keys, leaves)]
  unit, _ = safe_normalize(jax.tree.unflatten(treedef, draws))
  return unit


def _shape_dtype(x) -> tuple[tuple[int, ...], jnp.dtype]:
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return tuple(x.shape), jnp.dtype(x.dtype)
  return jnp.shape(x), jnp.result_type(x)


def check_same_structure(expected: PyTree, got: PyTree, *, what: str) -> None:
  """Raises a ``ValueError`` unless ``got`` is shaped like ``expected``.

  Same tree structure (the error names both), and leaf by leaf the same
  shape and dtype (the error names the leaf): a gradient with respect to
  ``expected`` has exactly that, and a broadcastable shape would otherwise
  silently reshape the parameters.
  """
  expected_def = jax.tree.structure(expected)
  got_def = jax.tree.structure(got)
  if expected_def != got_def:
    hint = ""
    if (isinstance(got, tuple) and len(got) == 2
        and expected_def in (jax.tree.structure(got[0]),
                             jax.tree.structure(got[1]))):
      hint = (
          f"\n  {what} returns a pair: did you pass jax.value_and_grad(...) "
          "or jax.grad(..., has_aux=True)? It must return the gradient "
          "only, e.g. lambda p: jax.grad(loss, has_aux=True)(p, batch)[0].")
    raise ValueError(
        f"{what} returned a pytree whose structure differs from params.\n"
        f"  params: {expected_def}\n  {what}: {got_def}{hint}"
    )
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  for (path, want), have in zip(paths, jax.tree.leaves(got)):
    (want_shape, want_dtype), (have_shape, have_dtype) = (
        _shape_dtype(want), _shape_dtype(have))
    if (want_shape, want_dtype) != (have_shape, have_dtype):
      where = jax.tree_util.keystr(path)
      raise ValueError(
          f"{what} returned a leaf of shape {have_shape} and dtype "
          f"{have_dtype} at {where}, but params{where} has shape "
          f"{want_shape} and dtype {want_dtype}: {what} must return the "
          "gradient with respect to params, leaf for leaf (jax.grad does; "
          "cast a gradient computed in another precision back with "
          "jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)).")
