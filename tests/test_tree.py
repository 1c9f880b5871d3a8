"""Leafwise pytree arithmetic where optax's would not do (``_tree``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

from xsam_optax import _tree
from _oracles import flat

TREE = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.array([1.0, -2.0])}


def primitives(fn, *args):
  """Names of every primitive in ``fn``'s jaxpr, sub-jaxprs included."""
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jex_core.ClosedJaxpr):
            visit(sub.jaxpr)
          elif isinstance(sub, jex_core.Jaxpr):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def test_optax_tree_vdot_still_ravels_its_leaves():
  """Why ``_tree.vdot`` exists. optax 0.2.8 compares version strings
  (``jax.__version__ < '0.7.2'``, true for '0.10'), so it takes
  ``jnp.vdot``, which ravels every leaf: an all-gather of a sharded leaf.
  When this fails, optax has fixed it: use ``optax.tree.vdot`` in _tree.vdot's
  callers and delete it."""
  assert "reshape" in primitives(optax.tree.vdot, TREE, TREE), (
      f"optax {optax.__version__} no longer ravels in tree.vdot on jax "
      f"{jax.__version__}: xsam_optax._tree.vdot can be replaced by it.")


def test_tree_vdot_reduces_leaf_by_leaf_in_float32():
  assert "reshape" not in primitives(_tree.vdot, TREE, TREE)
  np.testing.assert_allclose(float(_tree.vdot(TREE, TREE)),
                             flat(TREE) @ flat(TREE), rtol=1e-7)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), TREE)
  assert _tree.vdot(bf16, bf16).dtype == jnp.float32
  # 1 + 257 * 2^-8: every term is bf16-exact, the sum is not.
  x = {"w": jnp.concatenate([jnp.ones(1), jnp.full((257,), 2.0 ** -4)])
       .astype(jnp.bfloat16)}
  assert float(_tree.vdot(x, x)) == 1 + 257 / 256


# ------------------------------------------- norms exact at any finite scale


def test_power_of_two_scale_brings_every_binade_near_one():
  # Oracle: NumPy's frexp in float64. m = f 2^E with f in [0.5, 1), so the
  # scale is 2^-(E - 1), kept a normal float32 in the top binade.
  mantissas = np.array([1.0, 1.5, 1.999])
  exponents = np.arange(-126, 128)
  m = (mantissas[None, :] * 2.0 ** exponents[:, None]).ravel()
  m = np.minimum(m, np.finfo(np.float32).max).astype(np.float32)
  scale = np.asarray(_tree.power_of_two_scale(jnp.asarray(m)), np.float64)
  _, e = np.frexp(m.astype(np.float64))
  np.testing.assert_array_equal(scale, 2.0 ** -np.minimum(e - 1, 126))
  assert np.all(np.frexp(scale)[0] == 0.5)  # powers of two
  assert np.all(scale >= np.finfo(np.float32).tiny)  # normal numbers
  scaled = m.astype(np.float64) * scale
  assert np.all((scaled >= 1.0) & (scaled < 4.0))
  assert np.all(scaled[:-6] < 2.0)  # [2, 4) only in the top binade


def _scaled_tree(scale):
  """Leaves of three dtypes whose entries span a factor of 10 around
  ``scale``, and the same values in float64 (the oracle's input)."""
  rng = np.random.default_rng(0)
  values = {"f32": rng.uniform(-1, 1, (3, 4)), "bf16": rng.uniform(-1, 1, 5),
            "pair": [rng.uniform(-10, 10, 2), np.array([0.5])]}
  dtypes = {"f32": jnp.float32, "bf16": jnp.bfloat16,
            "pair": [jnp.float32, jnp.bfloat16]}
  tree = jax.tree.map(lambda v, d: jnp.asarray(v * scale, d), values, dtypes)
  return tree, flat(tree)


@pytest.mark.parametrize("scale", [1.0, 1e20, 1e-20, 1e30, 1e-30, 1e37])
def test_global_norm_and_unit_vector_are_exact_at_any_scale(scale):
  # Unscaled, the float32 sum of squares overflows above ~1e19 and flushes
  # to zero below ~1e-19: the norm was inf or 0 and the unit vector zeros.
  tree, values = _scaled_tree(scale)
  want = np.linalg.norm(values)  # float64
  np.testing.assert_allclose(float(_tree.global_norm(tree)), want, rtol=1e-6)
  unit, norm = jax.jit(_tree.safe_normalize)(tree)
  np.testing.assert_allclose(float(norm), want, rtol=1e-6)
  for got, x in zip(jax.tree.leaves(unit), jax.tree.leaves(tree)):
    assert got.dtype == x.dtype
    np.testing.assert_allclose(
        np.asarray(got, np.float64), np.asarray(x, np.float64) / want,
        rtol=0, atol=float(jnp.finfo(x.dtype).eps))


def test_a_norm_beyond_float32_is_inf_and_its_unit_vector_is_exact():
  big = np.float32(3e38)
  tree = {"w": jnp.full((4,), big), "b": jnp.array([-big, 1.0])}
  unit, norm = _tree.safe_normalize(tree)
  assert float(norm) == np.inf  # ||tree|| = 6.7e38
  np.testing.assert_allclose(flat(unit), flat(tree) / np.linalg.norm(
      flat(tree)), rtol=0, atol=1e-7)


@pytest.mark.parametrize("value", [0.0, np.nan, np.inf])
def test_unusable_trees_still_give_zeros(value):
  tree = {"w": jnp.array([value, 0.0]), "b": jnp.zeros(3)}
  unit, norm = _tree.safe_normalize(tree)
  assert not bool(_tree.is_usable(norm))
  np.testing.assert_array_equal(flat(unit), 0.0)


def test_norms_reduce_leaf_by_leaf():
  # No ravel of a leaf (an all-gather when it is sharded): leafwise maxima
  # and sums, then one reduction over the stacked per-leaf parts.
  assert "reshape" not in primitives(_tree.global_norm, TREE)
  assert "reshape" not in primitives(_tree.safe_normalize, TREE)
