"""Placing clients and the base model on several devices.

One mesh with two axes::

  'clients'  the client axis of adapters, optimizer states and batches is
             split over it (each device trains N / size clients);
  'model'    the base weights are split over it when one device cannot hold
             them (size 1: the base is replicated on every device).

``jit`` follows the shardings of its inputs, so the vmapped client step of
:func:`fdlora_jax.fl.make_clients_update` runs unchanged: XLA's SPMD
partitioner splits the vmap over 'clients' and gathers base shards where a
matmul needs them.

Example::

  mesh = make_mesh(num_client_shards=4)              # 4 devices, base replicated
  base = shard_base(base, mesh)
  lora, opt_state = shard_clients((lora, opt_state), mesh)
  batches = shard_clients(batches, mesh, axis=1)     # [K, N, B, T]
  lora, opt_state, healthy, m = update(base, lora, opt_state, batches,
                                       shard_clients(rngs, mesh))
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdlora_jax.errors import ConfigError

PyTree = Any

CLIENTS, MODEL = 'clients', 'model'


def make_mesh(num_client_shards: int, num_model_shards: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``(clients, model)`` mesh over the first ``c * m`` devices."""
  devices = list(jax.devices() if devices is None else devices)
  need = num_client_shards * num_model_shards
  if need < 1 or need > len(devices):
    raise ValueError(f'a {num_client_shards} x {num_model_shards} mesh needs '
                     f'{need} devices; {len(devices)} available')
  grid = np.asarray(devices[:need], dtype=object).reshape(
      num_client_shards, num_model_shards)
  return Mesh(grid, (CLIENTS, MODEL))


def device_mesh(num_clients: int, model_shards: int) -> Optional[Mesh]:
  """A (clients, model) mesh over the local devices, or None on one device.

  The client axis gets the largest divisor of ``num_clients`` that fits the
  devices left after ``model_shards`` (the base split, 1: replicated).
  """
  devices = jax.device_count()
  if model_shards < 1 or devices % model_shards:
    raise ConfigError(f'config.model.shards={model_shards} must be >= 1 and '
                     f'divide the {devices} devices')
  client_shards = max(d for d in range(1, devices // model_shards + 1)
                      if num_clients % d == 0)
  if client_shards * model_shards == 1:
    return None
  return make_mesh(client_shards, model_shards)


def shard_clients(tree: PyTree, mesh: Mesh, axis: int = 0) -> PyTree:
  """Splits axis ``axis`` (the client axis) of every leaf over 'clients'.

  Adapters, optimizer states and rngs have the client axis first
  (``axis=0``); batches ``[K, N, ...]`` have it second (``axis=1``). Leaves
  with fewer dimensions (e.g. an optimizer step count) are replicated. The
  number of clients must be a multiple of the mesh's 'clients' size.
  """
  size = mesh.shape[CLIENTS]

  def put(x):
    if np.ndim(x) <= axis:
      return jax.device_put(x, NamedSharding(mesh, P()))
    if np.shape(x)[axis] % size:
      raise ValueError(f'{np.shape(x)[axis]} clients cannot be split over '
                       f"{size} 'clients' shards")
    spec = P(*([None] * axis), CLIENTS)
    return jax.device_put(x, NamedSharding(mesh, spec))
  return jax.tree.map(put, tree)


def base_spec(shape: Sequence[int], model_shards: int) -> P:
  """The partition of one base weight over 'model': its last axis that
  divides evenly (the output features of a kernel; for stacked layers
  ``[L, in, out]`` never the layer axis), else replicated. Vectors (norm
  scales) are replicated."""
  if model_shards == 1 or len(shape) < 2:
    return P()
  for ax in range(len(shape) - 1, max(len(shape) - 3, 0) - 1, -1):
    if ax == 0 and len(shape) == 3:
      break                          # the stacked-layer axis stays whole
    if shape[ax] % model_shards == 0:
      return P(*([None] * ax), MODEL)
  return P()


def shard_base(params: PyTree, mesh: Mesh) -> PyTree:
  """Places the base weights: split over 'model' (see :func:`base_spec`) and
  replicated over 'clients'."""
  m = mesh.shape[MODEL]
  return jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, base_spec(x.shape, m))),
      params)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """A full copy of every leaf on every device of ``mesh``."""
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())),
                      tree)
