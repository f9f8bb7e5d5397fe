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

import functools
import ipaddress
import socket
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdlora_jax.errors import ConfigError

PyTree = Any

CLIENTS, MODEL = 'clients', 'model'


def initialize_distributed(coordinator: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           timeout_s: int = 300) -> None:
  """Joins a multi-process run (``jax.distributed``): afterwards
  ``jax.devices()`` lists every process's devices, and the client mesh of
  :func:`device_mesh` spans them all.

  ``coordinator`` is ``host:port`` of process 0, the same for every
  process, with ``num_processes`` and this process's ``process_id``; all
  None: JAX finds them itself where it can (SLURM, Open MPI, Cloud TPU).
  A bad id or a coordinator not reached within ``timeout_s`` raises
  :class:`ConfigError` naming it.
  """
  given = [v is not None for v in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise ConfigError('--coordinator, --num_processes and --process_id go '
                      'together (or none of them, on a cluster JAX detects)')
  if all(given):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(f'--process_id={process_id} must be in [0, '
                        f'--num_processes={num_processes})')
    if ':' not in coordinator:
      raise ConfigError(f'--coordinator={coordinator!r} must be host:port')
    _reach(coordinator, process_id, timeout_s)
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes,
        process_id=process_id, initialization_timeout=timeout_s)
  except (RuntimeError, ValueError) as e:   # XlaRuntimeError is a RuntimeError
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e)
    raise ConfigError(
        f'jax.distributed could not start (coordinator {coordinator or "auto"}'
        f', process {process_id}, {timeout_s} s timeout): {first}') from None
  if coordinator is not None and _is_loopback(coordinator.rpartition(':')[0]):
    _loopback_collectives()


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(socket.gethostbyname(host.strip('[]'))
                                ).is_loopback
  except (OSError, ValueError):
    return False


def _loopback_collectives() -> None:
  """Every process on this machine (the coordinator is a loopback
  address): the CPU collectives (Gloo) connect the processes over
  127.0.0.1. By default Gloo uses the address the machine's hostname
  resolves to, which in a sandbox or container need not route, and then a
  collective waits forever. Uses JAX's CPU client factory (private API);
  where that has moved, JAX's default stays."""
  try:
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax
    if jax.config.jax_cpu_collectives_implementation not in (None, 'gloo'):
      return
    collectives = _jax.make_gloo_tcp_collectives(
        distributed_client=distributed.global_state.client,
        hostname='127.0.0.1')
    xla_bridge.register_backend_factory(
        'cpu', functools.partial(xla_bridge.make_cpu_client,
                                 collectives=collectives),
        priority=0, fail_quietly=False)
  except (AttributeError, ImportError, TypeError, RuntimeError) as e:
    logging.warning('Gloo stays on its default address: %s', e)


def _reach(coordinator: str, process_id: int, timeout_s: int) -> None:
  """Process 0 must be able to listen on the coordinator's port, and every
  other process to reach it within ``timeout_s``: checked here, because
  JAX's coordination client aborts the process (no Python error) when it
  cannot connect."""
  host, _, port = coordinator.rpartition(':')
  try:
    port = int(port)
  except ValueError:
    raise ConfigError(f'--coordinator={coordinator!r}: the port must be a '
                      'number') from None
  if process_id == 0:
    with socket.socket() as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        s.bind(('', port))
      except OSError as e:
        raise ConfigError(f'--coordinator={coordinator}: process 0 cannot '
                          f'listen on port {port} ({e.strerror})') from None
    return
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, port), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConfigError(
            f'--coordinator={coordinator}: process {process_id} could not '
            f'reach process 0 within {timeout_s} s ({e.strerror or e})'
            ) from None
      time.sleep(0.5)


def put(x, sharding: NamedSharding):
  """``jax.device_put`` that also works when ``sharding`` spans the devices
  of several processes (``jax.distributed``): every process holds the same
  host value (the same config, seed and data build it), and each places the
  slices of its own devices. A typed PRNG key goes through its key data."""
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)           # global -> global
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding),
                                    impl=impl)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


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


def to_host(tree: PyTree) -> PyTree:
  """A numpy copy of every leaf. A leaf split over the devices of several
  processes is gathered first; that is a collective, so under
  ``jax.distributed`` every process calls this at the same point."""
  def get(x):
    if (isinstance(x, jax.Array) and not x.is_fully_addressable
        and not x.is_fully_replicated):
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def pace(tree: PyTree) -> PyTree:
  """Under ``jax.distributed`` on CPU: waits until ``tree`` is computed.

  Call it in a host loop that dispatches a program per iteration. XLA's CPU
  client queues up to 32 programs per device ahead of the host. In a hang
  traced with gdb (option scoring, two processes sharing one loaded CPU),
  one device's launch waited for a free slot of that queue while the
  other devices sat in a collective that needed it: every process stuck.
  One program in flight keeps every device in step. Elsewhere (one
  process, or GPUs) it returns at once and the loop stays asynchronous.
  """
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    jax.block_until_ready(tree)
  return tree


def same_on_every_process(flag: bool) -> bool:
  """Process 0's ``flag``, on every process: a decision taken from a clock
  or another process-local value, before a collective step that all
  processes must take or skip together (a collective itself, so every
  process calls it at the same point). One process: ``flag``."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag))))


def globalize(tree: PyTree) -> PyTree:
  """Under ``jax.distributed``: every process-local leaf as a global array
  replicated on all devices (what a multi-process orbax checkpoint takes);
  leaves that already span processes are kept. One process: unchanged."""
  if jax.process_count() == 1:
    return tree
  everywhere = NamedSharding(Mesh(np.array(jax.devices()), ('all',)), P())

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    return put(x, everywhere)
  return jax.tree.map(get, tree)


def shard_clients(tree: PyTree, mesh: Mesh, axis: int = 0) -> PyTree:
  """Splits axis ``axis`` (the client axis) of every leaf over 'clients'.

  Adapters, optimizer states and rngs have the client axis first
  (``axis=0``); batches ``[K, N, ...]`` have it second (``axis=1``). Leaves
  with fewer dimensions (e.g. an optimizer step count) are replicated. The
  number of clients must be a multiple of the mesh's 'clients' size.
  """
  size = mesh.shape[CLIENTS]

  def place(x):
    if np.ndim(x) <= axis:
      return put(x, NamedSharding(mesh, P()))
    if np.shape(x)[axis] % size:
      raise ValueError(f'{np.shape(x)[axis]} clients cannot be split over '
                       f"{size} 'clients' shards")
    spec = P(*([None] * axis), CLIENTS)
    return put(x, NamedSharding(mesh, spec))
  return jax.tree.map(place, tree)


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
      lambda x: put(x, NamedSharding(mesh, base_spec(x.shape, m))),
      params)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """A full copy of every leaf on every device of ``mesh``."""
  return jax.tree.map(lambda x: put(x, NamedSharding(mesh, P())), tree)
