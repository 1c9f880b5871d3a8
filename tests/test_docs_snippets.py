"""Every Python snippet of the manual (docs/*.md) runs, as written.

The stand-ins for the guide's snippets are below; the other pages (design,
and the generated performance and study pages) have none, and a Python
snippet added there fails until it gets one. The reference-schedule snippet
is compared with a plain restatement of the authors' training loop.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_optax

import _snippets
from _snippets import (all_finite, cheap_xsam, classifier_namespace, cross_entropy,
                       leaves_differ, make_data)

PAGES = {path.name: _snippets.Snippets(path)
         for path in sorted((_snippets.ROOT / "docs").glob("*.md"))}
GUIDE = PAGES["guide.md"]


def _eigenvalue(opt_state):
  return float(optax.tree.get(opt_state, "eigenvalue"))


# ------------------------------------------------------ the training step


@GUIDE.register("The training step", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    assert leaves_differ(ns["params"], before["params"])
    assert np.isfinite(_eigenvalue(ns["opt_state"]))
  return setup, check


@GUIDE.register("BatchNorm (Flax Linen)", 0)
def _():
  def setup():
    model = _snippets.BatchStatsNet()
    batch = make_data(32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch["x"])
    tx = cheap_xsam()
    return dict(model=model, batch=batch, params=variables["params"],
                stats=variables["batch_stats"], tx=tx,
                opt_state=tx.init(variables["params"]),
                cross_entropy=cross_entropy)

  def check(before, ns):
    assert all_finite(ns["updates"])
    assert leaves_differ(ns["new_stats"], before["stats"])
  return setup, check


@GUIDE.register("Flax NNX", 0)
def _():
  def setup():
    from flax import nnx  # pylint: disable=g-import-not-at-top

    class Net(nnx.Module):

      def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 6, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(6, 3, use_bias=False, rngs=rngs)

      def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))

    data = make_data(16)
    return dict(nnx=nnx, model=Net(nnx.Rngs(0)), x=data["x"], y=data["y"],
                loss_fn=lambda m, x, y: cross_entropy(m(x), y))

  def check(before, ns):
    nnx = ns["nnx"]
    start = nnx.as_pure(nnx.state(ns["model"], nnx.Param))
    ns["train_step"](ns["model"], ns["optimizer"], ns["x"], ns["y"])
    assert leaves_differ(nnx.as_pure(nnx.state(ns["model"], nnx.Param)), start)
    del before
  return setup, check


@GUIDE.register("Two refresh paths", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    assert leaves_differ(ns["params"], before["params"])
    # Step 0 refreshed (5 power steps): the eigenvalue is the Hessian's.
    assert _eigenvalue(ns["opt_state"]) > 0.0
  return setup, check


# ------------------------------------------------------ what it computes


# The reference schedule: 2 epochs of 7 batches with k = 5, so one refresh
# per epoch (in-epoch batch 5), the first 5 batches plain SAM, and epoch 2
# starting with a stale eigenvector.
REFERENCE_EPOCHS, REFERENCE_BATCHES = 2, 7


def reference_loop(params, v0, loss_fn, epoch_batches, *, k=5, rho=0.05,
                   alpha=0.2, lr=0.1, momentum=0.9, weight_decay=5e-4,
                   power_iters=5):
  """The authors' training loop restated on flat float64 vectors.

  SGD with momentum and weight decay (PyTorch's: decay added to the
  gradient, buffer = momentum * buffer + d); SAM ascent every step; power
  iteration on the dense Hessian of the batch loss at in-epoch batches
  i = k, 2k, ...; the correction g_hat - alpha sign(<g_adv, v>) <g_hat, v> v
  only once a refresh has happened, before which g_adv goes to SGD as is.
  """
  theta, unravel = ravel_pytree(params)
  theta, v = np.asarray(theta, np.float64), np.asarray(v0, np.float64)
  buffer, have_v = np.zeros_like(theta), False
  flat_loss = lambda f, b: loss_fn(unravel(f), b)
  grad, hessian_of = jax.jit(jax.grad(flat_loss)), jax.jit(
      jax.hessian(flat_loss))
  for epoch in range(REFERENCE_EPOCHS):
    for i, batch in enumerate(epoch_batches(epoch)):
      g = np.asarray(grad(theta, batch))
      g_adv = np.asarray(grad(theta + rho * g / np.linalg.norm(g), batch))
      if i > 0 and i % k == 0:
        hessian = np.asarray(hessian_of(theta, batch))
        for _ in range(power_iters):
          v = hessian @ v
          v = v / np.linalg.norm(v)
        have_v = True
      if have_v:
        g_hat = g_adv / np.linalg.norm(g_adv)
        d = g_hat - alpha * np.sign(g_adv @ v) * (g_hat @ v) * v
      else:
        d = g_adv
      buffer = momentum * buffer + d + weight_decay * theta
      theta = theta - lr * buffer
  return theta


@GUIDE.register("Differences from the authors' code", 0, x64=True)
def _():
  def setup():
    ns = classifier_namespace(dtype=jnp.float64)
    data = make_data(REFERENCE_EPOCHS * REFERENCE_BATCHES * 8, seed=3,
                     dtype=np.float64)

    def epoch_batches(epoch):
      order = np.random.default_rng(epoch).permutation(len(data["y"]))
      return [jax.tree.map(lambda x, j=j: x[order[j * 8:(j + 1) * 8]], data)
              for j in range(REFERENCE_BATCHES)]

    ns.update(num_epochs=REFERENCE_EPOCHS, epoch_batches=epoch_batches)
    return ns

  def check(before, ns):
    start = ns["tx"].init(before["params"])[1].eigenvector
    want = reference_loop(before["params"], ravel_pytree(start)[0],
                          before["loss_fn"], before["epoch_batches"])
    got = np.asarray(ravel_pytree(ns["params"])[0])
    assert leaves_differ(ns["params"], before["params"])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  return setup, check


# ------------------------------------------ estimator, curvature and rule


@GUIDE.register("Curvature", 0)
def _():
  def setup():
    ns = classifier_namespace()
    tx = cheap_xsam()
    grad_fn = jax.grad(lambda p: ns["loss_fn"](p, ns["batch"]))
    ns.update(tx=tx, opt_state=tx.init(ns["params"]), grad_fn=grad_fn,
              grads=grad_fn(ns["params"]))
    return ns

  def check(before, ns):
    del before
    # The sub-batch really is a sub-batch of the dict batch.
    assert ns["sub_batch"]["x"].shape == (32, 4)
  return setup, check


def _first_update(tx, before):
  """``tx``'s first update on the stand-in classifier, jitted."""
  grad_fn = jax.grad(lambda p: before["loss_fn"](p, before["batch"]))
  return jax.jit(lambda p: tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn))(
      before["params"])


@GUIDE.register("Estimator", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    _, state = _first_update(ns["tx"], before)
    assert _eigenvalue(state) > 0.0
  return setup, check


@GUIDE.register("Correction rule", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    # sgd(0.1) without momentum: the update is -0.1 times the direction, whose
    # component along the step's eigenvector is cos - coefficient.
    updates, state = _first_update(ns["tx"], before)
    v = ravel_pytree(optax.tree.get(state, "eigenvector"))[0]
    along = float(-ravel_pytree(updates)[0] @ v / 0.1)
    cos = float(optax.tree.get(state, "cos_angle"))
    assert abs(cos) > 1e-3
    np.testing.assert_allclose(along, np.clip(cos, -0.2, 0.2), rtol=1e-4,
                               atol=1e-6)
  return setup, check


# ---------------------------------------- composing with optax, Flax, Equinox

COMPOSING = "Composing with optax, Flax and Equinox"


@GUIDE.register(COMPOSING, 0)
def _():
  def setup():
    return {}

  def check(before, ns):
    # The base optimizer clips: one SGD step of length <= 0.1 * 1.0 (plus
    # the decay, zero at zero parameters).
    del before
    params = {"w": jnp.zeros(3)}
    grad_fn = jax.grad(lambda p: 1e3 * jnp.sum((p["w"] - 1.0) ** 2))
    tx = ns["tx"]
    updates, _ = tx.update(grad_fn(params), tx.init(params), params,
                           grad_fn=grad_fn, check_incoming=True, refresh=False)
    assert np.linalg.norm(ravel_pytree(updates)[0]) <= 0.1 + 1e-6
  return setup, check


@GUIDE.register(COMPOSING, 1)
def _():
  def setup():
    ns = classifier_namespace()
    tx = cheap_xsam()
    ns.update(tx=tx, opt_state=tx.init(ns["params"]))
    return ns

  def check(before, ns):
    full = jax.grad(before["loss_fn"])(before["params"], before["batch"])
    np.testing.assert_allclose(ravel_pytree(ns["grad_fn"](before["params"]))[0],
                               ravel_pytree(full)[0], rtol=1e-5, atol=1e-7)
  return setup, check


@GUIDE.register(COMPOSING, 2)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    assert int(ns["state"].step) == len(before["batches"])
    assert leaves_differ(ns["state"].params, before["params"])
  return setup, check


@GUIDE.register(COMPOSING, 3)
def _():
  def setup():
    data = make_data(16)
    return dict(x=data["x"], y=data["y"], cross_entropy=cross_entropy)

  def check(before, ns):
    import equinox as eqx  # pylint: disable=g-import-not-at-top
    del before
    start = eqx.nn.MLP(in_size=4, out_size=3, width_size=6, depth=1,
                       key=jax.random.PRNGKey(0))
    model = ns["model"]
    assert isinstance(model, eqx.nn.MLP)
    assert leaves_differ(eqx.filter(model, eqx.is_inexact_array),
                         eqx.filter(start, eqx.is_inexact_array))
    # The refresh ran on the MLP's Hessian, in the arrays' structure.
    assert _eigenvalue(ns["opt_state"]) > 0.0
    assert (jax.tree.structure(optax.tree.get(ns["opt_state"], "eigenvector"))
            == jax.tree.structure(eqx.filter(model, eqx.is_inexact_array)))
  return setup, check


@GUIDE.register(COMPOSING, 4)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    trainable, opt_state = ns["train_step"](
        ns["trainable"], ns["frozen"], ns["opt_state"], before["batch"])
    assert set(trainable) == {"head"}
    assert leaves_differ(trainable, ns["trainable"])
    assert all_finite(opt_state)
  return setup, check


@GUIDE.register(COMPOSING, 5)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    params, _ = ns["train_step"](ns["params"], ns["opt_state"],
                                 before["batch"])
    assert leaves_differ(params.fast, before["params"])
    assert isinstance(params, optax.LookaheadParams)
  return setup, check


@GUIDE.register(COMPOSING, 6)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    tx, params = ns["tx"], before["params"]
    grad_fn = jax.grad(lambda p: before["loss_fn"](p, before["batch"]))
    step = jax.jit(lambda p, s: tx.update(grad_fn(p), s, p, grad_fn=grad_fn))
    state = tx.init(params)
    alphas = []
    for _ in range(2):
      _, state = step(params, state)
      alphas.append(float(state.hyperparams["alpha"]))
    # The schedule moves alpha from 0 towards 0.2, by 0.002 a step.
    np.testing.assert_allclose(alphas, [0.0, 0.002], rtol=1e-5, atol=1e-9)
    assert all_finite(state)
  return setup, check


@GUIDE.register(COMPOSING, 7)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    # The schedules equal inject_hyperparams with the same ones, step by step.
    params, tx = before["params"], ns["tx"]
    injected = optax.inject_hyperparams(
        xsam_optax.xsam, static_args=("update_every", "num_iters", "seed"))(
            optax.sgd(0.1), rho=ns["warmup"], alpha=optax.linear_schedule(0.0, 0.2, 100))
    grad_fn = jax.grad(lambda p: before["loss_fn"](p, before["batch"]))

    def three_steps(t):
      p, state = params, t.init(params)
      step = jax.jit(lambda p, s: t.update(grad_fn(p), s, p, grad_fn=grad_fn))
      for _ in range(3):
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
      return p

    got, want = three_steps(tx), three_steps(injected)
    np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(want)[0], rtol=1e-6)
    assert leaves_differ(got, params)
  return setup, check


@GUIDE.register(COMPOSING, 8)
def _():
  def setup():
    return dict(z=jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64),
                target=jnp.array([0.0, 1.0 + 1.0j], jnp.complex64))

  def check(before, ns):
    # The split parameters are real, X-SAM takes them, and the loss is the
    # complex one: |z - target|^2 at the original z (NumPy oracle), whose
    # Hessian in (re, im) is 2 I.
    params, loss = ns["params"], ns["loss"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    want = np.sum(np.abs(np.asarray(before["z"]) - np.asarray(before["target"])) ** 2)
    np.testing.assert_allclose(float(loss(params)), want, rtol=1e-6)
    grad_fn = jax.grad(loss)
    tx = xsam_optax.xsam(optax.sgd(0.1), update_every=1)
    _, state = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    np.testing.assert_allclose(_eigenvalue(state), 2.0, rtol=1e-5)
  return setup, check


# ------------------------------------------------ several devices and hosts


@GUIDE.register("Sharded jit", 0)
def _():
  def setup():
    from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    ns = classifier_namespace()
    mesh = jax.make_mesh((1,), ("data",))
    ns.update(mesh=mesh, NamedSharding=NamedSharding, P=P,
              param_shardings=jax.tree.map(
                  lambda _: NamedSharding(mesh, P()), ns["params"]))
    return ns

  def check(before, ns):
    del before
    eigenvector = optax.tree.get(ns["opt_state"], "eigenvector")
    assert all(isinstance(x.sharding, ns["NamedSharding"])
               for x in jax.tree.leaves(eigenvector))
  return setup, check


@GUIDE.register("pmap", 0)
def _():
  def setup():
    ns = classifier_namespace()
    ns["loss"] = ns.pop("loss_fn")
    return ns

  def check(before, ns):
    replicate = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    params = replicate(before["params"])
    opt_state = replicate(ns["tx"].init(before["params"]))
    params, opt_state = ns["train_step"](params, opt_state,
                                         replicate(before["batch"]))
    assert leaves_differ(jax.tree.map(lambda x: x[0], params),
                         before["params"])
  return setup, check


# ------------------------------------------------------- install.md


@PAGES["install.md"].register("A first step", 0)
def _():
  def setup():
    return {}

  def check(before, ns):
    del before
    # Oracles: the least-squares loss it starts from, and the top eigenvalue
    # of its Hessian A^T A / n, dense.
    a = np.asarray(ns["A"], np.float64)
    top = np.linalg.eigvalsh(a.T @ a / len(a)).max()
    start = float(ns["loss_fn"]({"w": jnp.zeros(8)}))
    assert float(ns["loss_fn"](ns["params"])) < 1e-3 * start
    np.testing.assert_allclose(_eigenvalue(ns["opt_state"]), top, rtol=1e-3)
    assert ns["schedule"] == xsam_optax.RefreshSchedule(2)
  return setup, check


@GUIDE.register("Per-device perturbations", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    # One step equals a plain restatement: each group's SAM point, the mean of
    # the groups' gradients there, X-SAM's correction of that mean.
    params, opt_state = ns["train_step"](before["params"], ns["opt_state"], before["batch"])
    assert leaves_differ(params, before["params"])
    loss_fn, batch = before["loss_fn"], before["batch"]
    grads = []
    for i in range(4):
      group = jax.tree.map(lambda x, i=i: x[i * 12:(i + 1) * 12], batch)
      g = jax.grad(loss_fn)(before["params"], group)
      unit = optax.tree.scale(1 / optax.tree.norm(g), g)
      grads.append(jax.grad(loss_fn)(optax.tree.add_scale(before["params"], 0.05, unit),
                                     group))
    g_adv = ravel_pytree(jax.tree.map(lambda *g: sum(g) / 4, *grads))[0]
    v = ravel_pytree(optax.tree.get(opt_state, "eigenvector"))[0]
    g_hat = g_adv / jnp.linalg.norm(g_adv)
    want = ravel_pytree(before["params"])[0] - 0.1 * (g_hat - 0.2 * jnp.abs(g_hat @ v) * v)
    np.testing.assert_allclose(ravel_pytree(params)[0], want, rtol=2e-4, atol=2e-6)
  return setup, check


@GUIDE.register("Per-device perturbations", 1)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    # On one device the local gradient is the whole batch's: the global step.
    replicate = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)
    params, _ = ns["train_step"](replicate(before["params"]),
                                 replicate(ns["tx"].init(before["params"])),
                                 replicate(before["batch"]))
    assert leaves_differ(jax.tree.map(lambda x: x[0], params), before["params"])
  return setup, check


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_docs_snippet_has_a_stand_in(page):
  PAGES[page].check_coverage()


BLOCKS = [(page, heading, index, code) for page in sorted(PAGES)
          for heading, index, code in PAGES[page].blocks()]


@pytest.mark.parametrize("page, heading, index, code", BLOCKS,
                         ids=[f"{p}-{h[:30]}-{i}" for p, h, i, _ in BLOCKS])
def test_docs_snippet_runs(page, heading, index, code):
  PAGES[page].run(heading, index, code)

