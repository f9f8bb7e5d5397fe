"""Local: every client trains its own LoRA on its own data; no communication.

The schedule is FDLoRA's with the server removed: a ``local`` phase of
``fl.local_epochs`` epochs, then T ``rounds`` of K steps each, so every client
takes as many local steps in total as an FDLoRA client (stage 1 plus T x K)
and sees its data in the same order. Nothing is broadcast or uploaded.

Client state ``{'lora' [N]}``; no server state.
"""

from __future__ import annotations

import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.losses import token_nll

NAME = 'local'


def config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()


def validate(c) -> None:
  del c


def build(s: Setup) -> Method:
  n = s.num_clients

  def init(key):
    return {}, {'lora': lora_lib.replicate(s.lora_init(key), n)}

  common = dict(start=lambda client, download: client['lora'],
                loss=token_nll,
                finish=lambda client, train, download, t: (
                    dict(client, lora=train), None))
  phases = (s.local_phase(**common), s.round_phase(**common))
  rows = lambda server, client: {'local': client['lora']}
  return Method(NAME, init, phases, rows, progress_rows=rows)
