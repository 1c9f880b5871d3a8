"""Multi-device checks behind ``tests/test_distributed.py``.

Run as a script in a fresh process with 8 simulated CPU devices; it prints one
JSON object of measurements (relative errors, shardings, collectives found in
the compiled HLO) and the pytest side asserts on them. The rest of the suite
keeps one device, and XLA fixes the device count when JAX starts, hence the
separate process::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/distributed_checks.py

Oracle throughout: the same X-SAM step on one device, on the whole batch.
"""

import os
import sys

if __name__ == "__main__":
  if "--xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xsam_optax

NUM_DEVICES = 8
MESH_SHAPE = (2, 4)  # (data, model)
DIN, HIDDEN, CLASSES, BATCH = 10, 36, 5, 48
STEPS = 3  # with UPDATE_EVERY = 2: refresh, keep, refresh
UPDATE_EVERY = 2
NUM_ITERS = 3  # compile time grows with it; 3 products show the plumbing
METHODS = ("power", "lanczos")
SPECS = {
    "hidden": {"kernel": P(None, "model"), "bias": P("model")},
    "out": {"kernel": P("model", None), "bias": P()},
}


def make_problem():
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {
      "hidden": {"kernel": jax.random.normal(k1, (DIN, HIDDEN)) / DIN**0.5,
                 "bias": 0.1 * jax.random.normal(k2, (HIDDEN,))},
      "out": {"kernel": jax.random.normal(k3, (HIDDEN, CLASSES)) / HIDDEN**0.5,
              "bias": jnp.zeros((CLASSES,))},
  }
  x = jax.random.normal(k4, (BATCH, DIN))
  y = jax.random.randint(k5, (BATCH,), 0, CLASSES)
  return params, (x, y)


def make_loss(hidden_sharding=None, logits_sharding=None):
  """Cross-entropy of a tanh MLP; the shardings are for explicit meshes only."""

  def loss(p, batch):
    x, y = batch
    h = jnp.dot(x, p["hidden"]["kernel"], out_sharding=hidden_sharding)
    h = jnp.tanh(h + p["hidden"]["bias"])
    logits = jnp.dot(h, p["out"]["kernel"], out_sharding=logits_sharding)
    logits = logits + p["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def make_tx(method, batch_axis_name=None):
  return xsam_optax.xsam(
      optax.sgd(0.1, momentum=0.9), rho=0.05, alpha=0.2,
      update_every=UPDATE_EVERY, num_iters=NUM_ITERS, method=method,
      batch_axis_name=batch_axis_name)


def make_step(loss, tx, batch_axis_name=None):
  """The training step users write; with an axis name, a pmap body."""

  def step(params, state, batch):
    loss_fn = lambda p: loss(p, batch)
    value, grads = jax.value_and_grad(loss_fn)(params)
    if batch_axis_name is not None:
      # As with optax.contrib.sam, the caller averages the incoming gradient.
      value, grads = jax.lax.pmean((value, grads), batch_axis_name)
    updates, state = tx.update(grads, state, params,
                               grad_fn=jax.grad(loss_fn))
    return optax.apply_updates(params, updates), state, value, updates

  return step


def diagnostics(state):
  return {name: optax.tree.get(state, name)
          for name in ("eigenvector", "eigenvalue", "cos_angle")}


_COMPILES = []  # filled by a listener that main() registers


def _count_compile(event, *_, **__):
  if event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


def run_steps(step, params, state, batch):
  """``STEPS`` steps: per-step updates and diagnostics, params, state, and
  how many XLA compilations the steps after the first one triggered."""
  trace = []
  for i in range(STEPS):
    if i == 1:
      compiles_before = len(_COMPILES)
    params, state, value, updates = step(params, state, batch)
    trace.append({"updates": updates, "loss": value, **diagnostics(state)})
  jax.block_until_ready(trace)
  return trace, params, state, len(_COMPILES) - compiles_before


def to_numpy(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def rel_err(got, want):
  got, want = to_numpy(got), to_numpy(want)
  num = sum(float(np.sum((a - b) ** 2)) for a, b in zip(got, want)) ** 0.5
  den = sum(float(np.sum(b**2)) for b in want) ** 0.5
  return num / max(den, 1e-30)


def rel_err_up_to_sign(got, want):
  return min(rel_err(got, want),
             rel_err(jax.tree.map(lambda x: -x, got), want))


def compare(trace, reference, params, reference_params):
  """Worst relative error over the steps, per quantity."""
  return {
      "updates": max(rel_err(t["updates"], r["updates"])
                     for t, r in zip(trace, reference)),
      "eigenvector": max(rel_err_up_to_sign(t["eigenvector"], r["eigenvector"])
                         for t, r in zip(trace, reference)),
      "eigenvalue": max(rel_err(t["eigenvalue"], r["eigenvalue"])
                        for t, r in zip(trace, reference)),
      "cos_angle": max(abs(float(t["cos_angle"]) - float(r["cos_angle"]))
                       for t, r in zip(trace, reference)),
      "loss": max(rel_err(t["loss"], r["loss"])
                  for t, r in zip(trace, reference)),
      "params": rel_err(params, reference_params),
      "eigenvalues": [float(r["eigenvalue"]) for r in reference],
  }


# ---------------------------------------------------------------------------
# Reading collectives out of compiled HLO.

_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16|c64|c128)\[([0-9,]*)\]")
_ALL_GATHER = re.compile(r"=\s*(.*?)\s+all-gather(?:-start)?\(")


def all_gather_sizes(hlo_text):
  """Element counts of every array an all-gather produces, one list per op."""
  found = []
  for line in hlo_text.splitlines():
    match = _ALL_GATHER.search(line)
    if match:
      sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
               for dims in _SHAPE.findall(match.group(1))]
      found.append(sizes)
  return found


def param_sized_gathers(hlo_text, params, specs):
  """All-gathers whose result is as large as a whole sharded parameter.

  Counted in elements, so a gather of a ravelled (1-D) copy counts too. The
  threshold is the smallest parameter that the specs shard (a bias); the
  correct steps here compile to no all-gather at all.
  """
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
  threshold = min(x.size for x, spec in zip(jax.tree.leaves(params),
                                            spec_leaves, strict=True)
                  if any(axis is not None for axis in spec))
  # A result shape the pattern cannot read counts as parameter-sized.
  return [sizes for sizes in all_gather_sizes(hlo_text)
          if max(sizes, default=threshold) >= threshold]


def same_shardings(tree, like):
  return all(x.sharding.is_equivalent_to(y.sharding, y.ndim)
             for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(like),
                             strict=True))


def describe_sharding(x):
  sharding = x.sharding
  return str(getattr(sharding, "spec", sharding))


# ---------------------------------------------------------------------------
# The checks.


def reference_runs(params, batch):
  """One device, whole batch: the oracle for every other check."""
  loss = make_loss()
  out = {}
  for method in METHODS:
    tx = make_tx(method)
    step = jax.jit(make_step(loss, tx))
    trace, new_params, _, compiles = run_steps(step, params,
                                               tx.init(params), batch)
    out[method] = trace, new_params, compiles
  return out


def check_pmap(params, batch, reference):
  """pmap over 8 per-device batches, with ``batch_axis_name``."""
  # Every pmap here names the same axis: in JAX 0.10 a pmap's outputs carry
  # its axis name in their sharding, and feeding the step arrays from a pmap
  # with another name (or none) recompiles it on the second step.
  pmap = functools.partial(jax.pmap, axis_name="batch",
                           devices=jax.devices()[:NUM_DEVICES])
  shard = lambda x: x.reshape((NUM_DEVICES, -1) + x.shape[1:])
  replicate = lambda x: jnp.broadcast_to(x, (NUM_DEVICES,) + x.shape)
  pparams, pbatch = pmap(lambda tree: tree)(
      (jax.tree.map(replicate, params), jax.tree.map(shard, batch)))
  results = {}
  for method in METHODS:
    tx = make_tx(method, batch_axis_name="batch")
    step = pmap(make_step(make_loss(), tx, "batch"))
    state = pmap(tx.init)(pparams)
    trace, new_params, _, compiles = run_steps(step, pparams, state, pbatch)
    # Every replica must hold the same numbers.
    spread = max(float(np.max(np.abs(a - a[:1])))
                 for t in trace for a in to_numpy(t))
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    trace = [first(t) for t in trace]
    ref_trace, ref_params, _ = reference[method]
    results[method] = {**compare(trace, ref_trace, first(new_params),
                                 ref_params),
                       "replica_spread": spread,
                       "compiles_after_first_step": compiles}
  return results


def check_shard_map(params, batch, reference):
  """A per-device step under jax.shard_map over a 1-D mesh.

  Under shard_map, JAX's autodiff already sums the gradient of replicated
  parameters over the mapped axis, so the loss is written as the global mean
  (``pmean`` of the shard's mean) and ``grad_fn`` returns the full-batch
  gradient with no ``batch_axis_name``.
  """
  mesh = jax.make_mesh((NUM_DEVICES,), ("batch",),
                       axis_types=(AxisType.Explicit,))
  method = "power"
  tx = make_tx(method)
  shard_loss = make_loss()
  global_loss = lambda p, b: jax.lax.pmean(shard_loss(p, b), "batch")
  step = jax.jit(jax.shard_map(
      make_step(global_loss, tx), mesh=mesh,
      in_specs=(P(), P(), P("batch")), out_specs=P()))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  batch = jax.device_put(batch, NamedSharding(mesh, P("batch")))
  # Replicated like the step's outputs, or the second step recompiles.
  state = jax.device_put(tx.init(params), replicated)
  trace, new_params, _, compiles = run_steps(step, params, state, batch)
  ref_trace, ref_params, _ = reference[method]
  return {method: {**compare(trace, ref_trace, new_params, ref_params),
                   "compiles_after_first_step": compiles}}


def sharded_inputs(mesh, params, batch):
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
  sparams = jax.device_put(params, param_shardings)
  sbatch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  return param_shardings, sparams, sbatch


def check_sharded_jit(params, batch, reference):
  """jit over a 2x4 mesh with AxisType.Auto axes (classic pjit style)."""
  mesh = jax.make_mesh(MESH_SHAPE, ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  param_shardings, sparams, sbatch = sharded_inputs(mesh, params, batch)
  results = {}
  for method in ("power",):
    tx = make_tx(method)
    # The state mirrors the params' shardings where it holds a params-like
    # tree (eigenvector, momentum) and is replicated elsewhere.
    state_shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, P()))
    state = jax.jit(tx.init, out_shardings=state_shardings)(sparams)
    # No in/out shardings: jit propagates them from the arguments. The
    # executable is called on its own outputs, so those must come back with
    # the shardings it was compiled for.
    step = jax.jit(make_step(make_loss(), tx)).lower(
        sparams, state, sbatch).compile()
    hlo = step.as_text()
    trace, new_params, new_state, compiles = run_steps(step, sparams, state,
                                                       sbatch)
    ref_trace, ref_params, _ = reference[method]
    eigenvector = optax.tree.get(new_state, "eigenvector")
    results[method] = {
        **compare(trace, ref_trace, new_params, ref_params),
        "eigenvector_sharding_matches": same_shardings(eigenvector, sparams),
        "compiles_after_first_step": compiles,
        "eigenvector_shardings": jax.tree.map(describe_sharding, eigenvector),
        "param_shardings": jax.tree.map(describe_sharding, sparams),
        "all_gathers": all_gather_sizes(hlo),
        "param_sized_all_gathers": param_sized_gathers(hlo, params, SPECS),
    }
  return results


def check_all_gather_detection(params, batch):
  """Control: the HLO check must see the gathers that ravelling causes."""
  mesh = jax.make_mesh(MESH_SHAPE, ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  _, sparams, sbatch = sharded_inputs(mesh, params, batch)
  loss = make_loss()

  def pytree_estimate(p, v0, b):
    matvec = lambda v: xsam_optax.hvp(jax.grad(lambda q: loss(q, b)), p, v)
    return xsam_optax.power_iteration(matvec, v0, num_iters=2).eigenvector

  def ravelled_estimate(p, v0, b):
    flat_v0, unravel = ravel_pytree(v0)
    grad_fn = jax.grad(lambda q: loss(q, b))
    matvec = lambda f: ravel_pytree(xsam_optax.hvp(grad_fn, p, unravel(f)))[0]
    return unravel(xsam_optax.power_iteration(
        matvec, flat_v0, num_iters=2).eigenvector)

  out = {}
  for name, fn in (("pytree", pytree_estimate),
                   ("ravelled", ravelled_estimate)):
    hlo = jax.jit(fn).lower(sparams, sparams, sbatch).compile().as_text()
    out[name] = {"all_gathers": all_gather_sizes(hlo),
                 "param_sized_all_gathers": param_sized_gathers(
                     hlo, params, SPECS)}
  return out


def check_explicit_mesh(params, batch, reference):
  """jit over a 2x4 mesh with AxisType.Explicit axes (sharding in types)."""
  mesh = jax.make_mesh(MESH_SHAPE, ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2)
  results = {}
  with jax.set_mesh(mesh):
    _, sparams, sbatch = sharded_inputs(mesh, params, batch)
    loss = make_loss(hidden_sharding=P("data", "model"),
                     logits_sharding=P("data", None))
    # Lanczos: its basis and reorthogonalisation are the parts that must
    # keep the parameters' shardings as types.
    for method in ("lanczos",):
      tx = make_tx(method)
      state = jax.jit(tx.init)(sparams)  # no out_shardings: types carry it
      init_eigenvector = optax.tree.get(state, "eigenvector")
      step = jax.jit(make_step(loss, tx)).lower(sparams, state,
                                                sbatch).compile()
      hlo = step.as_text()
      trace, new_params, new_state, compiles = run_steps(step, sparams,
                                                         state, sbatch)
      ref_trace, ref_params, _ = reference[method]
      eigenvector = optax.tree.get(new_state, "eigenvector")
      results[method] = {
          **compare(trace, ref_trace, new_params, ref_params),
          "init_eigenvector_sharding_matches": same_shardings(
              init_eigenvector, sparams),
          "eigenvector_sharding_matches": same_shardings(eigenvector,
                                                         sparams),
          "compiles_after_first_step": compiles,
          "eigenvector_shardings": jax.tree.map(describe_sharding,
                                                eigenvector),
          "all_gathers": all_gather_sizes(hlo),
          "param_sized_all_gathers": param_sized_gathers(hlo, params, SPECS),
      }
  return results


class Timer:
  """Wall and CPU seconds of a block, for the JSON (compile time dominates)."""

  def __enter__(self):
    self.start = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    wall, cpu = time.perf_counter(), time.process_time()
    self.seconds = {"wall": round(wall - self.start[0], 2),
                    "cpu": round(cpu - self.start[1], 2)}


# ---------------------------------------------------------------------------
# Per-group perturbations: one group per device.

_ALL_REDUCE = re.compile(r"[\s)}]all-reduce(?:-start)?\(")


def make_grouped_step(loss, tx, batch_axis_name=None):
  """X-SAM with NUM_DEVICES groups: grouped_grad_fn, or under pmap the local batch.

  Under pmap each device's batch is one group: the incoming gradient is the
  local one (not averaged), so the SAM point is the device's own, and the
  transform averages the gradients at the points over ``batch_axis_name``.
  """

  def step(params, state, batch):
    if batch_axis_name is None:
      grad_fn = xsam_optax.grouped_grad_fn(loss, batch, NUM_DEVICES)
      value, grads = loss(params, batch), grad_fn(params)
    else:
      grad_fn = jax.grad(lambda p: loss(p, batch))
      value, grads = jax.value_and_grad(loss)(params, batch)
      value = jax.lax.pmean(value, batch_axis_name)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, value, updates

  return step


def sam_point_all_reduces(params, batch, groups):
  """All-reduces in the compiled program of sam_ascent's SAM point(s)."""
  from xsam_optax import _ascent  # pylint: disable=g-import-not-at-top

  def points(p, b):
    point_of = lambda u: _ascent.sam_point(u, p, 0.05, False)
    if groups == 1:
      return point_of(jax.grad(make_loss())(p, b))
    grad_fn = xsam_optax.grouped_grad_fn(make_loss(), b, groups)
    return _ascent.group_sam_points(grad_fn, p, point_of)

  hlo = jax.jit(points).lower(params, batch).compile().as_text()
  return len(_ALL_REDUCE.findall(hlo))


def check_groups(params, batch):
  """One group per device (sharded jit, pmap) against one device computing the groups."""
  tx = make_tx("power")
  loss = make_loss()
  trace, ref_params, _, _ = run_steps(jax.jit(make_grouped_step(loss, tx)), params,
                                   tx.init(params), batch)
  global_trace, _, _, _ = run_steps(jax.jit(make_step(loss, tx)), params,
                                 tx.init(params), batch)
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sparams = jax.device_put(params, NamedSharding(mesh, P()))
    sbatch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    sharded = run_steps(jax.jit(make_grouped_step(loss, tx)), sparams,
                        jax.jit(tx.init)(sparams), sbatch)
    reduces = {groups: sam_point_all_reduces(sparams, sbatch, groups)
               for groups in (1, NUM_DEVICES)}
  pmap = functools.partial(jax.pmap, axis_name="batch",
                           devices=jax.devices()[:NUM_DEVICES])
  pparams, pbatch = pmap(lambda tree: tree)((
      jax.tree.map(lambda x: jnp.broadcast_to(x, (NUM_DEVICES,) + x.shape), params),
      jax.tree.map(lambda x: x.reshape((NUM_DEVICES, -1) + x.shape[1:]), batch)))
  ptx = make_tx("power", batch_axis_name="batch")
  ptrace, pnew, _, _ = run_steps(pmap(make_grouped_step(loss, ptx, "batch")), pparams,
                                 pmap(ptx.init)(pparams), pbatch)
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)
  return {
      "sharded_jit": {**compare(sharded[0], trace, sharded[1], ref_params),
                      "compiles_after_first_step": sharded[3]},
      "pmap": {**compare([first(t) for t in ptrace], trace, first(pnew), ref_params),
               "replica_spread": max(float(np.max(np.abs(a - a[:1])))
                                     for t in ptrace for a in to_numpy(t))},
      # Control: the groups change the update (the comparison is not vacuous).
      "grouped_vs_global_updates": max(rel_err(t["updates"], g["updates"])
                                       for t, g in zip(trace, global_trace)),
      "sam_point_all_reduces": {"global": reduces[1], "grouped": reduces[NUM_DEVICES]},
  }


def main():
  if jax.device_count() < NUM_DEVICES:
    raise SystemExit(f"need {NUM_DEVICES} devices, have {jax.devices()}; "
                     "set XLA_FLAGS=--xla_force_host_platform_device_count=8")
  jax.monitoring.register_event_duration_secs_listener(_count_compile)
  with Timer() as timer:
    params, batch = make_problem()
    reference = reference_runs(params, batch)
  results = {
      "device_count": jax.device_count(),
      "reference_compiles_after_first_step": {
          method: reference[method][2] for method in METHODS},
      "seconds": {"reference": timer.seconds},
  }
  checks = {
      "pmap": lambda: check_pmap(params, batch, reference),
      "shard_map": lambda: check_shard_map(params, batch, reference),
      "sharded_jit": lambda: check_sharded_jit(params, batch, reference),
      "all_gather_detection": lambda: check_all_gather_detection(params,
                                                                 batch),
      "explicit_mesh": lambda: check_explicit_mesh(params, batch, reference),
      "groups": lambda: check_groups(params, batch),
  }
  for name, check in checks.items():
    with Timer() as timer:
      results[name] = check()
    results["seconds"][name] = timer.seconds
  json.dump(results, sys.stdout, indent=1)


if __name__ == "__main__":
  main()
