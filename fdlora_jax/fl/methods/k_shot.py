"""k-shot in-context learning: the base model, with k examples of the client's
own training split (prompt + answer) placed before every evaluation prompt
(the paper's Table 4: 5-shot). No training and no communication.

The demonstrations are drawn from the client's training split only (seeded),
never from its test split. Every example, asked or shown, is cut to
``data.max_length`` as it is for zero-shot scoring and training, so the
question is the zero-shot prompt's; the whole prompt gets
``k_shot.max_length`` tokens, by default room for all k demonstrations
((k + 1) x ``data.max_length``, within the model's positions), and drops
demonstrations from the end beyond that
(:func:`fdlora_jax.data.tokenize.encode_options`). The method declares this
as its evaluation ``context`` (:class:`fdlora_jax.fl.api.EvalContext`); the
driver knows nothing of k-shot. Scoring runs
each client's shared start, demonstrations included, once into a KV cache
(:func:`fdlora_jax.evaluate.option_scores`).
"""

from __future__ import annotations

import ml_collections

from fdlora_jax import data as data_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import EvalContext, Method, Setup

NAME = 'k_shot'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.shots = 5   # paper Table 4: 5-shot
  # Tokens of a whole prompt, demonstrations included; 0: (shots + 1) x
  # data.max_length, room for every demonstration (at most the model's
  # max_position_embeddings).
  c.max_length = 0
  return c


def validate(c) -> None:
  need(c.k_shot.shots >= 1, 'k_shot.shots', c.k_shot.shots, 'must be >= 1')
  need(c.k_shot.max_length == 0 or c.k_shot.max_length >= c.data.max_length,
       'k_shot.max_length', c.k_shot.max_length,
       f'must be 0 or >= data.max_length ({c.data.max_length})')


def context_length(c, max_positions: int) -> int:
  """The k-shot prompt's token budget: ``k_shot.max_length``, or with 0 room
  for every demonstration, (shots + 1) x ``data.max_length``, within the
  model's ``max_positions`` (never under ``data.max_length``)."""
  if c.k_shot.max_length:
    return int(c.k_shot.max_length)
  return int(max(c.data.max_length,
                 min((c.k_shot.shots + 1) * c.data.max_length,
                     max_positions)))


def build(s: Setup) -> Method:
  c = s.config
  shots = int(c.k_shot.shots)
  length = context_length(c, s.model.cfg.max_position_embeddings)

  def context(train):
    """k of each client's own training examples before every prompt."""
    return EvalContext(shots, data_lib.demonstrations(train, shots, c.seed),
                       length)

  return Method(NAME, init=lambda key: ({}, {}), phases=(),
                rows=lambda server, client: {'k_shot': None},
                context=context)
