"""FFA-LoRA (Sun, Li, Li and Ding, "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024).

``a`` (PEFT's ``lora_A``) is frozen at its random initialisation, the same
draw on every client (a shared seed, so it is never sent); only ``b`` trains
and is uploaded. The server sets ``b`` to the weighted mean of the uploads
(``weighting``), and because every client's ``a`` is the same the aggregate
is exact: ``mean_i(a b_i) = a mean_i(b_i)``. As for FedAvg, a first
``local`` phase trains each client's copy for the stage-1 steps before the
T rounds, so every method takes the same number of local steps. Evaluated:
``global``, the frozen ``a`` with the mean ``b``, on every client.
Choices: docs/methods.md, "Choices per method".

Server state ``{'a', 'b'}`` (``a`` never changes; the download carries it
but only ``b`` is counted on the wire, as every client draws ``a`` from the
shared seed); no client state.
"""

from __future__ import annotations

import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.server import (mean_step, validate_weighting,
                                  weighting_config)

NAME = 'ffa_lora'


def config() -> ml_collections.ConfigDict:
  return weighting_config()       # weighting: 'examples' | 'uniform'


def validate(c) -> None:
  validate_weighting(c, NAME)


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients

  def init(key):
    a, b = lora_lib.split_factors(s.lora_init(key))
    return {'a': a, 'b': b}, {}

  def loss(fwd, train, download, batch, rng):
    return fwd.nll(lora_lib.join_factors(download['a'], train), batch, rng)

  def server(state, uploads, weights, t):
    b, metrics = mean_step(state['b'], uploads, weights)
    return dict(state, b=b), metrics

  common = dict(broadcast=lambda state, t: state,
                # Every client draws the same ``a`` from the shared seed:
                # only ``b`` is sent.
                download_bytes=lambda download: lora_lib.num_bytes(
                    download['b']),
                start=lambda client, download: download['b'],
                loss=loss,
                finish=lambda client, train, download, t: (client, train),
                server=server,
                # Under DP the update is b's change: a never moves.
                dp_reference=lambda client, download: download['b'])
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    return {'global': lora_lib.replicate(lora_lib.join_factors(state['a'], state['b']), n)}
  return Method(NAME, init, phases, rows, progress_rows=rows,
                client_weights=s.example_weights(c.ffa_lora.weighting))
