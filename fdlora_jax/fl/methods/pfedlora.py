"""pFedLoRA (Yi, Yu, Wang, Liu and Li, "pFedLoRA: Model-Heterogeneous
Personalized Federated Learning with LoRA Tuning", arXiv:2310.13283, 2023).

In the paper every client owns a heterogeneous local model with a small
homogeneous adapter inserted; only the adapter is uploaded and
FedAvg-aggregated, and each round alternates training the local model (the
adapter frozen) and the adapter (the local model frozen).

Here the heterogeneous local model is a private LoRA whose rank differs per
client (``private_ranks``, cycled over the clients), padded to the largest
rank and masked (the engine's :class:`fdlora_jax.fl.ranks.ClientRanks`), and the homogeneous
adapter is a shared LoRA of rank ``shared_rank``; the model applies both,
concatenated on the rank axis. With ``scale_per_rank`` each part is scaled
``alpha / its own rank``, as PEFT would scale it.

Phases: ``local`` (each client trains its private LoRA alone) and
``rounds``: each client downloads the shared adapter, trains its private
LoRA for ``private_steps`` steps (-1: ceil(K / 2)), then the shared adapter;
only the shared adapter is uploaded, and the server takes the weighted mean
(``weighting``). Evaluated: ``personalized`` (private + shared, the
headline) and ``shared``. Choices: docs/methods.md, "Choices per method".

Server state ``{'shared'}``; client state ``{'private' [N] (rank R),
'rank' [N]}`` (the rank rides in the trained tree as a frozen scalar).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.ranks import ClientRanks, cycled, validate_ranks
from fdlora_jax.fl.server import (replace_step, validate_weighting,
                                  weighted_mean)

NAME = 'pfedlora'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.private_ranks = (4, 8, 16, 32, 64)  # client i: private_ranks[i % len]
  c.shared_rank = 4          # the homogeneous adapter's rank
  c.private_steps = -1       # steps per round on the private part; -1: ceil(K/2)
  c.scale_per_rank = True    # each part scaled alpha / its own rank (PEFT)
  c.weighting = 'examples'   # server mean: 'examples' (FedAvg) | 'uniform'
  return c


def validate(c) -> None:
  m = c.pfedlora
  validate_ranks(m.private_ranks, 'pfedlora.private_ranks')
  need(isinstance(m.shared_rank, (int, np.integer)) and m.shared_rank > 0,
       'pfedlora.shared_rank', m.shared_rank, 'must be a positive integer')
  need(isinstance(m.private_steps, (int, np.integer)) and m.private_steps >= -1,
       'pfedlora.private_steps', m.private_steps,
       'must be an integer >= 0 (-1: ceil(K / 2))')
  need(isinstance(m.scale_per_rank, bool), 'pfedlora.scale_per_rank',
       m.scale_per_rank, 'must be true or false')
  validate_weighting(c, NAME)


def client_ranks(c, n: int) -> np.ndarray:
  """``[N]`` private rank of each client: ``private_ranks`` cycled."""
  return cycled(c.pfedlora.private_ranks, n)


def build(s: Setup) -> Method:
  c, m, n = s.config, s.config.pfedlora, s.num_clients
  ranks = ClientRanks(client_ranks(c, n), s.model.lora.rank,
                      bool(m.scale_per_rank))
  shared_rank = int(m.shared_rank)
  round_steps = s.steps(c.fl.inner_steps, c.fl.inner_unit)
  k = int(np.max(round_steps, initial=0))
  private_steps = math.ceil(k / 2) if m.private_steps < 0 else int(
      m.private_steps)

  def adapter(private, shared, rank):
    """What the model applies: private (masked) and shared on one rank axis."""
    return lora_lib.concat_rank(ranks.applied(private, rank),
                                ranks.applied(shared, shared_rank))

  def init(key):
    k_private, k_shared = jax.random.split(key)
    private = ranks.init(s.model, k_private)
    shared = lora_lib.init_rank(s.model, shared_rank, k_shared)
    return {'shared': shared}, {'private': private,
                                'rank': jnp.asarray(ranks.ranks)}

  # -- phase 1: the private LoRA alone ------------------------------------------
  def local_start(client, download):
    return {'private': client['private'],
            'rank': client['rank'].astype(jnp.float32)}

  def local_loss(fwd, train, download, batch, rng):
    return fwd.nll(ranks.applied(train['private'], train['rank']), batch, rng)

  def local_trainable(train, i):
    return {'private': ranks.trainable(train['private'], train['rank']),
            'rank': jnp.array(False)}

  def local_finish(client, train, download, t):
    return dict(client, private=train['private']), None

  # -- phase 2: rounds, private steps then shared steps --------------------------
  def round_start(client, download):
    return dict(local_start(client, download), shared=download)

  def round_loss(fwd, train, download, batch, rng):
    return fwd.nll(adapter(train['private'], train['shared'], train['rank']),
                   batch, rng)

  def round_trainable(train, i):
    on_private = i < private_steps
    return {'private': jax.tree.map(
                lambda mk: mk & on_private,
                ranks.trainable(train['private'], train['rank'])),
            'shared': jax.tree.map(lambda x: ~on_private, train['shared']),
            'rank': jnp.array(False)}

  def round_finish(client, train, download, t):
    return dict(client, private=train['private']), train['shared']

  def server(state, uploads, weights, t):
    shared, metrics = replace_step(state['shared'],
                                   weighted_mean(uploads, weights), weights)
    return {'shared': shared}, metrics

  def rows(state, client):
    shared = lora_lib.replicate(state['shared'], n)
    return {'personalized': adapter(client['private'], shared,
                                    client['rank']),
            'shared': ranks.applied(shared, shared_rank)}

  phases = (
      s.local_phase(start=local_start, loss=local_loss,
                    trainable=local_trainable, finish=local_finish),
      s.round_phase(steps=round_steps,
                    broadcast=lambda state, t: state['shared'],
                    start=round_start, loss=round_loss,
                    trainable=round_trainable, finish=round_finish,
                    server=server, dp_reference=downloaded),
  )
  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=lambda state, client: {
                    'personalized': rows(state, client)['personalized']},
                client_weights=weights)
