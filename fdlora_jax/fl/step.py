"""The compiled client step: :class:`Forward` (the model as a loss sees it)
and one ``jit`` of a ``vmap`` over clients of a ``lax.scan`` over the K local
steps, the base shared (``in_axes=None``), the trained tree and its optimizer
state donated.

Inside the step: step masks (a client with fewer examples, or past its own
number of steps, changes nothing), the non-finite guard (a client whose loss
or gradient turns NaN/inf stops for the round and keeps its previous state),
elementwise ``trainable`` masks (frozen entries stay bit-identical) and
gradient accumulation. :mod:`fdlora_jax.fl.engine` builds one such step per
training phase; :func:`sft_clients_update` is the plain case (one adapter,
token NLL) for tests, benchmarks and the API docs.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fdlora_jax.fl import losses
from fdlora_jax.fl.api import Loss, PyTree, Trainable
from fdlora_jax.model import positions_from_mask, target_log_probs

# ---------------------------------------------------------------------------
# The model as a loss sees it
# ---------------------------------------------------------------------------
class Forward(NamedTuple):
  """The frozen base applied with an adapter, inside the compiled step.

  ``step``: the local step within the repeat (0-based, traced), as
  ``Trainable`` sees it; None outside the step loop. A loss whose forward
  changes between parts of a round reads it (FedDPA: the local adapter's
  steps, then the global one's)."""
  model: Any
  base: PyTree
  num_targets: Optional[int]
  dropout: bool
  step: Optional[jax.Array] = None

  def target_log_probs(self, lora, batch, rng=None):
    """``(logp [B, A], mask [B, A])`` at the ``loss_mask`` targets; padded
    rows (``valid`` 0) are masked."""
    logp, mask = target_log_probs(
        self.model, {'params': self.base, 'lora': lora}, batch['tokens'],
        batch['loss_mask'], batch['attention_mask'], self.num_targets,
        rngs={'dropout': rng} if (self.dropout and rng is not None) else None)
    if 'valid' in batch:
      mask = mask * batch['valid'][:, None].astype(jnp.float32)
    return logp, mask

  def option_logits(self, lora, batch, option_ids, rng=None):
    """``[B, O]`` logits of each option's first token at the position that
    predicts the answer's first token (the first ``loss_mask`` token), and
    ``[B]`` the label: the option whose first token is the answer's."""
    first = jnp.argmax(batch['loss_mask'] > 0, axis=-1)               # [B]
    at = jnp.maximum(first - 1, 0)[:, None]                           # [B, 1]
    kwargs = {}
    if self.dropout and rng is not None:
      kwargs = dict(deterministic=False, rngs={'dropout': rng})
    logits = self.model.apply(
        {'params': self.base, 'lora': lora}, batch['tokens'],
        batch['attention_mask'], positions_from_mask(batch['attention_mask']),
        logits_at=at, **kwargs)[:, 0].astype(jnp.float32)
    answer = jnp.take_along_axis(batch['tokens'], first[:, None], 1)[:, 0]
    label = jnp.argmax(answer[:, None] == jnp.asarray(option_ids)[None], -1)
    return logits[:, jnp.asarray(option_ids)], label

  def nll(self, lora, batch, rng=None):
    """Mean next-token NLL over the targets, and their count."""
    return losses.mean_nll(*self.target_log_probs(lora, batch, rng))


class StepMetrics(NamedTuple):
  loss: jax.Array        # mean loss of this step's batch
  tokens: jax.Array      # target tokens in the batch (0: nothing to learn)
  applied: jax.Array     # the update was applied
  nonfinite: jax.Array   # loss or gradient was NaN/inf


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def accumulated_value_and_grad(loss: Callable, train: PyTree, batch: dict,
                               rng: jax.Array, accum: int = 1):
  """``((mean loss, count), grads)`` of ``loss(train, batch, rng)`` over the
  whole ``[B, ...]`` batch, computed in ``accum`` micro-batches of
  ``B / accum`` rows (gradient accumulation: the activations of one
  micro-batch at a time are live).

  Each micro-batch's mean and gradient are weighted by its target count, so
  for a loss that is a mean over its count (plus terms that do not depend on
  the batch, e.g. a proximal pull) the result equals the whole batch's up to
  float rounding. Dropout draws a key per micro-batch.
  """
  grad_fn = jax.value_and_grad(loss, has_aux=True)
  if accum == 1:
    return grad_fn(train, batch, rng)
  b = jax.tree.leaves(batch)[0].shape[0]
  if b % accum:
    raise ValueError(f'batch of {b} rows does not split into {accum} '
                     'micro-batches (fl.grad_accum must divide fl.batch_size)')
  micro = jax.tree.map(
      lambda x: x.reshape((accum, b // accum) + x.shape[1:]), batch)

  def body(acc, inputs):
    total, count, grads = acc
    (v, n), g = grad_fn(train, *inputs)
    w = n.astype(jnp.float32)
    some = n > 0      # an empty micro-batch adds nothing (not even a NaN)
    total = total + jnp.where(some, v * w, 0.0)
    grads = jax.tree.map(      # summed in float32 whatever the params'
        lambda a, x: a + jnp.where(some, x.astype(jnp.float32) * w, 0.0),
        grads, g)
    return (total, count + w, grads), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train)
  (total, count, grads), _ = jax.lax.scan(
      body, (jnp.float32(0), jnp.float32(0), zeros),
      (micro, jax.random.split(rng, accum)))
  denom = jnp.maximum(count, 1.0)
  return (total / denom, count), jax.tree.map(
      lambda g, x: (g / denom).astype(x.dtype), grads, train)


def make_client_update(loss: Loss, optimizer: optax.GradientTransformation,
                       trainable: Optional[Trainable] = None,
                       grad_accum: int = 1) -> Callable:
  """``update(fwd, train, opt_state, download, batches[K], rng)`` for one
  client: K optimizer steps in ``lax.scan``, each over its batch in
  ``grad_accum`` micro-batches (:func:`accumulated_value_and_grad`).

  Returns ``(train, opt_state, healthy, StepMetrics[K])``. A step with no
  target token changes nothing; a non-finite step stops the client.
  """

  def step(fwd, download, carry, inputs):
    train, opt_state, healthy = carry
    batch, rng, i = inputs
    fwd_i = fwd._replace(step=i)
    (value, count), grads = accumulated_value_and_grad(
        lambda t, b, r: loss(fwd_i, t, download, b, r), train, batch, rng,
        grad_accum)
    finite = jnp.isfinite(value) & _all_finite(grads)
    apply = healthy & finite & (count > 0)
    mask = None if trainable is None else trainable(train, i)
    if mask is not None:
      grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, mask)
    updates, new_opt = optimizer.update(grads, opt_state, train)
    new_train = optax.apply_updates(train, updates)
    if mask is not None:   # frozen entries stay bit-identical
      new_train = jax.tree.map(lambda n, o, m: jnp.where(m, n, o), new_train,
                               train, mask)
    keep = lambda new, old: jnp.where(apply, new, old)
    train = jax.tree.map(keep, new_train, train)
    opt_state = jax.tree.map(keep, new_opt, opt_state)
    healthy = healthy & (finite | (count == 0))
    return (train, opt_state, healthy), StepMetrics(
        jnp.where(count > 0, value, 0.0), count, apply, ~finite & (count > 0))

  def update(fwd, train, opt_state, download, batches, rng, step0=0):
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    rngs = jax.random.split(rng, num_steps)
    (train, opt_state, healthy), metrics = jax.lax.scan(
        lambda c, x: step(fwd, download, c, x),
        (train, opt_state, jnp.array(True)),
        (batches, rngs, step0 + jnp.arange(num_steps, dtype=jnp.int32)))
    return train, opt_state, healthy, metrics

  return update


def make_clients_update(model, loss: Loss,
                        optimizer: optax.GradientTransformation,
                        trainable: Optional[Trainable] = None,
                        dropout: bool = False, donate: bool = True,
                        grad_accum: int = 1) -> Callable:
  """All clients in one compiled step.

  ``(base, train[N], opt[N], download[N], batches[K, N, ...], rng[N],
  step0=0, num_targets=None) -> (train[N], opt[N], healthy[N],
  StepMetrics[N, K])``; ``step0`` numbers the first of the K steps within
  the repeat (for ``trainable``).
  """
  one = make_client_update(loss, optimizer, trainable, grad_accum)

  def many(base, train, opt_state, download, batches, rngs, step0=0,
           num_targets=None):
    fwd = Forward(model, base, num_targets, dropout)
    return jax.vmap(lambda *a: one(fwd, *a, step0=step0),
                    in_axes=(0, 0, 0, 1, 0))(
                        train, opt_state, download, batches, rngs)

  return jax.jit(many, static_argnames=('num_targets',),
                 donate_argnums=(1, 2) if donate else ())



# ---------------------------------------------------------------------------
# Optimizer of the local steps (c.fl)
# ---------------------------------------------------------------------------
INNER_SCHEDULES = ('constant', 'cosine', 'linear')
INNER_OPTIMIZERS = ('adamw', 'sgd')


def inner_optimizer(fl_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (or plain SGD) with the configured learning-rate schedule."""
  lr = fl_cfg.inner_lr
  warmup = int(fl_cfg.inner_warmup_steps)
  kind = fl_cfg.inner_schedule
  if kind == 'constant':
    schedule = optax.constant_schedule(lr)
    if warmup:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])
  else:
    decay = max(total_steps - warmup, 1)
    tail = (optax.cosine_decay_schedule(lr, decay) if kind == 'cosine'
            else optax.linear_schedule(lr, 0.0, decay))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), tail],
        [max(warmup, 1)]) if warmup else tail
  if fl_cfg.inner_optimizer == 'sgd':
    return optax.sgd(schedule)
  return optax.adamw(schedule, b1=fl_cfg.inner_b1, b2=fl_cfg.inner_b2,
                     weight_decay=fl_cfg.inner_weight_decay)


# ---------------------------------------------------------------------------
# The plain case: one adapter, token NLL (tests and benchmarks)
# ---------------------------------------------------------------------------
def sft_clients_update(model, optimizer: optax.GradientTransformation,
                       dropout: bool = False, donate: bool = True,
                       grad_accum: int = 1) -> Callable:
  """``(base, lora[N], opt[N], batches[K, N, ...], rng[N], num_targets=None)
  -> (lora[N], opt[N], healthy[N], StepMetrics[N, K])``: every client trains
  its whole adapter on the token NLL."""
  many = make_clients_update(model, losses.token_nll, optimizer,
                             dropout=dropout, donate=False,
                             grad_accum=grad_accum)

  def update(base, lora, opt_state, batches, rngs, num_targets=None):
    return many(base, lora, opt_state, None, batches, rngs,
                num_targets=num_targets)
  # Jitted itself (the inner jit inlines), so callers can ``.lower`` it.
  return jax.jit(update, static_argnames=('num_targets',),
                 donate_argnums=(1, 2) if donate else ())


def sft_client_update(model, optimizer: optax.GradientTransformation,
                      dropout: bool = False,
                      num_targets: Optional[int] = None) -> Callable:
  """One client's ``(base, lora, opt, batches[K], rng)`` (not jitted)."""
  one = make_client_update(losses.token_nll, optimizer)

  def update(base, lora, opt_state, batches, rng):
    return one(Forward(model, base, num_targets, dropout), lora, opt_state,
               None, batches, rng)
  return update


def init_opt_states(optimizer: optax.GradientTransformation,
                    lora: PyTree) -> PyTree:
  """Optimizer states for stacked trees ``[N, ...]``."""
  return jax.jit(jax.vmap(optimizer.init))(lora)
