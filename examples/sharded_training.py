"""X-SAM on a device mesh: a jitted training step with sharded parameters.

The batch is split over the mesh's ``data`` axis and the two large kernels
over its ``model`` axis (Megatron-style: the first column-wise, the second
row-wise). ``jax.jit`` propagates those shardings through the whole step,
Hessian-vector products included: the eigenvector X-SAM keeps in its state
is sharded like the parameters, and no parameter is ever gathered onto one
device. Nothing in the step is specific to the number of devices.

On a machine without accelerators the script simulates 8 CPU devices::

  python examples/sharded_training.py --steps 20

On a multi-GPU host or a TPU slice it uses all local accelerators. On several
hosts, start the same script on every host with ``--multi-host`` (it calls
``jax.distributed.initialize()``); each host then feeds only its own slice of
the global batch.
"""

import os

# Simulated devices for CPU-only machines; it must be set before JAX starts
# and has no effect on GPU or TPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xsam_optax

# Where each parameter lives: kernels split over "model", the rest follows.
PARAM_SPECS = {
    "hidden": {"kernel": P(None, "model"), "bias": P("model")},
    "out": {"kernel": P("model", None), "bias": P()},
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=256,
                      help="global batch, split over the data axis")
  parser.add_argument("--features", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--model-parallel", type=int, default=None,
                      help="size of the model axis (default: 4, 2 or 1, "
                      "whichever divides the device count)")
  parser.add_argument("--update-every", type=int, default=5)
  parser.add_argument("--num-iters", type=int, default=4)
  parser.add_argument("--method", default="lanczos",
                      help="estimator name for xsam(method=...); "
                           "xsam names the valid ones on a bad value")
  parser.add_argument("--multi-host", action="store_true",
                      help="call jax.distributed.initialize() first")
  return parser.parse_args()


def make_mesh(model_parallel):
  n = jax.device_count()
  if model_parallel is None:
    model_parallel = next(m for m in (4, 2, 1) if n % m == 0)
  if n % model_parallel:
    raise SystemExit(f"--model-parallel {model_parallel} does not divide "
                     f"the {n} devices")
  # Auto axes: jit decides the shardings of intermediates, so the model code
  # needs no sharding annotations.
  return jax.make_mesh((n // model_parallel, model_parallel),
                       ("data", "model"), axis_types=(AxisType.Auto,) * 2)


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
  if args.multi_host:
    jax.distributed.initialize()
  mesh = make_mesh(args.model_parallel)
  param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                 PARAM_SPECS)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  tx = xsam_optax.xsam(
      optax.sgd(optax.cosine_decay_schedule(0.1, args.steps), momentum=0.9),
      rho=0.05, alpha=0.2, update_every=args.update_every,
      num_iters=args.num_iters, method=args.method)

  # Parameters and optimizer state are created already sharded (under jit
  # with out_shardings), so no device ever holds a whole model-sharded
  # kernel. optax.tree_map_params gives every params-like tree in the state
  # (X-SAM's eigenvector, the momentum) the parameters' shardings.
  params = jax.jit(init_params, static_argnums=(1, 2, 3),
                   out_shardings=param_shardings)(
                       jax.random.PRNGKey(0), args.features, args.hidden,
                       args.classes)
  state_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
      param_shardings, transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    batch_loss = lambda p: loss_fn(p, batch)
    loss, grads = jax.value_and_grad(batch_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   grad_fn=jax.grad(batch_loss))
    return optax.apply_updates(params, updates), opt_state, loss

  # Each process builds only its own rows of the global batch.
  per_process = args.batch_size // jax.process_count()
  next_batch = make_data(jax.process_index(), per_process, args.features,
                         args.classes)
  print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), "
        f"mesh: {dict(mesh.shape)}")
  for step in range(args.steps):
    batch = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(data_sharding, a),
        next_batch(step))
    params, opt_state, loss = train_step(params, opt_state, batch)
    print(f"step {step:3d}  loss {float(loss):.4f}  "
          f"eigenvalue {float(optax.tree.get(opt_state, 'eigenvalue')):.4f}  "
          f"cos(g, v) {float(optax.tree.get(opt_state, 'cos_angle')):+.4f}")

  eigenvector = optax.tree.get(opt_state, "eigenvector")
  same = all(v.sharding.is_equivalent_to(p.sharding, p.ndim)
             for v, p in zip(jax.tree.leaves(eigenvector),
                             jax.tree.leaves(params)))
  kernel = eigenvector["hidden"]["kernel"]
  print(f"eigenvector sharded like the parameters: {same}; hidden kernel "
        f"{kernel.shape} as {kernel.sharding.spec}, per-device block "
        f"{kernel.addressable_shards[0].data.shape}")


if __name__ == "__main__":
  main()
