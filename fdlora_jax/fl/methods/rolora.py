"""RoLoRA (Chen, Li, Liu and Ma, "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA", 2025).

The clients optimise one factor at a time, in turns: in a round where ``b``
(PEFT's ``lora_B``) trains, ``a`` is frozen at the global one on every
client, and the other way round. The frozen factor is the same everywhere, so
the server's mean of the trained factor is the mean of the clients' products
exactly: ``mean_i(a b_i) = a mean_i(b_i)``. Each client uploads only the
factor it trained; the server sets that factor to the weighted mean
(``weighting``) and keeps the other.

Which factor repeat ``t`` trains (:func:`trains_b`): ``b`` in the stage-1
``local`` phase (``t = 0``) and every odd round, ``a`` in every even round.
``b`` goes first because a fresh adapter has ``b = 0``, where ``a``'s
gradient is exactly zero. Evaluated: ``global`` on every client. Choices:
docs/methods.md, "Choices per method".

Server state ``{'a', 'b'}``; no client state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import (replace_step, validate_weighting,
                                  weighted_mean, weighting_config)

NAME = 'rolora'


def config() -> ml_collections.ConfigDict:
  return weighting_config()       # weighting: 'examples' | 'uniform'


def validate(c) -> None:
  validate_weighting(c, NAME)


def trains_b(t) -> jax.Array:
  """Whether repeat ``t`` (0: the local stage) trains ``b`` (else ``a``)."""
  t = jnp.asarray(t)
  return (t == 0) | (t % 2 == 1)


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients

  def init(key):
    a, b = lora_lib.split_factors(s.lora_init(key))
    return {'a': a, 'b': b}, {}

  def broadcast(state, t):
    return dict(state, on_b=trains_b(t).astype(jnp.float32))

  def start(client, download):
    return download

  def loss(fwd, train, download, batch, rng):
    return fwd.nll(lora_lib.join_factors(train['a'], train['b']), batch, rng)

  def trainable(train, i):
    on_b = train['on_b'] > 0
    return {'a': jax.tree.map(lambda x: ~on_b, train['a']),
            'b': jax.tree.map(lambda x: on_b, train['b']),
            'on_b': jnp.array(False)}

  def finish(client, train, download, t):
    return client, train

  def wire_bytes(upload):
    """Only the factor the round trained leaves the client."""
    return jnp.where(upload['on_b'] > 0, lora_lib.num_bytes(upload['b']),
                     lora_lib.num_bytes(upload['a']))

  def server(state, uploads, weights, t):
    on_b = trains_b(t)
    mean = weighted_mean({'a': uploads['a'], 'b': uploads['b']}, weights)
    new = {'a': jax.tree.map(lambda m, x: jnp.where(on_b, x, m),
                             mean['a'], state['a']),
           'b': jax.tree.map(lambda m, x: jnp.where(on_b, m, x),
                             mean['b'], state['b'])}
    # With every weight 0 the state stays as it is.
    keep = jnp.sum(weights) > 0
    new = jax.tree.map(lambda x, y: jnp.where(keep, x, y), new, state)
    return replace_step(state, new, weights)

  common = dict(broadcast=broadcast, start=start, loss=loss,
                trainable=trainable, finish=finish, server=server,
                dp_reference=downloaded, wire_bytes=wire_bytes,
                download_bytes=lambda d: lora_lib.num_bytes(
                    lora_lib.join_factors(d['a'], d['b'])))
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    return {'global': lora_lib.replicate(lora_lib.join_factors(state['a'], state['b']), n)}
  return Method(NAME, init, phases, rows, progress_rows=rows,
                client_weights=s.example_weights(c.rolora.weighting))
