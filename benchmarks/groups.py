"""Per-group perturbations: what they cost in FLOPs and in collectives.

Two measurements, no timing:

* ``flops``: XLA's FLOP count (``cost_analysis()["flops"]`` of the compiled
  program) of a training step on the MNIST-1D CNN (batch 128), SAM and X-SAM
  (power, one product; both refresh paths), with one global perturbation and
  with the batch as 4 groups of 32 (:func:`xsam_optax.grouped_grad_fn`): the
  step the guide writes (incoming gradient ``grad_fn(params)``) and
  ``xsam-train``'s step.
* ``collectives``: on 8 simulated CPU devices (a fresh process with
  ``--xla_force_host_platform_device_count=8``), a ``jax.jit`` step of SAM
  and of X-SAM on a tanh MLP whose batch is sharded over a 1-D ``data`` mesh
  and whose parameters are replicated: the ``all-reduce`` instructions of
  the compiled program that computes the SAM points (the global point, or
  the 8 groups' points stacked, one group per device), and of the whole
  step. The global point needs the whole batch's gradient, summed across
  devices; a group's point needs its own device's gradient only.

Example (shell)::

  python benchmarks/groups.py --out /tmp/groups.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

DEVICES = 8
COLLECTIVE = re.compile(r"[\s)}](all-reduce|all-gather|reduce-scatter|all-to-all|"
                        r"collective-permute)(-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions of an HLO module's text, by kind (``-start``/``-done`` once).

  Example:
    >>> count_collectives("%all-reduce.1 = f32[] all-reduce(f32[] %x), to_apply=%add\\n"
    ...                   "%b = (f32[2]{0}, f32[]) all-reduce-start(f32[2] %y, f32[] %z)\\n"
    ...                   "%c = (f32[2]{0}, f32[]) all-reduce-done(%b)")
    {'all-reduce': 2}
  """
  counts: dict[str, int] = {}
  for match in COLLECTIVE.finditer(hlo_text):
    counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def flops() -> dict[str, dict[str, float]]:
  """FLOPs of compiled steps on the MNIST-1D CNN, by (optimizer, groups, refresh).

  ``user_step``: the step the guide writes, the incoming gradient being
  ``grad_fn(params)`` (BatchNorm in training mode, running statistics
  dropped). ``xsam_train_step``: ``xsam-train``'s step, which also takes its
  loss, metrics and running statistics from a whole-batch pass.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import xsam_optax  # pylint: disable=g-import-not-at-top
  from xsam_optax.train import data, loop, models, optimizers  # pylint: disable=g-import-not-at-top

  dataset = data.load_dataset("mnist1d")
  x, y = np.asarray(dataset.x_train[:128]), np.asarray(dataset.y_train[:128])
  model = models.make_model("cnn", num_classes=dataset.num_classes)
  train_loss = loop.make_train_loss(model)
  out = {"user_step": {}, "xsam_train_step": {}}
  for name in ("sam", "xsam"):
    for groups in (1, 4):
      opt = optimizers.make_optimizer(name, learning_rate=0.1, sam_groups=groups)
      state = loop.init_state(model, opt.tx, x, seed=0)
      refreshes = (None,) if opt.refresh_every is None else (True, False)

      def user_step(params, opt_state, stats, xb, yb, refresh, groups=groups, tx=opt.tx):
        loss = lambda p, b: train_loss(p, stats, *b)[0]
        grad_fn = (jax.grad(lambda p: loss(p, (xb, yb))) if groups == 1
                   else xsam_optax.grouped_grad_fn(loss, (xb, yb), groups))
        extra = {} if refresh is None else {"refresh": refresh}
        return tx.update(grad_fn(params), opt_state, params, grad_fn=grad_fn, **extra)

      step = jax.jit(loop.make_train_step(model, opt.tx, sam_groups=groups),
                     static_argnames="refresh")
      for refresh in refreshes:
        key = f"{name} groups={groups} refresh={refresh}"
        out["user_step"][key] = _flops(jax.jit(user_step, static_argnums=5).lower(
            state.params, state.opt_state, state.batch_stats, x, y, refresh).compile())
        out["xsam_train_step"][key] = _flops(step.lower(state, x, y, refresh=refresh).compile())
  return out


def _mlp_problem():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  params = {"hidden": jnp.asarray(rng.normal(size=(16, 64)) / 4, jnp.float32),
            "out": jnp.asarray(rng.normal(size=(64, 4)) / 8, jnp.float32)}
  x = rng.normal(size=(256, 16)).astype(np.float32)
  batch = (jnp.asarray(x), jnp.asarray(np.argmax(x[:, :4], axis=1)))

  def loss(p, b):
    logits = jnp.tanh(b[0] @ p["hidden"]) @ p["out"]
    logp = logits - jnp.log(jnp.sum(jnp.exp(logits), axis=1, keepdims=True))
    return -jnp.mean(jnp.take_along_axis(logp, b[1][:, None], axis=1))

  return params, loss, batch


def collectives() -> dict[str, dict[str, int]]:
  """All-reduces before the SAM point and in the step, global vs one group per device."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import xsam_optax  # pylint: disable=g-import-not-at-top
  from xsam_optax import _ascent  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == DEVICES, jax.device_count()
  mesh = jax.make_mesh((DEVICES,), ("data",))
  params, loss, batch = _mlp_problem()
  params = jax.device_put(params, NamedSharding(mesh, P()))
  batch = jax.device_put(batch, NamedSharding(mesh, P("data")))

  def grad_fn_of(groups, b):
    if groups == 1:
      return jax.grad(lambda p: loss(p, b))
    return xsam_optax.grouped_grad_fn(loss, b, groups)

  def points(p, b, groups):
    # sam_ascent's own code up to the gradient at the SAM point(s).
    g = grad_fn_of(groups, b)
    point_of = lambda u: _ascent.sam_point(u, p, 0.05, False)
    if groups == 1:
      return point_of(g(p))
    return _ascent.group_sam_points(g, p, point_of)

  out = {}
  for name, make in (("sam", lambda: xsam_optax.sam(optax.sgd(0.1))),
                     ("xsam", lambda: xsam_optax.xsam(optax.sgd(0.1), update_every=1))):
    tx = make()
    state = jax.jit(tx.init)(params)
    for groups in (1, DEVICES):
      def step(p, s, b, groups=groups):
        g = grad_fn_of(groups, b)
        updates, s = tx.update(g(p), s, p, grad_fn=g)
        return optax.apply_updates(p, updates), s

      hlo = jax.jit(step).lower(params, state, batch).compile().as_text()
      key = f"{name} groups={groups}"
      out[key] = {"step": count_collectives(hlo).get("all-reduce", 0)}
      if name == "sam":
        hlo = jax.jit(points, static_argnums=2).lower(params, batch, groups).compile().as_text()
        out[key]["sam_point"] = count_collectives(hlo).get("all-reduce", 0)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--part", choices=("all", "flops", "collectives"), default="all")
  p.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")
  args = p.parse_args(argv)
  result = {}
  if args.part in ("all", "flops"):
    result["flops"] = flops()
  if args.part == "collectives":
    result["collectives"] = collectives()
  elif args.part == "all":
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join((
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={DEVICES}")).strip())
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--part", "collectives"],
                          env=env, check=True, capture_output=True, text=True)
    result["collectives"] = json.loads(done.stdout)["collectives"]
  text = json.dumps(result, indent=1, sort_keys=True)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
