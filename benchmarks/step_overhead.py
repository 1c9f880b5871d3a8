"""X-SAM's step time over SAM's, lever by lever, with eigenvector quality.

One process measures, side by side: the step time of SGD, SAM and X-SAM with
each performance lever on or off, as ratios to SAM (the issue-6 targets are
X-SAM/SAM <= 1.25 refreshing every 5 steps, <= 1.4 every 3, on a GPU
ResNet-18; <= 1.5 on CPU); the cost of a refresh in gradient-equivalents;
the quality of the eigenvector, :math:`|\\cos(v, v^*)|` at refresh steps,
with :math:`v^*` the top eigenvector of the same batch's Hessian from a
converged Lanczos; and memory.

Levers (each a row; the library's defaults, Lanczos with 4 products every 5
steps, are the first X-SAM row):

* refresh under ``lax.cond`` inside one jitted step (``refresh=None``, what the
  transform does when the host says nothing) vs **host-chosen**: two jitted
  steps, ``tx.update(..., refresh=xsam_optax.refresh_due(step, 5))``, picked
  by the Python loop;
* **Lanczos** vs power iteration, both warm-started, at 3, 4 and 5 products;
  the reference schedule (power 5) in its own rows;
* HVPs on a **sub-batch** (``curvature_fn=hessian_fn(...)``: the gradient on the
  first 1/4 or 1/2 of the mini-batch; quality is still measured against the full batch's
  Hessian);
* one power step on every step (``update_every=1``: no ``lax.cond``, the
  product spread over the steps instead of bunched in one);
* refresh every 5 and every 3 steps;
* a **Gauss-Newton** product instead of the HVP (``curvature_fn=
  xsam_optax.gauss_newton_fn(logits, cross-entropy)``); separately, one
  product's cost and how well G's converged top eigenvector matches the
  Hessian's.

Every step is the whole training step of the CLI's protocol
(``xsam_optax.train.loop``: clean ``value_and_grad``, ``tx.update`` with
``grad_fn`` of the training-mode BatchNorm loss, SGD momentum 0.9 + weight
decay 5e-4), jitted and compiled ahead of time. A variant's step time is the
time of one refresh period (``update_every`` steps: one refresh, the rest
plain) divided by ``update_every``; medians of interleaved repeats after
warm-up (see ``_common.py``). Refresh cost in gradients: for host-chosen
rows ``(refresh step - step without refresh) / gradient``, each step timed
alone; for ``lax.cond`` rows ``update_every * (X-SAM step - X-SAM step
without refresh) / gradient``. "gradient" is a jitted ``value_and_grad`` of
the training loss alone (like the anchors in XSAM.md, it times a little
slower than a whole SGD step).

Quality is measured separately (untimed) along one shared trajectory of
``--quality-steps`` steps from initialisation (the parameters of the default
X-SAM run), so the rows differ only in how they estimate ``v``: each row
keeps its own warm-started eigenvector and refreshes on its own schedule with
its own compiled step; ``v*`` is Lanczos with ``--oracle-iters`` products,
full reorthogonalisation and k=2 on the full batch at the same parameters
(its own implementation, not the library's, with the loop on the host). A
row that refreshes every step is scored every 5th step. "warm" are all
refreshes but the first (which starts from the random initial vector; JSON:
"cold"); "2nd half" the refreshes in the second half of the trajectory. On
CPU the trajectory is 300 steps (about 10 epochs of MNIST-1D's 31 batches):
along the first 60 steps alone, the rows' means moved by up to 0.1 between
two trajectories, too little data to rank estimators.

Memory: XLA's own accounting of each compiled step
(``compiled.memory_analysis()``: arguments + outputs + temporaries - aliased;
available on CPU and GPU); on GPU also the allocator's process-wide peak
(``jax.local_devices()[0].memory_stats()['peak_bytes_in_use']``), which only
grows, so it bounds the most memory-hungry step.

Configurations:

* ``--device cpu``: the training CLI's CNN (3 Conv+BatchNorm blocks, 32
  channels) on MNIST-1D, batch 128; a few minutes on 2 cores, most of it
  compilation.
* ``--device gpu``: CIFAR-style ResNet-18 (BatchNorm), batch 256 of
  synthetic 32x32x3 data, fp32, as in the anchors of XSAM.md; about 5
  minutes on one H100, most of it compilation (done in parallel threads).

Usage::

  python benchmarks/step_overhead.py --device cpu
  python benchmarks/step_overhead.py --device gpu
  python benchmarks/step_overhead.py --device cpu --smoke   # seconds-sized check

Writes ``benchmarks/results/<device>-<card or cpu>.json`` (``--json`` to
change). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
import re
import sys
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row: an optimizer and how its refresh runs."""

  name: str
  optimizer: str  # sgd | sam | xsam
  mode: str = "cond"  # cond | host (xsam only)
  method: str = "lanczos"  # the library's defaults
  num_iters: int = 4
  update_every: int = 5
  hvp_fraction: float = 1.0
  curvature: str = "hessian"  # hessian | gauss-newton (curvature_fn)

  @property
  def refresh_key(self) -> tuple:
    """What a host-chosen refresh step depends on (not the period)."""
    return (self.method, self.num_iters, self.hvp_fraction, self.curvature)

  def settings(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}


def variants(device: str) -> list[Variant]:
  x = functools.partial(Variant, optimizer="xsam")
  rows = [
      Variant("SGD", "sgd"),
      Variant("SAM", "sam"),
      x("X-SAM defaults (Lanczos 4, every 5), lax.cond"),
      x("  host-chosen refresh (refresh_due)", mode="host"),
      x("  host, Lanczos 5", mode="host", num_iters=5),
      x("  host, Lanczos 3", mode="host", num_iters=3),
      x("  host, Lanczos 4, HVPs on 1/2 batch", mode="host", hvp_fraction=0.5),
      x("  host, Lanczos 4, HVPs on 1/4 batch", mode="host", hvp_fraction=0.25),
      x("  host, Lanczos 3, HVPs on 1/4 batch", mode="host", num_iters=3,
        hvp_fraction=0.25),
      x("  host, Gauss-Newton, Lanczos 4", mode="host",
        curvature="gauss-newton"),
      x("  host, Gauss-Newton, Lanczos 3", mode="host", num_iters=3,
        curvature="gauss-newton"),
      x("reference schedule (power 5, every 5), lax.cond", method="power",
        num_iters=5),
      x("  host-chosen refresh", mode="host", method="power", num_iters=5),
      x("  host, power 4", mode="host", method="power"),
      x("  host, power 3", mode="host", method="power", num_iters=3),
      x("  host, power 5, HVPs on 1/4 batch", mode="host", method="power",
        num_iters=5, hvp_fraction=0.25),
      x("every step, power 1 (no cond needed)", method="power", num_iters=1,
        update_every=1),
      x("X-SAM every 3 (Lanczos 4), lax.cond", update_every=3),
      x("  every 3, host", mode="host", update_every=3),
      x("  every 3, host, Lanczos 3", mode="host", update_every=3,
        num_iters=3),
      x("  every 3, host, power 5 (reference)", mode="host", update_every=3,
        method="power", num_iters=5),
      x("  every 3, host, Lanczos 3, HVPs on 1/4 batch", mode="host",
        update_every=3, num_iters=3, hvp_fraction=0.25),
  ]
  if device == "gpu":  # Fewer programs, to compile within the 8 minutes.
    rows = [v for v in rows if v.name.strip() not in GPU_SKIPS]
  return rows


QUALITY_EVERY = 5  # scoring period of rows that refresh every step
GPU_SKIPS = ("host, power 4", "host, power 3",
             "host, Gauss-Newton, Lanczos 3",
             "host, power 5, HVPs on 1/4 batch",
             "every 3, host, Lanczos 3, HVPs on 1/4 batch")


CONFIGS = {
    "cpu": dict(model="cnn", data="mnist1d", batch_size=128, rounds=31,
                quality_steps=300, oracle_iters=40, num_batches=31,
                learning_rate=0.05),
    "gpu": dict(model="resnet18", data="synthetic", batch_size=256, rounds=15,
                quality_steps=40, oracle_iters=40, num_batches=5,
                learning_rate=0.05),
}
SMOKE = dict(batch_size=16, rounds=2, quality_steps=6, oracle_iters=8,
             num_batches=3)


def parse_args(argv):
  p = argparse.ArgumentParser(
      description="X-SAM step overhead vs SAM, lever by lever (issue 6).",
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--device", choices=("cpu", "gpu"), required=True)
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--rounds", type=int, default=None,
                 help="interleaved timing samples per row")
  p.add_argument("--quality-steps", type=int, default=None,
                 help="length of the shared trajectory for |cos(v, v*)|")
  p.add_argument("--oracle-iters", type=int, default=None,
                 help="Lanczos products for v*")
  p.add_argument("--only", default=None,
                 help="regex: keep only the X-SAM rows whose name matches "
                      "(SGD, SAM and the default always run)")
  p.add_argument("--no-gauss-newton", action="store_true",
                 help="skip the Gauss-Newton measurement")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes, to check the script end to end (also "
                      "runs --device gpu's model on a CPU)")
  p.add_argument("--json", default=None,
                 help="default: benchmarks/results/<device>-<card or cpu>.json")
  p.add_argument("--no-json", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # After JAX_PLATFORMS.

  if args.device == "gpu" and jax.default_backend() != "gpu" and not args.smoke:
    sys.exit(f"--device gpu: JAX's backend is {jax.default_backend()!r}; "
             "install jax[cuda12] or use --smoke to dry-run on CPU")
  config = dict(CONFIGS[args.device])
  if args.smoke:
    config.update(SMOKE)
  for key in ("batch_size", "rounds", "quality_steps", "oracle_iters"):
    if getattr(args, key) is not None:
      config[key] = getattr(args, key)
  rows = variants(args.device)
  if args.only:
    rows = [v for v in rows if v.optimizer != "xsam" or v is rows[2]
            or re.search(args.only, v.name)]
  bench = Bench(args.device, config, rows, smoke=args.smoke,
                gauss_newton=not args.no_gauss_newton)
  command = " ".join(["python"] + sys.argv)

  def write(payload):
    import _common
    path = args.json or default_json_path(args.device, payload["environment"],
                                          args.smoke)
    _common.write_json(path, dict(payload, command=command))

  bench.run(None if args.no_json else write)
  return 0


def default_json_path(device, env, smoke):
  here = os.path.dirname(os.path.abspath(__file__))
  if device == "gpu" and env["backend"] == "gpu":
    card = re.sub(r"[^a-z0-9]+", "-", env["device_kind"].lower()).strip("-")
  else:
    card = f"cpu{env['cpu_count']}"
  name = f"{device}-{card}{'-smoke' if smoke else ''}.json"
  return os.path.join(here, "results", name)


# ----------------------------------------------------------------------------
# Models and data


def resnet18(num_classes: int = 10):
  """CIFAR-style ResNet-18: 3x3 stem, no max-pool, BasicBlocks 2-2-2-2."""
  import flax.linen as nn
  import jax.numpy as jnp

  norm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
  pad = ((1, 1), (1, 1))

  class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train):
      y = nn.Conv(self.features, (3, 3), self.strides, padding=pad,
                  use_bias=False)(x)
      y = nn.relu(norm(use_running_average=not train)(y))
      y = nn.Conv(self.features, (3, 3), padding=pad, use_bias=False)(y)
      y = norm(use_running_average=not train)(y)
      if self.strides != 1 or x.shape[-1] != self.features:
        x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
        x = norm(use_running_average=not train)(x)
      return nn.relu(x + y)

  class ResNet18(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(64, (3, 3), padding=pad, use_bias=False)(x)
      x = nn.relu(norm(use_running_average=not train)(x))
      for stage, features in enumerate((64, 128, 256, 512)):
        for block in range(2):
          strides = 2 if stage > 0 and block == 0 else 1
          x = BasicBlock(features, strides)(x, train)
      x = jnp.mean(x, axis=(1, 2))
      return nn.Dense(self.num_classes)(x)

  return ResNet18(num_classes)


def make_batches(config, seed=0):
  """``num_batches`` fixed (x, y) device batches."""
  import jax
  import jax.numpy as jnp

  b, nb = config["batch_size"], config["num_batches"]
  if config["data"] == "mnist1d":
    from xsam_optax.train import data as data_lib
    ds = data_lib.load_dataset("mnist1d")
    n = min(nb, len(ds.x_train) // b)
    xs = [jnp.asarray(ds.x_train[i * b:(i + 1) * b]) for i in range(n)]
    ys = [jnp.asarray(ds.y_train[i * b:(i + 1) * b]) for i in range(n)]
    return list(zip(xs, ys)), ds.num_classes, "MNIST-1D training set"
  out = []
  for key in jax.random.split(jax.random.key(seed), nb):
    kx, ky = jax.random.split(key)
    out.append((jax.random.normal(kx, (b, 32, 32, 3)),
                jax.random.randint(ky, (b,), 0, 10)))
  return out, 10, "synthetic N(0,1) images, uniform labels"


@functools.cache
def _oracle_helpers():
  import jax
  import jax.numpy as jnp

  @jax.jit
  def set_row(basis, j, q):
    return basis.at[j].set(q)

  @jax.jit
  def orthogonalise(basis, w, q, q_prev, beta_prev):
    alpha = jnp.vdot(q, w)
    w = w - alpha * q - beta_prev * q_prev
    for _ in range(2):  # Twice is enough (Kahan-Parlett).
      w = w - basis.T @ (basis @ w)
    beta = jnp.linalg.norm(w)
    return alpha, beta, w / jnp.where(beta > 0, beta, 1.0)

  return set_row, orthogonalise


def _set_row(basis, j, q):
  return _oracle_helpers()[0](basis, j, q)


def _lanczos_orthogonalise(basis, w, q, q_prev, beta_prev):
  return _oracle_helpers()[1](basis, w, q, q_prev, beta_prev)


def gauss_newton_matvec(model, params, batch_stats, x, y, v):
  """``G v`` at ``params`` (``loop.make_gauss_newton_fn``: training-mode logits,
  mean cross-entropy; positive semi-definite)."""
  from xsam_optax.train import loop
  return loop.make_gauss_newton_fn(model, batch_stats, x, y)(params, v)


# ----------------------------------------------------------------------------
# The benchmark


class Bench:

  def __init__(self, device, config, rows, *, smoke, gauss_newton=True):
    self.device, self.config, self.rows, self.smoke = device, config, rows, smoke
    self.gauss_newton = gauss_newton

  # -- building ---------------------------------------------------------------

  def _optimizer(self, v: Variant):
    from xsam_optax.train import loop
    kw = dict(learning_rate=self.config["learning_rate"])
    if v.optimizer == "xsam":
      kw.update(update_every=v.update_every, num_iters=v.num_iters,
                method=v.method)
    return loop.make_optimizer(v.optimizer, **kw).tx

  def _step_fn(self, tx, hvp_fraction: float, curvature: str = "hessian"):
    """``loop.make_train_step`` plus the Hessian of a leading sub-batch
    or a Gauss-Newton ``curvature_fn``."""
    import jax
    import optax
    import xsam_optax
    from xsam_optax.train import loop

    model = self.model
    loss_fn = loop.make_train_loss(model)
    tx = optax.with_extra_args_support(tx)

    def train_step(state, x, y, refresh=None):
      (loss, (new_stats, _)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params, state.batch_stats, x, y)
      grad_fn = loop.make_grad_fn(model, state.batch_stats, x, y)
      extra = {} if refresh is None else {"refresh": refresh}
      if curvature == "gauss-newton":
        extra["curvature_fn"] = loop.make_gauss_newton_fn(
            model, state.batch_stats, x, y)
      if hvp_fraction < 1.0:
        n = max(2, int(round(hvp_fraction * x.shape[0])))
        extra["curvature_fn"] = xsam_optax.hessian_fn(loop.make_grad_fn(
            model, state.batch_stats, x[:n], y[:n]))
      updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                     grad_fn=grad_fn, **extra)
      params = optax.apply_updates(state.params, updates)
      return loop.TrainState(params, new_stats, opt_state,
                             state.step + 1), loss

    return train_step

  def build(self):
    import jax
    import xsam_optax
    from xsam_optax.train import loop
    from xsam_optax.train import models

    cfg = self.config
    t0 = time.perf_counter()
    self.batches, num_classes, self.data_desc = make_batches(cfg)
    self.data_s = time.perf_counter() - t0
    if cfg["model"] == "cnn":
      self.model = models.make_model("cnn", num_classes=num_classes)
      self.model_desc = ("xsam_optax.train.models.CNN: 3x (Conv k3, 32 ch, "
                         "BatchNorm, ReLU), stride 2 after the first; Dense")
    else:
      self.model = resnet18(num_classes)
      self.model_desc = "CIFAR-style ResNet-18 (BasicBlock 2-2-2-2, BatchNorm)"
    x0, y0 = self.batches[0]
    # The same initial parameters (seed 0) for every row.
    first = loop.init_state(self.model, self._optimizer(self.rows[0]), x0,
                            seed=0)
    params = first.params
    self.init_states = {}
    for v in self.rows:
      key = (v.optimizer, v.update_every, v.method, v.num_iters)
      if key not in self.init_states:
        self.init_states[key] = first._replace(
            opt_state=self._optimizer(v).init(params))
    self.param_count = int(sum(a.size for a in jax.tree.leaves(params)))
    self.param_bytes = int(sum(a.nbytes for a in jax.tree.leaves(params)))

    # Lowering is Python (sequential); compiling is XLA (parallel threads).
    lowered = {}
    sample = lambda v: (self.init_state(v), x0, y0)
    loss_fn = loop.make_train_loss(self.model)
    st = self.init_state(self.rows[0])
    lowered["gradient"] = jax.jit(
        lambda p, s, x, y: jax.value_and_grad(loss_fn, has_aux=True)(
            p, s, x, y)).lower(st.params, st.batch_stats, x0, y0)
    for frac in (1.0, 0.25):
      n = max(2, int(round(frac * x0.shape[0])))

      def one_hvp(p, s, x, y, u, n=n):
        return xsam_optax.hvp(loop.make_grad_fn(self.model, s, x[:n], y[:n]),
                              p, u)

      lowered[f"hvp {frac:g}"] = jax.jit(one_hvp).lower(
          st.params, st.batch_stats, x0, y0, st.params)
    self.step_names = {}
    for v in self.rows:
      tx = self._optimizer(v)
      if v.optimizer != "xsam" or v.mode == "cond":
        name = f"step {v.name}"
        fn = jax.jit(self._step_fn(tx, v.hvp_fraction, v.curvature))
        lowered[name] = fn.lower(*sample(v))
        self.step_names[v.name] = {"step": name}
      else:
        fn = jax.jit(self._step_fn(tx, v.hvp_fraction, v.curvature),
                     static_argnames="refresh")
        plain = "xsam plain step"
        if plain not in lowered:
          lowered[plain] = fn.lower(*sample(v), refresh=False)
        refresh = f"xsam refresh step {v.refresh_key}"
        if refresh not in lowered:
          lowered[refresh] = fn.lower(*sample(v), refresh=True)
        self.step_names[v.name] = {"plain": plain, "refresh": refresh}

    # The oracle's products, on flat vectors: its Lanczos loop runs on the
    # host (see `host_lanczos`), each product a top-level program.
    from jax.flatten_util import ravel_pytree
    _, self.unravel = ravel_pytree(st.params)
    flat = lambda tree: ravel_pytree(tree)[0]
    flat0 = flat(st.params)

    def hvp_flat(p, s, x, y, w):
      grad_fn = loop.make_grad_fn(self.model, s, x, y)
      return flat(xsam_optax.hvp(grad_fn, p, self.unravel(w)))

    lowered["hvp flat"] = jax.jit(hvp_flat).lower(
        st.params, st.batch_stats, x0, y0, flat0)
    if self.gauss_newton:
      gn = functools.partial(gauss_newton_matvec, self.model)
      lowered["gn 1"] = jax.jit(gn).lower(st.params, st.batch_stats, x0, y0,
                                          st.params)

      def gn_power(p, s, x, y, u):
        return xsam_optax.power_iteration(
            lambda w: gn(p, s, x, y, w), u, num_iters=5).eigenvector

      def gn_flat(p, s, x, y, w):
        return flat(gn(p, s, x, y, self.unravel(w)))

      lowered["gn power 5"] = jax.jit(gn_power).lower(
          st.params, st.batch_stats, x0, y0, st.params)
      lowered["gn flat"] = jax.jit(gn_flat).lower(
          st.params, st.batch_stats, x0, y0, flat0)
    self.lower_s = time.perf_counter() - t0 - self.data_s
    t1 = time.perf_counter()
    # On a GPU machine the host's cores compile several programs at once; on
    # the 2-core CPU configuration threads would only contend.
    workers = 1 if self.device == "cpu" else max(1, min(8, os.cpu_count() or 1))

    def compile_one(item):
      name, low = item
      t = time.perf_counter()
      exe = low.compile()
      return name, exe, time.perf_counter() - t

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = list(pool.map(compile_one, lowered.items()))
    self.exe = {name: exe for name, exe, _ in done}
    self.compile_each_s = {name: sec for name, _, sec in done}
    self.compile_s = time.perf_counter() - t1

  def init_state(self, v: Variant):
    return self.init_states[(v.optimizer, v.update_every, v.method,
                             v.num_iters)]

  # -- timing -----------------------------------------------------------------

  def timed_candidates(self):
    """name -> (zero-arg callable, steps per call); state carried across calls."""
    batches = self.batches
    st0 = self.init_state(self.rows[0])
    x0, y0 = batches[0]
    cands = {
        "gradient": (functools.partial(self.exe["gradient"], st0.params,
                                       st0.batch_stats, x0, y0), 1),
    }
    for frac in (1.0, 0.25):
      cands[f"hvp {frac:g}"] = (functools.partial(
          self.exe[f"hvp {frac:g}"], st0.params, st0.batch_stats, x0, y0,
          st0.params), 1)

    if "gn 1" in self.exe:
      cands["gn 1"] = (functools.partial(
          self.exe["gn 1"], st0.params, st0.batch_stats, x0, y0, st0.params), 1)

    def cycle(v, names, carry):
      k = v.update_every if v.optimizer == "xsam" else 1

      def run():
        state, i = carry["state"], carry["i"]
        for j in range(k):
          x, y = batches[(i + j) % len(batches)]
          if "step" in names:
            state, loss = self.exe[names["step"]](state, x, y)
          else:
            exe = names["refresh"] if j == 0 else names["plain"]
            state, loss = self.exe[exe](state, x, y)
        carry["state"], carry["i"] = state, i + k
        return state.params, loss

      return run, k

    for v in self.rows:
      cands[v.name] = cycle(v, self.step_names[v.name],
                            {"state": self.init_state(v), "i": 0})
    # The two kinds of host step alone: plain, and each refresh.
    for v in self.rows:
      names = self.step_names[v.name]
      for kind in ("plain", "refresh"):
        if kind in names and names[kind] not in cands:
          carry = {"state": self.init_state(v)}

          def one(exe=names[kind], carry=carry):
            carry["state"], loss = self.exe[exe](carry["state"], x0, y0)
            return carry["state"].params, loss

          cands[names[kind]] = (one, 1)
    return cands

  # -- quality ------------------------------------------------------------------

  def host_lanczos(self, matvec: str, p, s, x, y, u, *, k: int):
    """The oracle: Lanczos with full reorthogonalisation (twice), m products.

    Independent of the library's :func:`xsam_optax.lanczos`, on ravelled
    vectors (fine for an oracle), with the loop on the host so that every
    product runs as its own top-level program: on XLA:CPU a product inside
    a rolled loop runs several times slower (``benchmarks/estimators.py``).
    Returns the top ``k`` Ritz values (descending), the Ritz vectors as rows
    of a ``(k, n)`` array, and the residual bounds
    :math:`\beta_m |e_m^\top y|`.
    """
    import jax.numpy as jnp

    m = self.config["oracle_iters"]
    basis = jnp.zeros((m, u.size), u.dtype)
    q = u / jnp.linalg.norm(u)
    q_prev = jnp.zeros_like(q)
    beta = jnp.zeros((), u.dtype)
    alphas, betas = [], []
    for j in range(m):
      basis = _set_row(basis, j, q)
      w = self.exe[matvec](p, s, x, y, q)
      alpha, beta, q_next = _lanczos_orthogonalise(basis, w, q, q_prev, beta)
      alphas.append(float(alpha))
      betas.append(float(beta))
      if betas[-1] <= 1e-30:  # Invariant subspace: nothing more to find.
        break
      q_prev, q = q, q_next
    n = len(alphas)
    t = (np.diag(alphas) + np.diag(betas[:n - 1], 1)
         + np.diag(betas[:n - 1], -1))
    values, coeffs = np.linalg.eigh(t)
    top = np.arange(n - 1, n - 1 - k, -1)
    vectors = jnp.asarray(coeffs[:, top].T, basis.dtype) @ basis[:n]
    residuals = np.abs(betas[n - 1] * coeffs[n - 1, top])
    return values[top], vectors, residuals


  def quality(self):
    """|cos(v, v*)| at each row's refresh steps along one shared trajectory.

    The trajectory is the default X-SAM's (host-chosen steps); at every step
    each row whose schedule refreshes runs its own compiled refresh step at
    the trajectory's parameters from its own previous eigenvector. A
    ``lax.cond`` row computes exactly what its host-chosen twin does (same
    eigenvectors; ``tests/test_transforms.py`` checks it), so it is given the
    twin's numbers instead of being run again.
    """
    import jax
    import jax.numpy as jnp
    import numpy as onp
    import optax
    from xsam_optax import _tree
    from xsam_optax.train import loop

    from jax.flatten_util import ravel_pytree

    T = self.config["quality_steps"]
    # |cos| of a unit pytree and a unit flat vector (the oracle's).
    abs_cos = jax.jit(lambda tree, vec: jnp.abs(jnp.vdot(
        ravel_pytree(tree)[0].astype(vec.dtype), vec)))
    default = next(v for v in self.rows if v.optimizer == "xsam")
    xsam_rows = [v for v in self.rows if v.optimizer == "xsam"]
    twin = {}
    for v in xsam_rows:
      if v.mode == "cond":
        host = dataclasses.replace(v, mode="host")
        match = [w for w in xsam_rows if dataclasses.replace(w, name="")
                 == dataclasses.replace(host, name="")]
        if match:
          twin[v.name] = match[0].name
    measured = [v for v in xsam_rows if v.name not in twin]
    opt_states = {v.name: self.init_state(v).opt_state for v in measured}
    cos = {v.name: [] for v in measured}
    gn_v = optax.tree.get(self.init_state(default).opt_state, "eigenvector")
    gn_chain, gn_converged = [], []
    has_gn = "gn flat" in self.exe
    u = ravel_pytree(_tree.random_unit_like(
        jax.random.key(123), self.init_state(default).params))[0]
    plain, refresh = "xsam plain step", f"xsam refresh step {default.refresh_key}"
    have_driver = plain in self.exe and refresh in self.exe
    state = self.init_state(default)
    steps, lam1, lam2, rel_res = [], [], [], []
    for t in range(T):
      x, y = self.batches[t % len(self.batches)]
      due = [v for v in measured if t % v.update_every == 0]
      # Rows that refresh every step are scored every QUALITY_EVERY steps.
      scored = [v for v in due
                if v.update_every > 1 or t % QUALITY_EVERY == 0]
      gn_due = has_gn and t % 5 == 0
      if scored or gn_due:
        vals, vecs, res = self.host_lanczos(
            "hvp flat", state.params, state.batch_stats, x, y, u, k=2)
        v_star = vecs[0]
        steps.append(t)
        lam1.append(float(vals[0]))
        lam2.append(float(vals[1]))
        rel_res.append(float(res[0] / abs(vals[0])))
      for v in due:
        names = self.step_names[v.name]
        s = loop.TrainState(state.params, state.batch_stats,
                            opt_states[v.name], jnp.asarray(t, jnp.int32))
        s, _ = self.exe[names.get("step") or names["refresh"]](s, x, y)
        opt_states[v.name] = s.opt_state
        if v in scored:
          vec = optax.tree.get(s.opt_state, "eigenvector")
          cos[v.name].append(float(abs_cos(vec, v_star)))
      if gn_due:
        gn_v = self.exe["gn power 5"](state.params, state.batch_stats, x, y,
                                      gn_v)
        gn_chain.append(float(abs_cos(gn_v, v_star)))
        _, top, _ = self.host_lanczos(
            "gn flat", state.params, state.batch_stats, x, y, u, k=1)
        gn_converged.append(float(jnp.abs(jnp.vdot(top[0], v_star))))
      if have_driver:
        exe = refresh if t % default.update_every == 0 else plain
        state, _ = self.exe[exe](state, x, y)
      else:
        state, _ = self.exe[self.step_names[default.name]["step"]](state, x, y)

    def summary(values, **extra):
      warm = values[1:] or values
      half = values[len(values) // 2:]
      return {"cold": values[0], "warm_mean": float(onp.mean(warm)),
              "warm_min": float(onp.min(warm)),
              "second_half_mean": float(onp.mean(half)),
              "refreshes": len(values), "all": values, **extra}

    out = {name: summary(values) for name, values in cos.items()}
    for name, other in twin.items():
      out[name] = dict(out[other], same_as=other.strip())
    if has_gn:
      out["gauss-newton power 5, every 5"] = summary(
          gn_chain, converged_gn_vs_hessian=gn_converged)
    oracle_summary = {"steps": steps, "lambda_1": lam1, "lambda_2": lam2,
                      "relative_residual_1": rel_res,
                      "iters": self.config["oracle_iters"]}
    return out, oracle_summary

  def memory(self):
    out = {}
    for name, exe in self.exe.items():
      try:
        m = exe.memory_analysis()
      except Exception:  # Not every backend implements it.
        m = None
      if m is None:
        continue
      total = (m.argument_size_in_bytes + m.output_size_in_bytes
               + m.temp_size_in_bytes - m.alias_size_in_bytes)
      out[name] = {"total_bytes": int(total),
                   "temp_bytes": int(m.temp_size_in_bytes)}
    return out

  # -- all ------------------------------------------------------------------------

  def run(self, write=None) -> dict[str, Any]:
    """Builds, times, measures quality; ``write(payload)`` after each phase."""
    import jax
    import _common

    self.env = env = _common.environment()
    print(f"# step_overhead --device {self.device}: jax {env['jax']} on "
          f"{env['backend']} ({env['device_kind']}), {env['cpu_count']} CPUs, "
          f"load {env['load_average_at_start']}", flush=True)
    self.build()
    print(f"# {self.model_desc}; {self.param_count} params; batch "
          f"{self.config['batch_size']} of {self.data_desc}; data "
          f"{self.data_s:.0f} s, lowering {self.lower_s:.0f} s, compiling "
          f"{len(self.exe)} programs {self.compile_s:.0f} s", flush=True)

    cands = self.timed_candidates()
    env["load_average_at_timing"] = _common.load_average()
    t0 = time.perf_counter()
    self.timings = _common.time_interleaved(
        {k: c[0] for k, c in cands.items()}, rounds=self.config["rounds"],
        per_call={k: c[1] for k, c in cands.items()})
    self.timing_s = time.perf_counter() - t0
    self.process_peak = None
    if env["backend"] == "gpu":
      stats = jax.local_devices()[0].memory_stats() or {}
      self.process_peak = stats.get("peak_bytes_in_use")
    self.memory_xla = self.memory()
    self.quality_rows, self.oracle, self.quality_s = {}, None, None
    if write:  # Timings are safe on disk before the (longer) quality phase.
      write(self.report(final=False))
    print(f"# timing {self.timing_s:.0f} s; measuring quality ...", flush=True)
    t0 = time.perf_counter()
    self.quality_rows, self.oracle = self.quality()
    self.quality_s = time.perf_counter() - t0
    payload = self.report(final=True)
    if write:
      write(payload)
    return payload

  def report(self, *, final: bool) -> dict[str, Any]:
    import _common

    timings, quality, memory = self.timings, self.quality_rows, self.memory_xla
    ms = lambda k: timings[k]["median_ms"]
    grad, sam, sgd = ms("gradient"), ms("SAM"), ms("SGD")
    plain = ms("xsam plain step") if "xsam plain step" in timings else None
    results = []
    for v in self.rows:
      step = ms(v.name)
      names = self.step_names[v.name]
      mem = max((memory.get(n, {}).get("total_bytes", 0)
                 for n in names.values()), default=0) or None
      if v.optimizer != "xsam" or not plain:
        refresh_cost = None
      elif "refresh" in names:  # Host-chosen: the refresh step, timed alone.
        refresh_cost = (ms(names["refresh"]) - plain) / grad
      else:  # lax.cond: what the period costs beyond its plain steps.
        refresh_cost = v.update_every * (step - plain) / grad
      q = quality.get(v.name, {})
      results.append({
          "name": v.name.strip(), **v.settings(),
          "step_ms": step, "step_ms_q1": timings[v.name]["q1_ms"],
          "step_ms_q3": timings[v.name]["q3_ms"],
          "ratio_to_sam": step / sam, "ratio_to_sgd": step / sgd,
          "refresh_cost_gradients": refresh_cost,
          "refresh_step_ms": (ms(names["refresh"]) if "refresh" in names
                              else None),
          "quality_warm_mean": q.get("warm_mean"),
          "quality_warm_min": q.get("warm_min"),
          "quality_cold": q.get("cold"),
          "quality_second_half_mean": q.get("second_half_mean"),
          "quality_same_as": q.get("same_as"),
          "quality_refreshes": q.get("refreshes"),
          "quality_all": q.get("all"),
          "memory_total_bytes": mem,
      })

    sam_mem = next(r["memory_total_bytes"] for r in results
                   if r["name"] == "SAM")
    header = ("variant", "step ms", "x SAM", "x SGD", "refresh, gradients",
              "|cos(v,v*)| warm mean (min)", "2nd half", "MiB (XLA)",
              "- SAM, MiB", "- SAM, x params")
    table_rows = []
    for r, v in zip(results, self.rows):
      qual = (f"{r['quality_warm_mean']:.3f} ({r['quality_warm_min']:.3f})"
              if r["quality_warm_mean"] is not None else None)
      extra = (r["memory_total_bytes"] - sam_mem
               if r["memory_total_bytes"] and sam_mem else None)
      table_rows.append((v.name, r["step_ms"], r["ratio_to_sam"],
                         r["ratio_to_sgd"], r["refresh_cost_gradients"], qual,
                         r["quality_second_half_mean"],
                         (r["memory_total_bytes"] or 0) / 2**20 or None,
                         None if extra is None else extra / 2**20,
                         None if extra is None else extra / self.param_bytes))
    table = _common.format_table(header, table_rows)
    hvp_full, hvp_q = ms("hvp 1"), ms("hvp 0.25")
    lines = [
        f"gradient {grad:.2f} ms; SGD step {sgd:.2f} ms; SAM step {sam:.2f} ms "
        f"({sam / grad:.2f} gradients); X-SAM step without refresh "
        f"{plain if plain is None else round(plain, 2)} ms; one HVP "
        f"{hvp_full / grad:.2f} gradients on the full batch, "
        f"{hvp_q / grad:.2f} on 1/4 of it; parameters "
        f"{self.param_bytes / 2**20:.2f} MiB"]
    oracle = self.oracle
    if oracle:
      ratio = np.array(oracle["lambda_2"]) / np.array(oracle["lambda_1"])
      lines.append(
          f"v*: Lanczos {oracle['iters']} products, k=2, at steps "
          f"{oracle['steps']}: lambda_1 median "
          f"{np.median(oracle['lambda_1']):.4g}, lambda_2/lambda_1 median "
          f"{np.median(ratio):.3f}, relative residual max "
          f"{max(oracle['relative_residual_1']):.2g}")
    gauss_newton = None
    gn_quality = quality.get("gauss-newton power 5, every 5")
    if "gn 1" in timings:
      gauss_newton = {"matvec_gradients": ms("gn 1") / grad, **(gn_quality or {})}
      line = (f"Gauss-Newton (xsam_optax.gauss_newton_fn): one "
              f"product {gauss_newton['matvec_gradients']:.2f} gradients")
      if gn_quality:
        line += (
            f"; power 5 on it every 5 steps, warm: |cos(v, v*)| "
            f"{gn_quality['warm_mean']:.3f} (min {gn_quality['warm_min']:.3f})"
            f"; converged GN top eigenvector vs the Hessian's: |cos| median "
            f"{np.median(gn_quality['converged_gn_vs_hessian']):.3f}")
      lines.append(line)
    if self.process_peak is not None:
      lines.append(f"GPU allocator peak (process-wide, all programs): "
                   f"{self.process_peak / 2**20:.0f} MiB")
    env = dict(self.env, load_average_at_end=_common.load_average())
    if final:
      print(table)
      print("\n".join(lines))
      print(f"# load average at timing {env['load_average_at_timing']}, at "
            f"end {env['load_average_at_end']}; timing "
            f"{self.timing_s:.0f} s, quality {self.quality_s:.0f} s",
            flush=True)
    return {
        "benchmark": "step_overhead",
        "complete": final,
        "device": self.device,
        "smoke": self.smoke,
        "environment": env,
        "config": {**self.config, "model_description": self.model_desc,
                   "data_description": self.data_desc,
                   "param_count": self.param_count,
                   "param_bytes": self.param_bytes,
                   "base_optimizer": "SGD momentum 0.9, weight decay 5e-4 "
                                     "(xsam_optax.train.loop.make_optimizer)",
                   "rho": 0.05, "alpha": 0.2},
        "seconds": {"data": self.data_s, "lowering": self.lower_s,
                    "compile": self.compile_s, "timing": self.timing_s,
                    "quality": self.quality_s,
                    "compile_each": self.compile_each_s},
        "gradient_ms": grad, "sgd_ms": sgd, "sam_ms": sam,
        "xsam_plain_step_ms": plain,
        "hvp_full_batch_gradients": hvp_full / grad,
        "hvp_quarter_batch_gradients": hvp_q / grad,
        "rows": results,
        "timings": timings,
        "oracle": oracle,
        "memory_xla": memory,
        "gpu_process_peak_bytes": self.process_peak,
        "gauss_newton": gauss_newton,
        "table": table,
        "summary": lines,
    }


if __name__ == "__main__":
  sys.exit(main())
