"""Leafwise pytree arithmetic where optax's would not do (``_tree``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
