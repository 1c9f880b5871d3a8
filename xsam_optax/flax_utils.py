"""Flax Linen: a ``TrainState`` whose ``apply_gradients`` forwards ``grad_fn``.

Imported on its own (``from xsam_optax.flax_utils import TrainState``), so
that ``import xsam_optax`` does not need Flax.
"""

import collections.abc
import dataclasses

import optax

try:
  from flax.training import train_state as _train_state
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError(
      "xsam_optax.flax_utils needs Flax: pip install flax (or "
      "'xsam-optax[flax]').") from e

_OVERWRITE_WITH_GRADIENT = getattr(_train_state, "OVERWRITE_WITH_GRADIENT",
                                   None)


class TrainState(_train_state.TrainState):
  """``flax.training.train_state.TrainState`` that passes extras to ``tx``.

  Flax's ``apply_gradients(grads=..., **kwargs)`` hands every extra keyword
  to ``.replace()``, so ``grad_fn=`` never reaches ``tx.update`` and X-SAM
  cannot run. Here keywords that name a field of the state (``batch_stats``
  in a subclass, say) still go to ``.replace()``; every other keyword
  (``grad_fn``, ``refresh``, ``check_incoming``, ...) goes to
  ``tx.update``. Otherwise it is Flax's class: ``create``, ``step``,
  ``params``, ``opt_state``, subclassing and serialisation are unchanged.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> import xsam_optax
    >>> from xsam_optax.flax_utils import TrainState
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> state = TrainState.create(apply_fn=model.apply, params=params,
    ...                           tx=xsam_optax.xsam(optax.sgd(0.1)))
    >>> loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    >>> grad_fn = jax.grad(loss)
    >>> state = state.apply_gradients(grads=grad_fn(state.params),
    ...                               grad_fn=grad_fn)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads, **kwargs):
    """One optimizer step; extras go to ``tx.update`` or ``.replace()``.

    Args:
      grads: the gradient, shaped like ``params``.
      **kwargs: keywords naming a field of the state are ``.replace()``-d;
        the others (``grad_fn``, ``refresh``, ...) are passed to
        ``tx.update``.

    Returns:
      The state with ``step`` incremented and ``params`` and ``opt_state``
      updated.
    """
    fields = {f.name for f in dataclasses.fields(self)}
    replaced = {k: v for k, v in kwargs.items() if k in fields}
    extras = {k: v for k, v in kwargs.items() if k not in fields}
    overwrite = (_OVERWRITE_WITH_GRADIENT is not None
                 and isinstance(grads, collections.abc.Mapping)
                 and _OVERWRITE_WITH_GRADIENT in grads)
    # Flax's fp8 convention: those entries are replaced by their gradient.
    grads_to_apply = grads["params"] if overwrite else grads
    params = self.params["params"] if overwrite else self.params
    updates, opt_state = self.tx.update(grads_to_apply, self.opt_state, params,
                                        **extras)
    params = optax.apply_updates(params, updates)
    if overwrite:
      params = {"params": params,
                _OVERWRITE_WITH_GRADIENT: grads[_OVERWRITE_WITH_GRADIENT]}
    return self.replace(step=self.step + 1, params=params,
                        opt_state=opt_state, **replaced)
