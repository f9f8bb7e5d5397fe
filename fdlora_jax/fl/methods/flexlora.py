"""FlexLoRA (Bai, Chen, Qian, Yao and Li, "Federated Fine-tuning of Large
Language Models under Heterogeneous Tasks and Client Resources", NeurIPS
2024).

Clients have heterogeneous ranks (``ranks``, cycled; padded and masked by
the engine's :class:`~fdlora_jax.fl.ranks.ClientRanks`). Each round a client
downloads its own adapter, trains it for K local steps and uploads it. The
server forms the weighted full-size update ``W = sum_i p_i a_i b_i`` and
sends each client the truncated SVD of ``W`` at that client's own rank, the
best rank-``r_i`` approximation (Eckart-Young). ``W`` is never formed as an
``[in, out]`` matrix: the uploads are stacked on the rank axis and
:func:`~fdlora_jax.fl.ranks.truncated` takes the SVD from their QR factors.
The server keeps the top ``max(ranks)`` components; client ``i``'s download
is their first ``r_i``, counted on the wire at ``r_i``. As for FedAvg, a
first ``local`` phase takes the stage-1 steps and ends with the first
aggregation. Evaluated: ``global``, each client's rank-``r_i`` download.
Choices: docs/methods.md.

Server state ``{'global'}`` (rank ``max(ranks)``, sorted by singular value,
in the model's scale); no client state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.methods import flora
from fdlora_jax.fl.ranks import ClientRanks, stacked, truncated
from fdlora_jax.fl.server import replace_step

NAME = 'flexlora'


def config() -> ml_collections.ConfigDict:
  """FLoRA's fields: ``ranks`` (cycled; (): lora.rank for all),
  ``scale_per_rank``, ``weighting`` (the ``p_i`` of ``W``)."""
  return flora.config()


def validate(c) -> None:
  flora.validate_fields(c, NAME)


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients
  ranks = flora.client_ranks(s, c.flexlora)
  rank_n = jnp.asarray(ranks.ranks)

  def init(key):
    return {'global': lora_lib.init_rank(s.model, ranks.width, key)}, {}

  def broadcast(state, t):
    """Client ``i``'s first ``r_i`` components, in its own scale."""
    g = lora_lib.replicate(state['global'], n)
    return {'lora': ranks.unapplied(g, rank_n), 'rank': rank_n}

  def loss(fwd, train, download, batch, rng):
    return fwd.nll(ranks.own(train), batch, rng)

  def server(state, uploads, weights, t):
    new = truncated(stacked(uploads['lora'], weights), ranks.width)
    keep = jnp.sum(weights) > 0
    new = jax.tree.map(lambda x, y: jnp.where(keep, x, y), new,
                       state['global'])
    g, metrics = replace_step(state['global'], new, weights)
    return {'global': g}, metrics

  common = dict(
      broadcast=broadcast, personal_download=True,
      start=lambda client, download: ranks.train(download['lora'],
                                                 download['rank']),
      loss=loss, trainable=lambda train, i: ranks.train_mask(train),
      finish=lambda client, train, download, t: (client, ranks.upload(train)),
      server=server, wire_bytes=ClientRanks.upload_bytes,
      download_bytes=ClientRanks.upload_bytes)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    g = lora_lib.replicate(state['global'], n)
    return {'global': ranks.applied(ranks.unapplied(g, rank_n), rank_n)}
  return Method(NAME, init, phases, rows, progress_rows=rows,
                client_weights=s.example_weights(c.flexlora.weighting))
