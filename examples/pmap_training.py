"""X-SAM data-parallel with jax.pmap: one replica per device.

Every device holds the whole model and its own slice of the batch. The step
averages the gradient over the ``batch`` axis itself (as with
``optax.contrib.sam``); with ``batch_axis_name="batch"`` X-SAM averages every
gradient and Hessian-vector product it computes from ``grad_fn`` as well, so
all replicas hold the same eigenvector, eigenvalue and parameters: those of
one device on the whole batch.

On a machine without accelerators the script simulates 8 CPU devices::

  python examples/pmap_training.py --steps 20
"""

import os

# Simulated devices for CPU-only machines; it must be set before JAX starts
# and has no effect on GPU or TPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xsam_optax

AXIS = "batch"
# Use the same axis name for every pmap whose outputs feed the step: JAX
# records it in the outputs' sharding, and arrays from a differently named
# pmap make the step compile again.
pmap = functools.partial(jax.pmap, axis_name=AXIS)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=256,
                      help="global batch over all local devices")
  parser.add_argument("--features", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--update-every", type=int, default=5)
  parser.add_argument("--num-iters", type=int, default=4)
  parser.add_argument("--method", default="lanczos",
                      help="estimator name for xsam(method=...); "
                           "xsam names the valid ones on a bad value")
  return parser.parse_args()


def init_params(key, features, hidden, classes):
  k1, k2 = jax.random.split(key)
  return {
      "hidden": {"kernel": jax.random.normal(k1, (features, hidden))
                           / np.sqrt(features),
                 "bias": jnp.zeros((hidden,))},
      "out": {"kernel": jax.random.normal(k2, (hidden, classes))
                        / np.sqrt(hidden),
              "bias": jnp.zeros((classes,))},
  }


def loss_fn(params, batch):
  x, y = batch
  h = jax.nn.gelu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = h @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_data(seed, batch_size, features, classes):
  """Synthetic classification: labels from a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(features, classes)).astype(np.float32)

  def batch(step):
    x = np.random.default_rng([seed, step]).normal(
        size=(batch_size, features)).astype(np.float32)
    return x, np.argmax(x @ teacher, axis=1).astype(np.int32)

  return batch


def main():
  args = parse_args()
  n = jax.local_device_count()
  if args.batch_size % n:
    raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of "
                     f"the {n} local devices")
  tx = xsam_optax.xsam(
      optax.sgd(optax.cosine_decay_schedule(0.1, args.steps), momentum=0.9),
      rho=0.05, alpha=0.2, update_every=args.update_every,
      num_iters=args.num_iters, method=args.method, batch_axis_name=AXIS)

  @pmap
  def train_step(params, opt_state, batch):
    batch_loss = lambda p: loss_fn(p, batch)
    loss, grads = jax.value_and_grad(batch_loss)(params)
    loss, grads = jax.lax.pmean((loss, grads), AXIS)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=jax.grad(batch_loss))
    return optax.apply_updates(params, updates), opt_state, loss

  params = init_params(jax.random.PRNGKey(0), args.features, args.hidden,
                       args.classes)
  params = pmap(lambda p: p)(
      jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), params))
  opt_state = pmap(tx.init)(params)  # same seed everywhere: same state

  next_batch = make_data(jax.process_index(), args.batch_size,
                         args.features, args.classes)
  print(f"devices: {n} ({jax.local_devices()[0].platform}), pmap over "
        f"{args.batch_size // n} examples per device")
  for step in range(args.steps):
    batch = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]),
                         next_batch(step))
    params, opt_state, loss = train_step(params, opt_state, batch)
    eigenvalue = optax.tree.get(opt_state, "eigenvalue")
    print(f"step {step:3d}  loss {float(loss[0]):.4f}  "
          f"eigenvalue {float(eigenvalue[0]):.4f}  "
          f"cos(g, v) {float(optax.tree.get(opt_state, 'cos_angle')[0]):+.4f}")

  spread = max(float(jnp.max(jnp.abs(x - x[0])))
               for x in jax.tree.leaves((params, opt_state))
               if jnp.issubdtype(x.dtype, jnp.floating))
  print(f"largest difference between replicas: {spread:.1e}")


if __name__ == "__main__":
  main()
