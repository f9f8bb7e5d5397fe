"""FedAvg (McMahan et al., AISTATS 2017) on one LoRA adapter.

One adapter is shared by all clients. Each round every client downloads it,
trains its copy for K local steps and uploads it; the server takes the
example-weighted mean of the uploads (``weighting='examples'``) and moves
``server_lr`` of the way to it (1: plain FedAvg). To use the same number of
local steps as FDLoRA, a first ``local`` phase trains the copies for
FDLoRA's stage-1 steps (``fl.local_epochs``) before the T rounds. Evaluated:
the global adapter on every client.

Server state ``{'global'}``; no client state.
"""

from __future__ import annotations

import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.losses import token_nll
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import mean_step, validate_weighting

NAME = 'fedavg'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.weighting = 'examples'  # FedAvg: weight by training examples
  c.server_lr = 1.0         # 1: the new global adapter is the weighted mean
  return c


def validate(c) -> None:
  validate_weighting(c, NAME)
  need(c.fedavg.server_lr > 0, 'fedavg.server_lr', c.fedavg.server_lr,
       'must be > 0')


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients
  lr = float(c.fedavg.server_lr)

  def init(key):
    return {'global': s.lora_init(key)}, {}

  def server(state, uploads, weights, t):
    g, metrics = mean_step(state['global'], uploads, weights, lr)
    return {'global': g}, metrics

  common = dict(broadcast=lambda state, t: state['global'],
                start=lambda client, download: download, loss=token_nll,
                finish=lambda client, train, download, t: (client, train),
                server=server, dp_reference=downloaded)
  phases = (s.local_phase(**common), s.round_phase(**common))
  rows = lambda state, client: {
      'global': lora_lib.replicate(state['global'], n)}
  weights = s.example_weights(c.fedavg.weighting)
  return Method(NAME, init, phases, rows, progress_rows=rows,
                client_weights=weights)
