"""FLoRA (Wang, Shen, Li, Zhang, Lin, Lyu and Shao, "FLoRA: Federated
Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024).

Each round every client starts a fresh LoRA of its own rank (``ranks``,
cycled over the clients; padded and masked by the engine's
:class:`~fdlora_jax.fl.ranks.ClientRanks`), trains it for K local steps on
top of everything merged so far, and uploads it. The server stacks the
uploads along the rank axis, ``a`` side by side and ``p_i b_i`` below each
other, so the aggregate is ``sum_i p_i a_i b_i`` exactly, whatever the
ranks. The stack is sent to every client and merged into its effective
base; the next round starts fresh adapters again.

The merged stacks are the method's own state, a preallocated
:class:`~fdlora_jax.fl.ranks.Stack` of one slot per repeat (the shared base
is never written). A download is the stack added since the last round:
``sum_i r_i`` components, growing with the clients and their ranks as the
paper describes. As for FedAvg, a first ``local`` phase (a FLoRA round of
the stage-1 steps) comes before the T rounds. Evaluated: ``global``, the
base with every merged stack, on every client. Choices: docs/methods.md.

Server state ``{'stack' (rank (T + 1) N max(ranks)), 'sent' (real
components in the last slot)}``; client state ``{'index', 'rank'} [N]``.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.ranks import (ClientRanks, Stack, cycled, delta_norm,
                                 stacked, validate_ranks)
from fdlora_jax.fl.server import validate_weighting

NAME = 'flora'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.ranks = ()              # client i: ranks[i % len]; (): lora.rank for all
  c.scale_per_rank = True   # client i's adapter at alpha / r_i (PEFT)
  c.weighting = 'examples'  # stacking weights p_i: 'examples' | 'uniform'
  return c


def validate(c) -> None:
  validate_fields(c, NAME)


def validate_fields(c, name: str) -> None:
  """``ranks``, ``scale_per_rank`` and ``weighting`` of block ``name``."""
  block = c[name]
  if isinstance(block.ranks, str) or len(tuple(block.ranks)):
    validate_ranks(block.ranks, f'{name}.ranks')
  need(isinstance(block.scale_per_rank, bool), f'{name}.scale_per_rank',
       block.scale_per_rank, 'must be true or false')
  validate_weighting(c, name)


def client_ranks(s: Setup, block) -> ClientRanks:
  """The clients' ranks of ``block`` (FLoRA's or FlexLoRA's fields)."""
  values = tuple(block.ranks) or (int(s.model.lora.rank),)
  return ClientRanks(cycled(values, s.num_clients), int(s.model.lora.rank),
                     bool(block.scale_per_rank))


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients
  ranks = client_ranks(s, c.flora)
  stack = Stack(slots=1 + int(c.fl.rounds), width=n * ranks.width)
  keys = s.keys

  def init(key):
    return ({'stack': stack.zeros(s.model), 'sent': jnp.int32(0)},
            {'index': jnp.arange(n, dtype=jnp.int32),
             'rank': jnp.asarray(ranks.ranks)})

  def broadcast(state, t):
    return dict(state, round=t)

  def start(client, download):
    key = keys.fresh(download['round'], client['index'])
    return ranks.train(ranks.fresh(s.model, key, client['rank']),
                       client['rank'])

  def loss(fwd, train, download, batch, rng):
    return fwd.nll(Stack.on(download['stack'], ranks.own(train)), batch, rng)

  def server(state, uploads, weights, t):
    part = stacked(uploads['lora'], weights)
    new = {'stack': stack.write(state['stack'], t, part),
           'sent': jnp.sum(jnp.where(weights > 0, uploads['rank'], 0)
                           ).astype(jnp.int32)}
    return new, {'delta_norm': delta_norm(part),
                 'participants': jnp.sum(weights > 0),
                 'stacked_rank': new['sent']}

  common = dict(
      broadcast=broadcast, start=start, loss=loss,
      trainable=lambda train, i: ranks.train_mask(train),
      finish=lambda client, train, download, t: (client, ranks.upload(train)),
      server=server, wire_bytes=ClientRanks.upload_bytes,
      # The slot stacked since the last round, its real components only (a
      # client keeps the slots it merged before).
      download_bytes=lambda d: lora_lib.rank_bytes(d['stack'], d['sent']))
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    return {'global': lora_lib.replicate(state['stack'], n)}
  return Method(NAME, init, phases, rows, progress_rows=rows,
                client_weights=s.example_weights(c.flora.weighting))

