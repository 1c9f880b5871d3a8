"""Runs the Python snippets of README.md and docs/*.md, as written.

The snippets are cut from the Markdown by their fences and executed with
small stand-ins for what they take from the reader's program (``params``,
``loss_fn``, ``batches``, ``model``, ...); then a check uses what they
defined. Each test module registers one ``(setup, check)`` pair per snippet
of its file, keyed by the heading above the snippet and its index under that
heading; a snippet without one fails, so a new snippet cannot go untested.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(text, name="README.md"):
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
  assert code is None, f"unterminated code fence in {name}"
  return blocks


class Snippets:
  """The stand-ins of one Markdown file's snippets, and the tests that run them."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.name = str(self.path.relative_to(ROOT))
    self.stand_ins = {}
    self.x64_headings = set()

  def blocks(self):
    return python_blocks(self.path.read_text(encoding="utf-8"), self.name)

  def register(self, heading, index, *, x64=False):
    """Decorator: ``make() -> (setup, check)`` for snippet ``index`` under ``heading``."""
    def register(make):
      self.stand_ins[(heading, index)] = make()
      if x64:
        self.x64_headings.add((heading, index))
      return make
    return register

  def check_coverage(self):
    found = {(heading, index) for heading, index, _ in self.blocks()}
    assert found - set(self.stand_ins) == set(), (
        f"{self.name} snippets without a stand-in")
    assert set(self.stand_ins) - found == set(), (
        f"stand-ins for {self.name} snippets now gone")

  def run(self, heading, index, code):
    if (heading, index) not in self.stand_ins:
      pytest.fail(f"no stand-in for {self.name} snippet {index} under '{heading}'")
    setup, check = self.stand_ins[(heading, index)]
    with jax.enable_x64((heading, index) in self.x64_headings):
      before = dict(base_namespace(), **setup())
      namespace = dict(before)
      exec(compile(code, f"{self.name}: {heading} #{index}", "exec"), namespace)  # pylint: disable=exec-used
      check(before, namespace)

  def parametrize(self):
    blocks = self.blocks()
    return pytest.mark.parametrize(
        "heading, index, code", blocks,
        ids=[f"{h[:30]}-{i}" for h, i, _ in blocks])


# ------------------------------------------------------------ stand-ins


# All stand-in models share two weight shapes, (4, 6) and (6, 3): the
# snippets that call update eagerly then reuse each other's compiled
# operations, which keeps the tests fast.


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


# Where a snippet uses the reader's `tx`, the stand-in is X-SAM with one
# power product (the defaults): the snippet is about the arguments.
def cheap_xsam():
  return xsam_optax.xsam(optax.sgd(0.1), method="power", num_iters=1)
