"""``batch_axis_name`` under ``jax.vmap(axis_name=...)``: no devices needed.

Each of four replicas sees a quarter of the batch; with the loss a mean over
equal shards, averaging the replicas' gradients and curvature products over
the axis must give what one transform computes on the whole batch.
(``tests/test_distributed.py`` checks pmap and shard_map on simulated devices.)
"""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import xsam_optax
from _oracles import mlp_problem

SHARDS = 4


def split(batch):
  return jax.tree.map(lambda a: a.reshape((SHARDS, -1) + a.shape[1:]), batch)


@pytest.mark.parametrize("make", [
    lambda **kw: xsam_optax.eigen_sam_ascent(0.1, 0.3, update_every=2,
                                             num_iters=3, **kw),
    lambda **kw: xsam_optax.xsam(optax.sgd(0.1), update_every=2, num_iters=3,
                                 **kw),
], ids=["eigen_sam_ascent", "xsam"])
def test_mapped_replicas_equal_one_transform_on_the_whole_batch(x64, make):
  params, loss, batch = mlp_problem(n=32)
  whole = make()
  mapped = make(batch_axis_name="batch")

  def replica_step(p, state, shard):
    grad_fn = jax.grad(lambda q: loss(q, shard))
    # The caller averages the incoming gradient, as with optax.contrib.sam.
    g = jax.lax.pmean(grad_fn(p), "batch")
    updates, state = mapped.update(g, state, p, grad_fn=grad_fn)
    return optax.apply_updates(p, updates), state

  mapped_step = jax.jit(jax.vmap(replica_step, in_axes=(None, None, 0),
                                 axis_name="batch"))
  grad_fn = jax.grad(lambda q: loss(q, batch))
  whole_step = jax.jit(lambda p, s: whole.update(grad_fn(p), s, p,
                                                 grad_fn=grad_fn))
  p_mapped, s_mapped = params, mapped.init(params)
  p_whole, s_whole = params, whole.init(params)
  for _ in range(3):  # a refresh, a kept step, a warm-started refresh
    replicas = mapped_step(p_mapped, s_mapped, split(batch))
    # Every replica holds the same result: keep the first.
    chex.assert_trees_all_close(replicas, jax.tree.map(
        lambda x: jnp.broadcast_to(x[:1], x.shape), replicas), rtol=1e-13)
    p_mapped, s_mapped = jax.tree.map(lambda x: x[0], replicas)
    updates, s_whole = whole_step(p_whole, s_whole)
    p_whole = optax.apply_updates(p_whole, updates)
  chex.assert_trees_all_close((p_mapped, s_mapped), (p_whole, s_whole),
                              rtol=1e-10, atol=1e-12)
  assert float(optax.tree.get(s_whole, "eigenvalue")) != 0.0
