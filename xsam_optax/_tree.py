"""Pytree arithmetic that the estimators and transforms share.

Everything here works leaf by leaf: parameters are never ravelled into one
vector, so sharded parameters stay sharded.
"""

import functools
from typing import Any, NamedTuple, Optional, Union

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
  """Whether a leaf is a direction of the loss: a float dtype.

  (Complex leaves are refused before any arithmetic: see
  ``_validation.reject_complex``.)

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


def safe_normalize(tree: PyTree, *, scale: Optional[jax.Array] = None
                   ) -> tuple[PyTree, jax.Array]:
  """Returns ``(tree / ||tree||, ||tree||)``, with zeros where the norm is 0.

  Exact for any finite ``tree``: the entries are scaled by a power of two
  (:func:`power_of_two_scale` of the largest magnitude) before they are
  squared, so a float32, bfloat16 or float16 tree of norm 1e30 or 1e-30
  gives the same unit vector as at norm 1, where the plain sum of squares
  would overflow or flush to zero. A power of two scales exactly, so at
  ordinary scales the result is the unscaled computation's, bit for bit.
  ``scale``, when given, is a power of two that already brings the largest
  entry near 1 (e.g. 1 for a sum of unit vectors); it saves the pass that
  finds the largest entry, a reduction per leaf.

  A zero or non-finite tree gives a zero tree (never NaN), and then
  ``is_usable(norm)`` is false; callers decide what to do with it, e.g.
  keep a previous vector. A finite tree whose norm is beyond the dtype's
  largest number gets its exact unit vector and an infinite norm (not
  clamped: that would cost scalar arithmetic in every leaf's fusion of the
  callers that test the norm).
  """
  scale, squares = _scaled_squares(tree, scale)
  ok = is_usable(squares)
  # Both wheres: 1/0 must not be computed even on the branch not taken.
  inv = jnp.where(ok, 1.0 / jnp.sqrt(jnp.where(ok, squares, 1.0)), 0.0)
  # Two products, not x * (scale * inv): that factor is subnormal (flushed
  # to zero) for entries in the dtype's top binade. where, not just a
  # product: a NaN or inf entry times 0 is still NaN.
  unit = jax.tree.map(
      lambda x: jnp.where(ok, _widened(x) * scale * inv, 0).astype(x.dtype),
      tree)
  return unit, jnp.sqrt(squares) / scale


def vdot(x: PyTree, y: PyTree) -> jax.Array:
  """``<x, y>`` over all leaves, accumulated in at least float32.

  Not ``optax.tree.vdot``: optax 0.2.8 picks ``jnp.vdot`` when
  ``jax.__version__ < '0.7.2'``, a string comparison that is true for jax
  0.10, and ``jnp.vdot`` ravels each leaf, which all-gathers a sharded leaf.
  A leafwise product and sum reduces shard by shard.

  Unscaled (unlike :func:`global_norm`): the transforms take inner products
  with a unit vector, which overflow or flush to zero only where the result
  itself does.
  """
  def leaf(a, b):
    acc = jnp.result_type(jnp.float32, a, b)
    return jnp.sum(a.astype(acc) * b.astype(acc))

  return sum_leaves(jax.tree.leaves(jax.tree.map(leaf, x, y)))


def global_norm(tree: PyTree, *, scale: Optional[jax.Array] = None
                ) -> jax.Array:
  """``||tree||`` over all leaves, accumulated in at least float32.

  Not ``optax.tree.norm``: it adds the leaves' squares one by one (see
  :func:`sum_leaves`), squares bfloat16 leaves in bfloat16, and squares
  without scaling, so a float32 norm above about 1e19 overflows and one
  below about 1e-19 flushes to zero. Here the entries are scaled by a power
  of two first, as in :func:`safe_normalize` (``scale`` as there).
  """
  scale, squares = _scaled_squares(tree, scale)
  return jnp.sqrt(squares) / scale


def unit_scale(tree: PyTree) -> jax.Array:
  """A power of two ``s`` with ``max |x| * s`` in ``[1, 4)`` over all leaves.

  In at least float32. Leafwise maxima, each turned into its own power of
  two, then one reduction (see :func:`sum_leaves`): the smallest of them is
  the scale of the largest entry, a sharded leaf is reduced shard by shard,
  never gathered, and the scalar arithmetic runs once per leaf, where XLA
  would copy arithmetic after the reduction into every consumer's fusion.
  A zero tree gets some normal power of two; a NaN or infinite entry makes
  every scaled square non-finite, as the caller's check expects.
  """
  acc = scalar_dtype(tree)
  scales = [power_of_two_scale(jnp.max(jnp.abs(x)).astype(acc))
            for x in jax.tree.leaves(tree) if jnp.size(x)]
  if not scales:
    return jnp.ones((), acc)
  return jnp.min(jax.lax.optimization_barrier(jnp.stack(scales)), axis=0)


def power_of_two_scale(magnitude: jax.Array) -> jax.Array:
  """A power of two ``s`` with ``magnitude * s`` in ``[1, 4)``.

  For a finite ``magnitude > 0``: ``[1, 2)``, or ``[2, 4)`` in the dtype's
  top binade, where ``2**-e`` would not be a normal number. Some normal
  power of two otherwise (``2**127`` for 0, ``2**-126`` for inf and NaN in
  float32). Non-increasing in ``magnitude``. Built from the exponent bits,
  not as ``2.0 ** -e``, which XLA computes through ``exp`` and ``log``: the
  scaling must be exact. ``magnitude`` is float32 or float64, ``>= 0``.
  """
  info = jnp.finfo(magnitude.dtype)
  bits_type = {4: jnp.int32, 8: jnp.int64}[info.dtype.itemsize]
  exponent_bits = (2 * info.maxexp - 1) << info.nmant
  one = 1 << info.nmant  # the exponent field's unit
  bits = jax.lax.bitcast_convert_type(magnitude, bits_type) & exponent_bits
  # Exponent field 2 * bias - E: the value 2**(bias - E) = 2**-e. At least
  # field 1, a normal number: the top binade and inf / NaN get 2**(1 - bias).
  scaled = jnp.maximum(
      jnp.asarray((2 * (info.maxexp - 1)) * one, bits_type) - bits,
      jnp.asarray(one, bits_type))
  return jax.lax.bitcast_convert_type(scaled, magnitude.dtype)


def _widened(x: jax.Array) -> jax.Array:
  return x.astype(jnp.result_type(jnp.float32, x))


def _scaled_squares(tree: PyTree, scale: Optional[jax.Array]
                    ) -> tuple[jax.Array, jax.Array]:
  """``scale`` (:func:`unit_scale` if ``None``) and ``sum (s x)^2``."""
  if scale is None:
    scale = unit_scale(tree)
  squares = sum_leaves([jnp.sum(jnp.square(_widened(x) * scale))
                        for x in jax.tree.leaves(tree)])
  return scale, squares


def sum_leaves(parts: list[jax.Array]) -> jax.Array:
  """``sum(parts)`` of one partial result per leaf, as one reduction.

  Not Python's ``sum``: XLA fuses a chain of ``n`` scalar additions into
  every consumer of its result, and each leaf's update consumes it, so a
  tree of ``n`` leaves compiled ``n`` copies of the chain: optimised HLO and
  compile time grew as ``n**2``. One ``reduce`` of the stacked parts is
  never duplicated; the barrier keeps XLA's simplifier from splitting the
  reduce of a stack back into that chain. ``parts`` may be scalars or
  vectors of one shape; an empty list sums to a float32 zero.
  """
  if not parts:
    return jnp.zeros((), jnp.float32)
  stacked = jnp.stack(jnp.broadcast_arrays(*parts))
  return jnp.sum(jax.lax.optimization_barrier(stacked), axis=0)


def all_leaves(parts: list[jax.Array]) -> jax.Array:
  """``all(parts)`` of one boolean per leaf, as one reduction (see :func:`sum_leaves`)."""
  if not parts:
    return jnp.array(True)
  return jnp.all(jax.lax.optimization_barrier(jnp.stack(parts)), axis=0)


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
  return sum_leaves(jax.tree.leaves(per_leaf))


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


def random_unit_like(key: jax.Array, tree: PyTree) -> PyTree:
  """A Gaussian direction with the structure and dtypes of ``tree``, unit norm.

  Leaf ``i`` is ``jax.random.normal(keys[i], shape, jnp.float32)`` with
  ``keys = jax.random.split(key, n)``, cast to the leaf's dtype; then the
  whole tree is normalised.

  Compiled as written, that is one threefry draw per leaf, and compile time
  grows with the number of leaves. With JAX's partitionable threefry (the
  default) a draw of ``size`` numbers is the first ``size`` numbers of a
  longer draw with the same key, so leaves are drawn in a few groups of
  padded sizes (one for all small leaves, powers of two above, exact for
  large leaves), one ``vmap`` per group, and the program grows with the
  number of groups. Called
  eagerly on arrays of one device (``tx.init(params)``), the leaves are cut
  from the groups on the host: a program that slices hundreds of outputs
  out of one array compiles a kernel per slice. Traced (inside ``jax.jit``)
  or on sharded arrays, they are cut in the program.

  Leaves sharded over explicit mesh axes are drawn one by one with that
  sharding, so the draw never materialises on one device and later
  ``jnp.where`` against arrays sharded like ``tree`` type-checks.
  """
  leaves, treedef = jax.tree.flatten(tree)
  if not leaves:
    return tree
  # Inside a trace (jit of init) the key is traced even for constant leaves.
  eager = not isinstance(key, jax.core.Tracer) and _on_one_device(leaves)
  layout = _draw_layout(leaves, shardable=not eager)
  if eager:
    stacks = jax.device_get(_draws(key, layout))
    inv = _inverse_norm(stacks, layout, np)
    out = _put_like([_cut(stacks, leaf, inv, np) for leaf in layout.leaves],
                    leaves)
  else:
    out = _unit_leaves(key, layout)
  return treedef.unflatten(out)


class _Leaf(NamedTuple):
  """Where a leaf's draw is: row ``row`` of group ``group``, first ``size``."""

  group: int
  row: int
  shape: tuple[int, ...]
  dtype: Any
  sharding: Any


class _DrawLayout(NamedTuple):
  """Static description of a draw: leaves grouped by padded size and dtype."""

  # Per group: (padded size, leaf indices), or (shape, (index,)) for a leaf
  # with an explicit sharding, drawn on its own.
  groups: tuple[tuple[Any, tuple[int, ...]], ...]
  leaves: tuple[_Leaf, ...]


# Leaves of at most _SMALL numbers (biases, norms' scales, small kernels) are
# drawn in one group padded to _SMALL; larger ones up to _PAD_UP_TO in groups
# of power-of-two sizes; larger ones at their own size. Each group is one
# threefry kernel to compile, and the padding costs at most _SMALL numbers
# per small leaf, twice a middle one's, nothing for a large one.
_SMALL = 1 << 12
_PAD_UP_TO = 1 << 20


def _padded(size: int) -> int:
  if size <= _SMALL:
    return _SMALL
  return size if size > _PAD_UP_TO else 1 << (size - 1).bit_length()


def _draw_layout(leaves: list[Any], shardable: bool = True) -> _DrawLayout:
  """The groups; ``shardable=False`` skips looking for explicit shardings
  (concrete arrays on one device have none)."""
  groups: dict[Any, list[int]] = {}
  where = []
  for i, x in enumerate(leaves):
    shape = tuple(jnp.shape(x))
    sharding = explicit_sharding(x) if shardable else None
    dtype = jnp.dtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x))
    group = ((shape, i) if sharding is not None
             else (_padded(int(np.prod(shape, dtype=np.int64))), dtype))
    number = groups.setdefault(group, (len(groups), []))
    where.append(_Leaf(number[0], len(number[1]), shape, dtype, sharding))
    number[1].append(i)
  return _DrawLayout(tuple((g[0], tuple(m)) for g, (_, m) in groups.items()),
                     tuple(where))


def _put_like(values: list[np.ndarray], leaves: list[Any]) -> list[jax.Array]:
  """Each value on its leaf's device if that leaf is committed to one (as jit
  would place it), else on the default device, uncommitted (so the first
  step's arguments are committed as they are on later steps: one
  compilation). One transfer call for all the uncommitted ones."""
  committed = [getattr(x, "committed", False) for x in leaves]
  free = iter(jax.device_put([v for v, c in zip(values, committed) if not c]))
  return [jax.device_put(v, x.sharding) if c else next(free)
          for v, x, c in zip(values, leaves, committed)]


def _on_one_device(leaves: list[Any]) -> bool:
  """Concrete leaves on at most one device, none traced or sharded."""
  for x in leaves:
    if isinstance(x, jax.core.Tracer):
      return False
    sharding = getattr(x, "sharding", None)
    if sharding is not None and len(sharding.device_set) > 1:
      return False
  return True


def _group_draws(key: jax.Array, layout: _DrawLayout) -> list[jax.Array]:
  """One float32 array per group: its leaves' draws on a leading axis."""
  keys = jax.random.split(key, len(layout.leaves))
  draws = []
  for size_or_shape, indices in layout.groups:
    sharding = layout.leaves[indices[0]].sharding
    if sharding is None:
      draws.append(jax.vmap(
          lambda k, size=size_or_shape: jax.random.normal(
              k, (size,), jnp.float32))(keys[np.asarray(indices)]))
    else:
      # out_sharding only where it is needed: jax < 0.6 has no such argument.
      draws.append(jax.random.normal(
          keys[indices[0]], size_or_shape, jnp.float32,
          out_sharding=sharding)[None])
  return draws


def _cut(stacks, leaf: _Leaf, inv, xnp):
  """The leaf's unit-norm draw in its dtype, cut from the groups (``xnp``:
  NumPy on the host or ``jax.numpy`` in a program; the norm is summed in
  another order there, so the two can differ in the last bit)."""
  row = stacks[leaf.group][leaf.row]
  size = int(np.prod(leaf.shape, dtype=np.int64))
  if leaf.sharding is None:
    row = row[:size].reshape(leaf.shape)
  # The draw is cast before it is scaled, as the norm was taken of the cast;
  # scaled in at least float32.
  acc = np.result_type(np.float32, leaf.dtype)
  scale = xnp.asarray(inv).astype(acc)
  return (row.astype(leaf.dtype).astype(acc) * scale).astype(leaf.dtype)


def _inverse_norm(stacks, layout: _DrawLayout, xnp):
  """``1 / ||draws||`` over the leaves' numbers in their dtypes (0 if that
  norm is zero or not finite), in ``xnp`` (NumPy on the host, ``jax.numpy``
  in a program)."""
  squares = []
  for stack, (_, indices) in zip(stacks, layout.groups):
    first = layout.leaves[indices[0]]
    acc = np.result_type(np.float32, first.dtype)
    cast = stack.astype(first.dtype).astype(acc)
    if first.sharding is None:
      # Each row's own numbers only: a padded row's tail is no leaf's.
      sizes = np.asarray([np.prod(layout.leaves[i].shape, dtype=np.int64)
                          for i in indices])
      valid = np.arange(stack.shape[1])[None, :] < sizes[:, None]
      cast = xnp.where(valid, cast, 0)
    squares.append(xnp.sum(xnp.square(cast)))
  norm = (xnp.sqrt(sum_leaves(squares)) if xnp is jnp
          else np.sqrt(np.sum(np.stack(squares).astype(np.float64))))
  finite = xnp.isfinite(norm) & (norm > 0)
  return xnp.where(finite, 1.0 / xnp.where(finite, norm, 1.0), 0.0)


@functools.partial(jax.jit, static_argnums=1)
def _draws(key: jax.Array, layout: _DrawLayout) -> list[jax.Array]:
  return _group_draws(key, layout)


@functools.partial(jax.jit, static_argnums=1)
def _unit_leaves(key: jax.Array, layout: _DrawLayout) -> list[jax.Array]:
  stacks = _group_draws(key, layout)
  inv = _inverse_norm(stacks, layout, jnp)
  return [_cut(stacks, leaf, inv, jnp) for leaf in layout.leaves]


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
