"""Zero-shot: the base model as it is, no training and no communication
(the paper's Table 4, first row)."""

from __future__ import annotations

import ml_collections

from fdlora_jax.fl.api import Method, Setup

NAME = 'zero_shot'


def config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()


def validate(c) -> None:
  del c


def build(s: Setup) -> Method:
  del s
  return Method(NAME, init=lambda key: ({}, {}), phases=(),
                rows=lambda server, client: {'zero_shot': None})
