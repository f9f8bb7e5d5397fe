"""Client-side training: one pure step, K of them in ``lax.scan``, all clients
in one ``jax.vmap``.

Shapes (``N`` clients, ``K`` steps, ``B`` batch, ``T`` tokens)::

  base         shared, never differentiated
  lora         [N, ...]       one adapter per client
  opt_state    [N, ...]       optax state per client
  batches      [K, N, B, T]   tokens / loss_mask / attention_mask, valid [K, N, B]

A step whose batch holds no valid example (a client with fewer examples than
the others, or past its own number of steps) changes nothing: neither the
adapter nor the optimizer state moves. A step whose loss or gradient is not
finite stops that client's updates for the rest of the call and marks the
client unhealthy, so the server can leave it out.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fdlora_jax.model import target_log_probs

PyTree = Any


def token_nll(model, base: PyTree, lora: PyTree, batch: dict,
              rng: jax.Array | None = None,
              num_targets: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum of next-token NLL over the ``loss_mask`` targets, and their count.

  ``batch``: ``tokens``, ``loss_mask``, ``attention_mask`` ``[B, T]`` and
  optionally ``valid`` ``[B]``. ``loss_mask`` marks target tokens (the
  answer). ``rng`` enables LoRA dropout; ``num_targets`` see
  :func:`fdlora_jax.model.target_log_probs`.
  """
  logp, mask = target_log_probs(
      model, {'params': base, 'lora': lora}, batch['tokens'],
      batch['loss_mask'], batch['attention_mask'], num_targets,
      rngs=None if rng is None else {'dropout': rng})
  if 'valid' in batch:
    mask = mask * batch['valid'][:, None].astype(jnp.float32)
  return -jnp.sum(logp * mask), jnp.sum(mask)


class StepMetrics(NamedTuple):
  loss: jax.Array        # mean NLL per target token of this step's batch
  tokens: jax.Array      # target tokens in the batch (0: nothing to learn)
  applied: jax.Array     # the update was applied
  nonfinite: jax.Array   # loss or gradient was NaN/inf


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def make_client_update(model, optimizer: optax.GradientTransformation,
                       dropout: bool = False,
                       num_targets: int | None = None) -> Callable:
  """``client_update(base, lora, opt_state, batches[K], rng)`` for one client.

  Runs ``K`` optimizer steps with ``lax.scan`` and returns
  ``(lora, opt_state, healthy, StepMetrics[K])``. ``num_targets``: logits
  only at that many target positions per row (``model.num_targets_bucket``).
  """

  def loss_fn(lora, base, batch, rng):
    total, count = token_nll(model, base, lora, batch,
                             rng if dropout else None, num_targets)
    return total / jnp.maximum(count, 1.0), count

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(base, carry, inputs):
    lora, opt_state, healthy = carry
    batch, rng = inputs
    (loss, count), grads = grad_fn(lora, base, batch, rng)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    apply = healthy & finite & (count > 0)
    updates, new_opt_state = optimizer.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    keep = lambda new, old: jnp.where(apply, new, old)
    lora = jax.tree.map(keep, new_lora, lora)
    opt_state = jax.tree.map(keep, new_opt_state, opt_state)
    healthy = healthy & (finite | (count == 0))
    return (lora, opt_state, healthy), StepMetrics(
        jnp.where(count > 0, loss, 0.0), count, apply, ~finite & (count > 0))

  def client_update(base, lora, opt_state, batches, rng):
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    rngs = jax.random.split(rng, num_steps)
    (lora, opt_state, healthy), metrics = jax.lax.scan(
        lambda c, x: step(base, c, x), (lora, opt_state, jnp.array(True)),
        (batches, rngs))
    return lora, opt_state, healthy, metrics

  return client_update


def make_clients_update(model, optimizer: optax.GradientTransformation,
                        dropout: bool = False, donate: bool = True
                        ) -> Callable:
  """All clients at once: ``vmap`` of :func:`make_client_update`, jitted.

  ``(base, lora[N], opt_state[N], batches[K, N, ...], rng[N],
  num_targets=None) -> (lora[N], opt_state[N], healthy[N], StepMetrics[N, K])``.
  The base is shared (``in_axes=None``); adapters and optimizer states are
  donated. ``num_targets`` is static (``model.num_targets_bucket`` of the
  loss mask); None computes logits at every position.
  """

  def many(base, lora, opt_state, batches, rngs, num_targets=None):
    one = make_client_update(model, optimizer, dropout, num_targets)
    return jax.vmap(one, in_axes=(None, 0, 0, 1, 0))(base, lora, opt_state,
                                                     batches, rngs)

  return jax.jit(many, static_argnames=('num_targets',),
                 donate_argnums=(1, 2) if donate else ())


def init_opt_states(optimizer: optax.GradientTransformation,
                    lora: PyTree) -> PyTree:
  """Optimizer states for stacked adapters ``[N, ...]``."""
  return jax.jit(jax.vmap(optimizer.init))(lora)
