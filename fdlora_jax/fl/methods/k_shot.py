"""k-shot in-context learning: the base model, with k examples of the client's
own training split (prompt + answer) placed before every evaluation prompt
(the paper's Table 4: 5-shot). No training and no communication.

The demonstrations are drawn from the client's training split only (seeded),
never from its test split; a prompt that would overflow ``data.max_length``
drops demonstrations, never the question
(:func:`fdlora_jax.data.tokenize.encode_options`).
"""

from __future__ import annotations

import ml_collections

from fdlora_jax.errors import need
from fdlora_jax.fl.engine import Method, Setup

NAME = 'k_shot'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.shots = 5   # paper Table 4: 5-shot
  return c


def validate(c) -> None:
  need(c.k_shot.shots >= 1, 'k_shot.shots', c.k_shot.shots, 'must be >= 1')


def build(s: Setup) -> Method:
  return Method(NAME, init=lambda key: ({}, {}), phases=(),
                rows=lambda server, client: {'k_shot': None},
                context_shots=int(s.config.k_shot.shots))
