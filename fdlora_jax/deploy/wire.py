"""Pytrees on Flower's wire: one message record per tree.

A tree (adapters, a server state with its optax state) is turned into its
flax state dict and serialized with msgpack into one ``uint8`` array of an
``ArrayRecord``; the receiver restores it, into a template's structure when
it has one (NamedTuples of an optax state). Arrays keep their dtype and
bits, so what a client uploads is what the server reads.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from flax import serialization
from flwr.app import ArrayRecord

PyTree = Any


def pack(tree: PyTree) -> ArrayRecord:
  """``tree`` (None allowed) as an ArrayRecord."""
  if tree is None:
    return ArrayRecord(numpy_ndarrays=[])
  state = serialization.to_state_dict(
      __import__('jax').tree.map(np.asarray, tree))
  data = serialization.msgpack_serialize(state)
  return ArrayRecord(numpy_ndarrays=[np.frombuffer(data, np.uint8)])


def unpack(record: ArrayRecord, template: Optional[PyTree] = None) -> PyTree:
  """The tree :func:`pack` sent: nested dicts, or ``template``'s structure."""
  arrays = record.to_numpy_ndarrays()
  if not arrays:
    return None
  state = serialization.msgpack_restore(arrays[0].tobytes())
  if template is None:
    return state
  return serialization.from_state_dict(template, state)
