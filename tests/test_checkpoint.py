"""Checkpoints and determinism.

The full training carry (parameters, the whole X-SAM optimizer state with its
eigenvector, and the data-sampling PRNG key) is saved with
orbax-checkpoint in the middle of training, restored in a fresh Python
process, and training continues there: the result must be bit-identical to
the uninterrupted run. Run as a script, this file is that fresh process.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import xsam_optax

NUM_STEPS = 7
SAVE_AFTER = 3  # mid refresh period: the next refresh is at count 4


@functools.lru_cache(maxsize=None)
def make_run(seed=0):
  """(init_carry(), jitted step) of a small X-SAM run; all randomness from seed."""
  rng = np.random.default_rng(1234)  # the data set itself is fixed
  x = jnp.asarray(rng.normal(size=(64, 3)).astype(np.float32))
  y = jnp.asarray(np.tanh(np.asarray(x) @ [1.0, -2.0, 0.5]).astype(np.float32))
  tx = xsam_optax.xsam(optax.sgd(0.05, momentum=0.9), rho=0.05, alpha=0.3,
                       update_every=2, num_iters=1, method="power",
                       seed=seed)

  def loss_fn(p, idx):
    h = jnp.tanh(x[idx] @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] - y[idx]) ** 2)

  def init_carry():
    k_params, k_data = jax.random.split(jax.random.PRNGKey(seed))
    k1, k2 = jax.random.split(k_params)
    params = {"w1": jax.random.normal(k1, (3, 5)), "b1": jnp.zeros(5),
              "w2": 0.5 * jax.random.normal(k2, (5,))}
    return {"params": params, "opt_state": tx.init(params), "key": k_data}

  @jax.jit
  def step(carry):
    key, k_batch = jax.random.split(carry["key"])
    idx = jax.random.randint(k_batch, (16,), 0, 64)  # a random mini-batch
    grad_fn = jax.grad(lambda p: loss_fn(p, idx))
    params = carry["params"]
    updates, opt_state = tx.update(grad_fn(params), carry["opt_state"],
                                   params, grad_fn=grad_fn)
    return {"params": optax.apply_updates(params, updates),
            "opt_state": opt_state, "key": key}

  return jax.jit(init_carry), step


def train(step, carry, num_steps):
  for _ in range(num_steps):
    carry = step(carry)
  return carry


def leaves_and_structure(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return [np.asarray(x) for x in leaves], str(treedef)


def assert_bit_identical(a, b):
  (la, sa), (lb, sb) = leaves_and_structure(a), leaves_and_structure(b)
  assert sa == sb
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def save_npz(path, tree):
  leaves, structure = leaves_and_structure(tree)
  np.savez(path, structure=np.asarray(structure),
           **{f"leaf{i}": x for i, x in enumerate(leaves)})


def assert_npz_bit_identical(path, tree):
  saved = np.load(path)
  leaves, structure = leaves_and_structure(tree)
  assert str(saved["structure"]) == structure
  assert len(saved.files) == len(leaves) + 1
  for i, want in enumerate(leaves):
    got = saved[f"leaf{i}"]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def fresh_process(checkpoint, resumed_out, scratch_out):
  """Restore, check the types, train on; also rerun from scratch (same seed)."""
  init_carry, step = make_run()
  abstract = jax.eval_shape(init_carry)
  carry = ocp.StandardCheckpointer().restore(checkpoint, abstract)
  assert jax.tree.structure(carry) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(abstract)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  save_npz(resumed_out, train(step, carry, NUM_STEPS - SAVE_AFTER))
  save_npz(scratch_out, train(step, init_carry(), NUM_STEPS))


def test_restore_in_fresh_process_continues_bit_identically(tmp_path):
  init_carry, step = make_run()
  uninterrupted = train(step, init_carry(), NUM_STEPS)

  middle = train(step, init_carry(), SAVE_AFTER)
  assert int(middle["opt_state"][1].count) == SAVE_AFTER
  checkpoint = os.fspath(tmp_path / "checkpoint")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(checkpoint, middle)
    checkpointer.wait_until_finished()

  resumed = os.fspath(tmp_path / "resumed.npz")
  scratch = os.fspath(tmp_path / "scratch.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, __file__, checkpoint, resumed, scratch],
                 check=True, env=env, timeout=300)
  # Params, optimizer state (eigenvector, counts, diagnostics) and data key.
  assert_npz_bit_identical(resumed, uninterrupted)
  # Same seed, another process, no checkpoint: the same run, bit for bit.
  assert_npz_bit_identical(scratch, uninterrupted)
  # The checkpoint was taken where it matters: training moved on after it,
  # through a refresh of the eigenvector.
  assert not np.array_equal(
      np.asarray(uninterrupted["params"]["w1"]),
      np.asarray(middle["params"]["w1"]))
  assert not np.array_equal(
      np.asarray(uninterrupted["opt_state"][1].eigenvector["w1"]),
      np.asarray(middle["opt_state"][1].eigenvector["w1"]))


def test_same_seed_gives_identical_runs():
  # Two runs built from scratch in this process (the fresh process above is
  # the cross-process check).
  init_carry, step = make_run(seed=0)
  first = train(step, init_carry(), NUM_STEPS)
  init_again, step_again = make_run.__wrapped__(seed=0)
  assert_bit_identical(train(step_again, init_again(), NUM_STEPS), first)


def test_xsam_seed_alone_changes_the_initial_eigenvector():
  params = {"w": jnp.ones((4,)), "b": jnp.ones((2, 3))}
  a = xsam_optax.xsam(optax.sgd(0.1), seed=0).init(params)[1]
  b = xsam_optax.xsam(optax.sgd(0.1), seed=0).init(params)[1]
  c = xsam_optax.xsam(optax.sgd(0.1), seed=1).init(params)[1]
  assert_bit_identical(a, b)
  assert not np.array_equal(np.asarray(a.eigenvector["w"]),
                            np.asarray(c.eigenvector["w"]))


if __name__ == "__main__":
  fresh_process(*sys.argv[1:4])
