"""FedSA-LoRA (Guo, Wu, Tang, Zhang, Zhang and Liu, "Selective Aggregation
for Low-Rank Adaptation in Federated Learning", ICLR 2025).

The paper's finding: ``A`` learns what is common to the clients and ``B``
what is client-specific. So ``a`` (PEFT's ``lora_A``) is shared: every round
each client downloads it, trains ``a`` and its own ``b`` together for K
local steps and uploads ``a`` alone; the server sets ``a`` to the weighted
mean of the uploads (``weighting``). ``b`` never leaves its client. As for
FedAvg, a first ``local`` phase takes the stage-1 steps, and ends with the
first mean of ``a``. Evaluated: ``personalized``, the shared ``a`` with each
client's own ``b``. Choices: docs/methods.md, "Choices per method".

Server state ``{'a'}``; client state ``{'b' [N]}``.
"""

from __future__ import annotations

import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import (mean_step, validate_weighting,
                                  weighting_config)

NAME = 'fedsa_lora'


def config() -> ml_collections.ConfigDict:
  return weighting_config()       # weighting: 'examples' | 'uniform'


def validate(c) -> None:
  validate_weighting(c, NAME)


def build(s: Setup) -> Method:
  c, n = s.config, s.num_clients

  def init(key):
    a, b = lora_lib.split_factors(s.lora_init(key))
    return {'a': a}, {'b': lora_lib.replicate(b, n)}

  def server(state, uploads, weights, t):
    a, metrics = mean_step(state['a'], uploads, weights)
    return {'a': a}, metrics

  common = dict(
      broadcast=lambda state, t: state['a'],
      start=lambda client, download: lora_lib.join_factors(download, client['b']),
      loss=lambda fwd, train, download, batch, rng: fwd.nll(train, batch,
                                                            rng),
      finish=lambda client, train, download, t: (
          {'b': lora_lib.split_factors(train)[1]}, lora_lib.split_factors(train)[0]),
      server=server, dp_reference=downloaded)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    a = lora_lib.replicate(state['a'], n)
    return {'personalized': lora_lib.join_factors(a, client['b'])}
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=rows,
                client_weights=s.example_weights(c.fedsa_lora.weighting))
