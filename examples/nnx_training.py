"""X-SAM with Flax NNX: ``nnx.Optimizer`` and a BatchNorm CNN, the CLI's protocol in small.

The ``xsam-train`` CLI uses Flax Linen (``xsam_optax/train``); this is the same
training with NNX. ``nnx.Optimizer.update(model, grads, **kwargs)`` forwards
keyword arguments to the transform, so X-SAM's ``grad_fn`` goes straight
through. What ``grad_fn`` must do with NNX:

* it receives the *pure* parameter state (arrays, no ``Variable`` wrappers) and
  must return gradients of that same structure;
* it rebuilds the model with ``nnx.merge(graphdef, params, rest)``, so the SAM
  ascent and the Hessian-vector products run the model in training mode
  (BatchNorm with batch statistics) on the step's mini-batch, while the
  running statistics they compute are thrown away: only the clean pass's
  statistics are written back into the model, once per step.

Run::

  python examples/nnx_training.py                       # X-SAM on digits
  python examples/nnx_training.py --optimizer sam --epochs 5
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import xsam_optax
from xsam_optax.train import data as data_lib


class CNN(nnx.Module):
  """Conv -> BatchNorm -> ReLU blocks (stride 2 after the first), then a linear head."""

  def __init__(self, spatial_shape, in_channels, num_classes, *, rngs,
               features=(32, 32, 32)):
    convs, norms = [], []
    for i, width in enumerate(features):
      stride = 1 if i == 0 else 2
      convs.append(nnx.Conv(in_channels, width, kernel_size=(3,) * len(spatial_shape),
                            strides=stride, use_bias=False, rngs=rngs))
      # PyTorch's momentum 0.1 is 0.9 here, as in the Linen model.
      norms.append(nnx.BatchNorm(width, momentum=0.9, rngs=rngs))
      in_channels = width
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    # "SAME" padding: each stride-2 block halves every spatial size (rounding up).
    shrink = 2 ** (len(features) - 1)
    flat = math.prod(math.ceil(s / shrink) for s in spatial_shape) * features[-1]
    self.head = nnx.Linear(flat, num_classes, rngs=rngs)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.relu(norm(conv(x)))
    return self.head(x.reshape((x.shape[0], -1)))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit(static_argnames="refresh")
def train_step(model, optimizer, x, y, refresh=None):
  """One step; ``refresh`` (static) picks X-SAM's refresh on the host, or ``None``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params):
    # Training mode: BatchNorm normalises with this batch's statistics and
    # writes new running statistics into the merged copy.
    copy = nnx.merge(graphdef, params, rest, copy=True)
    logits = copy(x)
    return cross_entropy(logits, y), (nnx.state(copy, nnx.BatchStat), logits)

  (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  # For the SAM ascent and the HVPs: same batch, training mode, statistics dropped.
  grad_fn = jax.grad(lambda p: loss_fn(p)[0])
  nnx.update(model, batch_stats)  # Running statistics: once, from the clean pass.
  extra = {} if refresh is None else {"refresh": refresh}
  optimizer.update(model, grads, grad_fn=grad_fn, **extra)
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


@nnx.jit
def evaluate(model, x, y):
  logits = model(x)
  return cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def make_tx(name, schedule, args):
  """The transform, and the host's copy of its refresh schedule (``None``: no refreshes)."""
  base = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(schedule, momentum=0.9))
  if name == "sgd":
    return base, None
  if name == "sam":
    return xsam_optax.sam(base, rho=args.rho), None
  tx = xsam_optax.xsam(base, rho=args.rho, alpha=args.alpha,
                       update_every=args.update_every, num_iters=args.num_iters)
  return tx, xsam_optax.refresh_schedule(tx)  # the period read from tx itself


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dataset", choices=data_lib.DATASETS, default="digits")
  parser.add_argument("--optimizer", choices=("sgd", "sam", "xsam"), default="xsam")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--alpha", type=float, default=0.2)
  parser.add_argument("--update-every", type=int, default=5)
  parser.add_argument("--num-iters", type=int, default=4)
  parser.add_argument("--train-size", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  ds = data_lib.load_dataset(args.dataset, train_size=args.train_size)
  steps_per_epoch = len(ds.x_train) // args.batch_size
  schedule = optax.cosine_decay_schedule(args.lr, steps_per_epoch * args.epochs)
  model = CNN(ds.x_train.shape[1:-1], ds.x_train.shape[-1], ds.num_classes,
              rngs=nnx.Rngs(args.seed))
  tx, refresh_schedule = make_tx(args.optimizer, schedule, args)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  step = 0
  for epoch in range(args.epochs):
    order = np.random.default_rng([args.seed, epoch]).permutation(len(ds.x_train))
    model.train()
    losses = []
    for idx in order[: steps_per_epoch * args.batch_size].reshape(steps_per_epoch, -1):
      refresh = None if refresh_schedule is None else refresh_schedule(step)
      loss, _ = train_step(model, optimizer, ds.x_train[idx], ds.y_train[idx], refresh=refresh)
      losses.append(loss)
      step += 1
    model.eval()  # BatchNorm: running statistics.
    test_loss, test_acc = evaluate(model, ds.x_test, ds.y_test)
    line = (f"epoch {epoch + 1:2d}  train loss {float(np.mean(jax.device_get(losses))):.4f}"
            f"  test loss {float(test_loss):.4f}  test acc {float(test_acc):.4f}")
    if args.optimizer == "xsam":
      eigenvalue = optax.tree.get(optimizer.opt_state, "eigenvalue")
      line += f"  X-SAM eigenvalue estimate {float(eigenvalue):.3f}"
    print(line, flush=True)
  return float(test_acc)


if __name__ == "__main__":
  main()
