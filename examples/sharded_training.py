"""X-SAM on a device mesh: a jitted training step with sharded parameters.

The batch is split over the mesh's ``data`` axis and the two large kernels
over its ``model`` axis (Megatron-style: the first column-wise, the second
row-wise). ``jax.jit`` propagates those shardings through the whole step,
Hessian-vector products included: the eigenvector X-SAM keeps in its state
is sharded like the parameters, and no parameter is ever gathered onto one
device. Nothing in the step is specific to the number of devices or hosts.

On a machine without accelerators the script simulates 8 CPU devices::

  python examples/sharded_training.py --steps 20

On a multi-GPU host or a TPU slice it uses all local accelerators.

Several hosts, simulated on this machine: ``--processes 2`` starts two
processes with two CPU devices each, which form one job over 127.0.0.1
(``local_processes.py``); ``--check`` compares the result with one device on
the whole batch and fails beyond float32 rounding noise::

  python examples/sharded_training.py --processes 2 --steps 10 --check

On a real cluster, start the same script on every host with ``--multi-host``:
``jax.distributed.initialize()`` finds the coordinator on SLURM, Open MPI,
Kubernetes and Cloud TPU; elsewhere add ``--coordinator HOST:PORT
--num-processes N --process-id I``. Each process feeds only its own rows of
the global batch. With ``--checkpoint-dir`` (a directory every host can
write) the sharded state is saved with Orbax every ``--checkpoint-every``
steps and at the end, every process writing its own shards; started again
with the same directory, the job resumes from the latest checkpoint.
"""

import os

# Simulated devices for CPU-only machines; it must be set before JAX starts
# and has no effect on GPU or TPU devices.
if "--xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
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
                      "whichever divides the devices of one process)")
  parser.add_argument("--update-every", type=int, default=5)
  parser.add_argument("--num-iters", type=int, default=4)
  parser.add_argument("--method", default="lanczos",
                      help="estimator name for xsam(method=...); "
                           "xsam names the valid ones on a bad value")
  parser.add_argument("--sam-groups", type=int, default=1,
                      help="perturb this many equal groups of the global batch "
                           "each along its own gradient (xsam_optax."
                           "grouped_grad_fn); a multiple of the data axis "
                           "puts whole groups on each device. Default 1: one "
                           "global perturbation")
  parser.add_argument("--check", action="store_true",
                      help="compare with one device on the whole batch; "
                      "exit with 1 beyond float32 rounding noise")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="save the state here with Orbax and resume from "
                      "the latest checkpoint found there")
  parser.add_argument("--checkpoint-every", type=int, default=0,
                      help="steps between checkpoints (0: only at the end)")
  local = parser.add_argument_group("several processes on this machine")
  local.add_argument("--processes", type=int, default=None,
                     help="start this many local processes (CPU, loopback)")
  local.add_argument("--devices-per-process", type=int, default=2)
  local.add_argument("--timeout", type=float, default=600.0,
                     help="seconds for the whole local job")
  hosts = parser.add_argument_group("one process of a multi-host job")
  hosts.add_argument("--multi-host", action="store_true",
                     help="call jax.distributed.initialize() first")
  hosts.add_argument("--coordinator", default=None,
                     help="HOST:PORT of process 0 (default: detected)")
  hosts.add_argument("--num-processes", type=int, default=None)
  hosts.add_argument("--process-id", type=int, default=None)
  hosts.add_argument("--init-timeout", type=int, default=300,
                     help="seconds to wait for all processes to connect")
  args = parser.parse_args()
  for name in ("steps", "batch_size", "features", "hidden", "classes",
               "update_every", "num_iters", "processes",
               "devices_per_process", "init_timeout"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  if args.checkpoint_every < 0:
    parser.error("--checkpoint-every must be >= 0, got "
                 f"{args.checkpoint_every}")
  return args


def initialize_distributed(args):
  """Joins the multi-host job: after this, jax.devices() spans all hosts."""
  # Cross-process collectives of the CPU backend (the local simulation);
  # GPUs and TPUs use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.coordinator is None:  # SLURM, Open MPI, Kubernetes, Cloud TPU
    jax.distributed.initialize(initialization_timeout=args.init_timeout)
  else:
    # Process 0 serves on the coordinator's address only (JAX's default
    # binds every interface).
    jax.distributed.initialize(
        args.coordinator, args.num_processes, args.process_id,
        initialization_timeout=args.init_timeout,
        coordinator_bind_address=args.coordinator)


def make_mesh(model_parallel):
  local = jax.local_device_count()
  if model_parallel is None:
    model_parallel = next(m for m in (4, 2, 1) if local % m == 0)
  # The model axis stays within one process (on a cluster: the fast links
  # inside a host); the data axis spans the processes.
  if local % model_parallel:
    raise SystemExit(f"--model-parallel {model_parallel} does not divide "
                     f"the {local} devices of a process")
  # Auto axes: jit decides the shardings of intermediates, so the model code
  # needs no sharding annotations.
  return jax.make_mesh((jax.device_count() // model_parallel, model_parallel),
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
  """Synthetic classification: labels from a fixed random linear teacher.

  ``batch(step, rows)`` is the slice ``rows`` of the global batch of
  ``step``, the same on every process. (Synthetic data is drawn whole and
  sliced; a real input pipeline reads only the rows it is asked for.)
  """
  teacher = np.random.default_rng(seed).normal(
      size=(features, classes)).astype(np.float32)

  def batch(step, rows=slice(None)):
    x = np.random.default_rng([seed, step]).normal(
        size=(batch_size, features)).astype(np.float32)[rows]
    return x, np.argmax(x @ teacher, axis=1).astype(np.int32)

  return batch


def process_rows(data_sharding, batch_size):
  """The rows of the global batch that this process's devices hold."""
  blocks = [range(batch_size)[index[0]] for index in
            data_sharding.addressable_devices_indices_map(
                (batch_size,)).values()]
  return slice(min(b.start for b in blocks), max(b.stop for b in blocks))


def open_checkpoints(directory):
  import orbax.checkpoint as ocp  # the test extra; only needed here
  if "://" not in directory:  # Orbax wants absolute local paths
    directory = os.path.abspath(directory)
  return ocp.CheckpointManager(directory)


def save(manager, step, params, opt_state):
  import orbax.checkpoint as ocp
  # Every process calls it and writes the shards it holds (asynchronously).
  manager.save(step, args=ocp.args.StandardSave(
      {"params": params, "opt_state": opt_state}))


def restore_latest(manager, abstract, shardings):
  """(step, state) of the latest checkpoint, or (None, None) if there is none.

  ``abstract`` gives shapes and dtypes (``jax.eval_shape``), ``shardings``
  where each array goes: every process reads only its own shards, and
  nothing is initialised only to be overwritten.
  """
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  if step is None:
    return None, None
  target = jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                               sharding=sharding),
      abstract, shardings)
  params, opt_state = target
  restored = manager.restore(step, args=ocp.args.StandardRestore(
      {"params": params, "opt_state": opt_state}))
  return step, (restored["params"], restored["opt_state"])


# ---------------------------------------------------------------------------
# --check: the same training on one device, on the whole batch.

NUM_REORDERINGS = 3  # single-device runs with summation orders changed
NOISE_FACTOR = 10.0
EPS = float(np.finfo(np.float32).eps)


def one_device_run(args, train_step, next_batch, initial, tx, seed=None):
  """Final params and eigenvector and every step's eigenvalue, on one device.

  Starts from ``initial``, the (params, opt_state) of the sharded run before
  its first step, as NumPy arrays. With ``seed``, the same run with its
  float32 sums taken in another order: the batch rows and the hidden units
  are permuted (an exact symmetry of the model, applied to the parameters, to
  every params-like tree in the state and to every batch, and undone on the
  results).
  """
  device = jax.local_devices()[0]
  params, opt_state = initial
  rows = slice(None)
  if seed is not None:
    rng = np.random.default_rng(seed)
    units = rng.permutation(args.hidden)
    # Rows permuted within each group: the groups stay the same sets.
    size = args.batch_size // args.sam_groups
    rows = np.concatenate([g * size + rng.permutation(size)
                           for g in range(args.sam_groups)])
    permute = unit_permutation(units)
    params = jax.tree.map(lambda f, x: f(x), permute, params)
    opt_state = optax.tree_map_params(tx, lambda x, f: f(x), opt_state,
                                      permute)
  params, opt_state = jax.device_put((params, opt_state), device)
  eigenvalues = []
  for step in range(args.steps):
    batch = jax.device_put(
        jax.tree.map(lambda a: a[rows], next_batch(step)), device)
    params, opt_state, _ = train_step(params, opt_state, batch)
    eigenvalues.append(float(optax.tree.get(opt_state, "eigenvalue")))
  eigenvector = optax.tree.get(opt_state, "eigenvector")
  if seed is not None:
    undo = unit_permutation(np.argsort(units))
    params, eigenvector = (jax.tree.map(lambda f, x: f(x), undo, tree)
                           for tree in (params, eigenvector))
  return {"params": params, "eigenvector": eigenvector,
          "eigenvalues": eigenvalues}


def unit_permutation(units):
  """Per-leaf functions that reorder the hidden units (a tree like params)."""
  return {
      "hidden": {"kernel": lambda a: a[:, units], "bias": lambda a: a[units]},
      "out": {"kernel": lambda a: a[units], "bias": lambda a: a},
  }


def rel_diff(got, want):
  got = [np.asarray(x, np.float64) for x in jax.tree.leaves(got)]
  want = [np.asarray(x, np.float64) for x in jax.tree.leaves(want)]
  num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(got, want)) ** 0.5
  den = sum(float(np.sum(b ** 2)) for b in want) ** 0.5
  return num / max(den, 1e-30)


def differences(run, reference, first_step):
  """Relative differences: final params, final eigenvector (up to sign, as an
  eigenvector is defined), largest over the steps for the eigenvalue."""
  vector, ref_vector = run["eigenvector"], reference["eigenvector"]
  return {
      "params": rel_diff(run["params"], reference["params"]),
      "eigenvector": min(rel_diff(vector, ref_vector),
                         rel_diff(jax.tree.map(np.negative, vector),
                                  ref_vector)),
      "eigenvalue": max(
          abs(a - b) / abs(b) for a, b in zip(
              run["eigenvalues"], reference["eigenvalues"][first_step:])),
  }


def check_against_one_device(args, tx, train_step, next_batch, initial,
                             params, opt_state, eigenvalues, first_step):
  """Process 0: the largest relative difference to one device, and whether
  it is within float32 rounding noise.

  The noise is measured, not assumed: the single-device run is repeated
  ``NUM_REORDERINGS`` times with its batch rows and hidden units permuted,
  which changes the order of every sum in the step (batch means, matrix
  products, inner products) and nothing else; this is what sharding does to
  the sums too. The bound is ``NOISE_FACTOR`` times the largest of those
  differences, per quantity (one float32 epsilon where they are all 0):
  rounding differences vary by a few times from one order to another, while
  a sharding or averaging error (say, a process feeding the wrong rows)
  differs by orders of magnitude more.

  Returns:
    True on processes other than 0; on process 0, whether the run passed.
  """
  # Collective: every process takes part; then each holds whole arrays.
  initial, final = multihost_utils.process_allgather(
      (initial, {"params": params,
                 "eigenvector": optax.tree.get(opt_state, "eigenvector")}),
      tiled=True)
  if jax.process_index() != 0:
    return True
  run = {**final, "eigenvalues": eigenvalues}
  reference = one_device_run(args, train_step, next_batch, initial, tx)
  got = differences(run, reference, first_step)
  noise = {name: 0.0 for name in got}
  for seed in range(1, NUM_REORDERINGS + 1):
    reordered = differences(
        one_device_run(args, train_step, next_batch, initial, tx, seed),
        reference, first_step)
    noise = {name: max(noise[name], reordered[name]) for name in noise}
  # Exactly equal reorderings (possible for a scalar) leave one float32
  # epsilon of rounding as the noise.
  bound = {name: NOISE_FACTOR * (noise[name] or EPS) for name in noise}
  ok = all(got[name] <= bound[name] for name in got)
  print("relative difference to one device on the whole batch: "
        + ", ".join(f"{name} {value:.2e}" for name, value in got.items()))
  print(f"float32 rounding noise (largest of {NUM_REORDERINGS} reordered "
        "one-device runs): "
        + ", ".join(f"{name} {value:.2e}" for name, value in noise.items()))
  print(f"bound ({NOISE_FACTOR:g} x noise): "
        + ", ".join(f"{name} {value:.2e}" for name, value in bound.items()))
  print(f"largest relative difference {max(got.values()):.2e}: "
        + ("within float32 noise" if ok else "BEYOND float32 noise"))
  return ok


def main():
  args = parse_args()
  if args.processes and not args.multi_host:
    import local_processes  # beside this file
    # The same command runs in every process, which gets its coordinates
    # appended (and ignores --processes).
    sys.exit(local_processes.run(
        sys.argv, args.processes,
        devices_per_process=args.devices_per_process, timeout=args.timeout))
  if args.multi_host:
    initialize_distributed(args)
  log = print if jax.process_index() == 0 else lambda *_, **__: None
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
  key, sizes = jax.random.PRNGKey(0), (args.features, args.hidden,
                                       args.classes)
  abstract_params = jax.eval_shape(lambda k: init_params(k, *sizes), key)
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  state_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state, param_shardings,
      transform_non_params=lambda _: replicated)

  def init():
    params = jax.jit(init_params, static_argnums=(1, 2, 3),
                     out_shardings=param_shardings)(key, *sizes)
    return params, jax.jit(tx.init, out_shardings=state_shardings)(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    batch_loss = lambda p: loss_fn(p, batch)
    if args.sam_groups == 1:
      loss, grads = jax.value_and_grad(batch_loss)(params)
      grad_fn = jax.grad(batch_loss)
    else:  # Each group's SAM point from its own rows: no collective first.
      grad_fn = xsam_optax.grouped_grad_fn(loss_fn, batch, args.sam_groups)
      loss, grads = batch_loss(params), grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state, loss

  checkpoints, start = None, None
  if args.checkpoint_dir:
    checkpoints = open_checkpoints(args.checkpoint_dir)
    start, restored = restore_latest(
        checkpoints, (abstract_params, abstract_state),
        (param_shardings, state_shardings))
  if start is None:
    start, (params, opt_state) = 0, init()
  else:
    params, opt_state = restored
  log(f"processes: {jax.process_count()}, devices: {jax.device_count()} "
      f"({jax.devices()[0].platform}), mesh: {dict(mesh.shape)}"
      + (f", resumed at step {start}" if start else ""))

  next_batch = make_data(0, args.batch_size, args.features, args.classes)
  # This process feeds only the rows its own devices hold.
  rows = process_rows(data_sharding, args.batch_size)
  eigenvalues = []
  for step in range(start, args.steps):
    batch = jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(
            data_sharding, a, (args.batch_size,) + a.shape[1:]),
        next_batch(step, rows))
    params, opt_state, loss = train_step(params, opt_state, batch)
    eigenvalues.append(float(optax.tree.get(opt_state, "eigenvalue")))
    log(f"step {step:3d}  loss {float(loss):.4f}  "
        f"eigenvalue {eigenvalues[-1]:.4f}  "
        f"cos(g, v) {float(optax.tree.get(opt_state, 'cos_angle')):+.4f}")
    done = step + 1
    if checkpoints and (done == args.steps or (
        args.checkpoint_every and done % args.checkpoint_every == 0)):
      save(checkpoints, done, params, opt_state)

  eigenvector = optax.tree.get(opt_state, "eigenvector")
  same = all(v.sharding.is_equivalent_to(p.sharding, p.ndim)
             for v, p in zip(jax.tree.leaves(eigenvector),
                             jax.tree.leaves(params)))
  kernel = eigenvector["hidden"]["kernel"]
  log(f"eigenvector sharded like the parameters: {same}; hidden kernel "
      f"{kernel.shape} as {kernel.sharding.spec}, per-device block "
      f"{kernel.addressable_shards[0].data.shape}")

  ok = True
  if args.check:
    # The one-device run starts where this run started (step 0).
    ok = check_against_one_device(args, tx, train_step, next_batch, init(),
                                  params, opt_state, eigenvalues, start)
  if checkpoints:
    checkpoints.wait_until_finished()
    checkpoints.close()
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
