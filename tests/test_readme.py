"""Every Python snippet in README.md runs, as written.

The snippets are cut from README.md by their fences and executed with small
stand-ins for what they take from the reader's program (``params``,
``loss_fn``, ``batches``, ``model``, ...); then a check uses what they
defined. A snippet without a stand-in here fails the test, so a new one
cannot go untested. The reference-schedule snippet is compared with a plain
restatement of the reference's training loop.
"""

import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import xsam_optax

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text):
  """``[(heading, index under that heading, code)]`` for each python fence."""
  blocks, heading, counts, code, indent = [], None, {}, None, ""
  for line in text.splitlines():
    stripped = line.strip()
    if code is None:
      match = re.match(r"#{1,6} (.*)", line)
      if match:
        heading = match.group(1).strip()
      elif stripped == "```python":
        code, indent = [], line[:len(line) - len(line.lstrip())]
      continue
    if stripped == "```":
      index = counts.get(heading, 0)
      counts[heading] = index + 1
      blocks.append((heading, index, "\n".join(code) + "\n"))
      code = None
    else:
      code.append(line[len(indent):] if line.startswith(indent) else line)
  assert code is None, "unterminated code fence in README.md"
  return blocks


# ------------------------------------------------------------ stand-ins


# All stand-in models share two weight shapes, (4, 6) and (6, 3): the
# snippets that call update eagerly then reuse each other's compiled
# operations, which keeps this file fast.


class Classifier(nn.Module):
  """``embed`` and ``head``: two named parts, for the frozen-parameter recipe."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    del train
    dense = functools.partial(nn.Dense, use_bias=False,
                              param_dtype=self.dtype)
    return dense(3, name="head")(jnp.tanh(dense(6, name="embed")(x)))


class BatchStatsNet(Classifier):
  """The classifier with batch statistics: it normalises its input by the
  batch's mean in training, keeps a running mean in ``batch_stats``, and has
  the classifier's parameters (the eager snippet reuses their operations)."""

  @nn.compact
  def __call__(self, x, train=False):
    mean = self.variable("batch_stats", "mean", jnp.zeros, x.shape[1:])
    if train:
      batch_mean = jnp.mean(x, axis=0)
      mean.value = 0.9 * mean.value + 0.1 * batch_mean
    else:
      batch_mean = mean.value
    return super().__call__(x - batch_mean)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_data(n, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4)).astype(dtype)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def classifier_namespace(n=48, dtype=jnp.float32):
  model = Classifier(dtype)
  batch = make_data(n, dtype=np.dtype(dtype))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["x"])["params"]

  def loss_fn(p, b):
    return cross_entropy(model.apply({"params": p}, b["x"]), b["y"])

  # One batch: a loop over `batches` then compiles only the refresh step.
  return dict(model=model, params=params, loss_fn=loss_fn, batch=batch,
              batches=[make_data(16, seed=1)], cross_entropy=cross_entropy)


def base_namespace():
  return dict(jax=jax, jnp=jnp, np=np, optax=optax, xsam_optax=xsam_optax,
              functools=functools)


def leaves_differ(a, b):
  return not np.allclose(ravel_pytree(a)[0], ravel_pytree(b)[0])


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# One entry per snippet: (heading, index) -> (setup() -> namespace,
# check(namespace before, namespace after)).
SNIPPETS = {}


def snippet(heading, index):
  def register(make):
    SNIPPETS[(heading, index)] = make()
    return make
  return register


@snippet("Use it in a training step", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    assert leaves_differ(ns["params"], before["params"])
    assert np.isfinite(float(optax.tree.get(ns["opt_state"], "eigenvalue")))
  return setup, check


# Where a snippet uses the reader's `tx`, the stand-in is X-SAM with one
# power product: the snippet is about the arguments, and eager refreshes
# with the default Lanczos compile each of their operations (slow tests).
def cheap_xsam():
  return xsam_optax.xsam(optax.sgd(0.1), method="power", num_iters=1)


@snippet("Use it in a training step", 1)
def _():
  def setup():
    model = BatchStatsNet()
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


@snippet("Use it in a training step", 2)
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
    assert leaves_differ(nnx.as_pure(nnx.state(ns["model"], nnx.Param)),
                         start)
    del before
  return setup, check


@snippet("Cheaper refreshes", 0)
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


@snippet("Your own estimator", 0)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    tx, params = ns["tx"], before["params"]
    grad_fn = jax.grad(lambda p: before["loss_fn"](p, before["batch"]))
    _, state = jax.jit(lambda p: tx.update(grad_fn(p), tx.init(p), p,
                                           grad_fn=grad_fn))(params)
    assert float(optax.tree.get(state, "eigenvalue")) > 0.0
  return setup, check


@snippet("Composing with optax and Flax", 0)
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


@snippet("Composing with optax and Flax", 1)
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


@snippet("Composing with optax and Flax", 2)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    assert int(ns["state"].step) == len(before["batches"])
    assert leaves_differ(ns["state"].params, before["params"])
  return setup, check


@snippet("Composing with optax and Flax", 3)
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


@snippet("Composing with optax and Flax", 4)
def _():
  def setup():
    return classifier_namespace()

  def check(before, ns):
    params, _ = ns["train_step"](ns["params"], ns["opt_state"],
                                 before["batch"])
    assert leaves_differ(params.fast, before["params"])
    assert isinstance(params, optax.LookaheadParams)
  return setup, check


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


@snippet("What it computes", 0)
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


@snippet("Running on several devices (pmap, sharded jit, TPU pods, several "
         "hosts)", 0)
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


@snippet("Running on several devices (pmap, sharded jit, TPU pods, several "
         "hosts)", 1)
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


BLOCKS = python_blocks(README.read_text())


def test_every_readme_snippet_has_a_stand_in():
  found = {(heading, index) for heading, index, _ in BLOCKS}
  assert found - set(SNIPPETS) == set(), (
      "README snippets without a stand-in in tests/test_readme.py")
  assert set(SNIPPETS) - found == set(), "stand-ins for snippets now gone"


@pytest.mark.parametrize("heading, index, code", BLOCKS,
                         ids=[f"{h[:30]}-{i}" for h, i, _ in BLOCKS])
def test_readme_snippet_runs(heading, index, code):
  if (heading, index) not in SNIPPETS:
    pytest.fail(f"no stand-in for README snippet {index} under '{heading}'")
  setup, check = SNIPPETS[(heading, index)]
  with jax.enable_x64(heading == "What it computes"):
    before = dict(base_namespace(), **setup())
    namespace = dict(before)
    exec(compile(code, f"README.md: {heading} #{index}", "exec"), namespace)  # pylint: disable=exec-used
    check(before, namespace)
