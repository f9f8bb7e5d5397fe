"""FedEx-LoRA (Singhal, Ponkshe and Vepakomma, "FedEx-LoRA: Exact
Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
2025).

FedAvg of ``a`` and ``b`` separately is not the mean of the clients'
products: ``mean_i(a_i b_i) != mean_i(a_i) mean_i(b_i)``. FedEx-LoRA
averages the factors as FedAvg does and adds the difference, the residual

    sum_i p_i a_i b_i - (sum_i p_i a_i)(sum_i p_i b_i)
      = sum_i p_i (a_i - mean a)(b_i - mean b)

to the frozen weights of the adapted matrices, so the model after a round
is the base plus the weighted mean of the clients' updates, exactly.

Here the residual is the method's own state (the shared base is never
written): the right-hand form above is rank ``N r``, kept as low-rank
factors in a preallocated :class:`~fdlora_jax.fl.ranks.Stack` of one slot
per repeat, and applied with the adapter on the rank axis. Each round a
client downloads the global adapter and the residual and trains its copy of
the adapter on top of both; only the slot added since the last round is
counted on the wire. As for FedAvg, a first ``local`` phase takes the
stage-1 steps and ends with the first aggregation. Evaluated: ``global``
(base + residual + global adapter) on every client. Choices and memory:
docs/methods.md.

Server state ``{'global', 'residual' (rank (T + 1) N r), 'sent' (components
written by the last aggregation)}``; no client state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.losses import token_nll
from fdlora_jax.fl.ranks import Stack, delta_norm, stacked
from fdlora_jax.fl.server import (replace_step, validate_weighting,
                                  weighted_mean, weighting_config)

NAME = 'fedex_lora'


def config() -> ml_collections.ConfigDict:
  return weighting_config()       # weighting: 'examples' | 'uniform'


def validate(c) -> None:
  validate_weighting(c, NAME)


def residual(uploads, weights, mean) -> dict:
  """``sum_i p_i (a_i - mean a)(b_i - mean b)`` as one adapter of rank
  ``N r`` (``mean``: the weighted mean of the uploads)."""
  centred = jax.tree.map(lambda u, m: u - m[None], uploads, mean)
  return stacked(centred, weights)


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients
  r = int(s.model.lora.rank)
  stack = Stack(slots=1 + int(c.fl.rounds), width=n * r)

  def init(key):
    return {'global': s.lora_init(key), 'residual': stack.zeros(s.model),
            'sent': jnp.int32(0)}, {}

  def loss(fwd, train, download, batch, rng):
    return token_nll(fwd, Stack.on(download['residual'], train), download,
                     batch, rng)

  def server(state, uploads, weights, t):
    some = jnp.sum(weights) > 0          # all 0: nothing changes
    mean = jax.tree.map(lambda m, x: jnp.where(some, m, x),
                        weighted_mean(uploads, weights), state['global'])
    g, metrics = replace_step(state['global'], mean, weights)
    part = residual(uploads, weights, g)
    new = {'global': g, 'residual': stack.write(state['residual'], t, part),
           'sent': (jnp.sum(weights > 0) * r).astype(jnp.int32)}
    metrics['residual_norm'] = delta_norm(part)
    return new, metrics

  def download_bytes(download):
    """The global adapter and the residual slot added since the last round
    (a client keeps the earlier slots)."""
    return (lora_lib.num_bytes(download['global']) +
            lora_lib.rank_bytes(download['residual'], download['sent']))

  common = dict(broadcast=lambda state, t: state,
                download_bytes=download_bytes,
                start=lambda client, download: download['global'],
                loss=loss,
                finish=lambda client, train, download, t: (client, train),
                server=server)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    return {'global': lora_lib.replicate(
        Stack.on(state['residual'], state['global']), n)}
  return Method(NAME, init, phases, rows, progress_rows=rows,
                client_weights=s.example_weights(c.fedex_lora.weighting))
