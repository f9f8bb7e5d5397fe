"""The engine: runs a :class:`~fdlora_jax.fl.api.Method`'s phases over all
clients at once.

What a method declares is in :mod:`fdlora_jax.fl.api`; the compiled client
step in :mod:`fdlora_jax.fl.step`. The engine is the only place for:

* ``jit``: one compiled client step per training phase, and every other
  compiled function (start, finish, server, optimizer init, wire bytes)
  built once, when the engine is;
* the health mask: a client that went non-finite keeps its previous state
  and gets server weight 0;
* RNG: every key from :class:`~fdlora_jax.fl.api.Keys` of the run's seed;
* mesh placement of the client axis;
* communication bytes, counted from the arrays actually broadcast to and
  uploaded by each client, per round;
* client-level differential privacy of the uploads (``dp``, off by
  default): clipping, the server's noise and the privacy accountant
  (:mod:`fdlora_jax.fl.privacy`).

The names of :mod:`.api` and :mod:`.step` are re-exported here for code
written against the single-module engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax.errors import ConfigError
from fdlora_jax.fl import privacy
from fdlora_jax.fl.api import (Keys, Method, Phase, PyTree, Setup,  # noqa: F401
                               client_steps)
from fdlora_jax.fl.step import (INNER_OPTIMIZERS,  # noqa: F401
                                INNER_SCHEDULES, Forward, StepMetrics,
                                accumulated_value_and_grad, init_opt_states,
                                inner_optimizer, make_client_update,
                                make_clients_update, sft_client_update,
                                sft_clients_update)
from fdlora_jax.model import num_targets_bucket


def per_client_bytes(tree: PyTree, n: int) -> list[int]:
  """Bytes of each client's slice of a ``[N, ...]`` tree (0 for None)."""
  if tree is None:
    return [0] * n
  return [lora_lib.num_bytes(tree) // n] * n if jax.tree.leaves(tree) else (
      [0] * n)


def communication(repeats: list[dict], n: int) -> dict:
  """Totals of the bytes each of ``n`` clients downloaded and uploaded, from
  :meth:`Engine.run_repeat`'s metrics of every repeat (kept in memory, or
  read back from metrics.jsonl for the repeats of an earlier process)."""
  per_round = [{'phase': r['phase'], 'round': r['round'],
                'bytes_down_per_client': r['bytes_down_per_client'],
                'bytes_up_per_client': r['bytes_up_per_client']}
               for r in repeats if 'bytes_up_per_client' in r]
  down = np.sum([r['bytes_down_per_client'] for r in per_round], 0) \
      if per_round else np.zeros(n, np.int64)
  up = np.sum([r['bytes_up_per_client'] for r in per_round], 0) \
      if per_round else np.zeros(n, np.int64)
  return {'bytes_down_per_client': down.tolist(),
          'bytes_up_per_client': up.tolist(),
          'bytes_total': int(down.sum() + up.sum()),
          'per_round': per_round}


@dataclasses.dataclass
class Engine:
  """Runs a :class:`Method`'s training phases over all clients at once.

  ``sample(step0, num_steps) -> batches [K, N, B, T]`` supplies training data
  as a pure function of the global step, so a resumed run sees the same order.
  ``seed`` is the run's: :attr:`keys` derives every key from it. ``dp`` is
  ``config.dp`` (:func:`fdlora_jax.fl.privacy.config`), or None: no DP.
  """
  method: Method
  model: Any
  base: PyTree
  fl_cfg: Any
  num_clients: int
  sample: Callable[[int, int], dict]
  seed: int = 0
  mesh: Any = None
  dp: Any = None

  def __post_init__(self):
    self.training = [p for p in self.method.phases if not p.is_search]
    self.searches = [p for p in self.method.phases if p.is_search]
    # One inner optimizer per phase; a decaying lr schedule spans the steps
    # its state counts: the phase's every repeat, or one repeat when the
    # state is reset at each (Phase.reset_opt).
    self.optimizers = {
        p.name: inner_optimizer(self.fl_cfg, self.max_steps(p) * (
            1 if p.reset_opt else p.repeats)) for p in self.training}
    self.keys = Keys(self.seed)
    self._updates = {
        p.name: make_clients_update(self.model, p.loss,
                                    self.optimizers[p.name],
                                    p.trainable, dropout=self.fl_cfg.dropout,
                                    grad_accum=self.fl_cfg.grad_accum)
        for p in self.training}
    self._servers = {p.name: jax.jit(p.server) for p in self.training
                     if p.server is not None}
    self._starts = {p.name: jax.jit(jax.vmap(p.start)) for p in self.training}
    self._finishes = {
        p.name: jax.jit(jax.vmap(p.finish, in_axes=(0, 0, 0, None)))
        for p in self.training}
    self._opt_inits = {p.name: jax.jit(jax.vmap(self.optimizers[p.name].init))
                       for p in self.training}
    self._wire_bytes = {p.name: jax.jit(jax.vmap(p.wire_bytes))
                        for p in self.training if p.wire_bytes is not None}
    self._download_bytes = {
        p.name: jax.jit(jax.vmap(p.download_bytes))
        for p in self.training if p.download_bytes is not None}
    n = self.num_clients
    w = self.method.client_weights
    self.client_weights = np.ones(n) if w is None else np.asarray(w, float)
    self._init_privacy()

  # -- client-level DP -----------------------------------------------------------
  def _init_privacy(self) -> None:
    """With ``dp.enabled``: checks that every phase with a server opts in
    (``Phase.dp_reference``), fixes the noise multiplier (from
    ``dp.epsilon`` when > 0) and compiles :func:`privacy.privatize` per
    phase."""
    dp = self.dp
    self.private = bool(dp is not None and dp.enabled)
    self.noise_multiplier = 0.0
    if not self.private:
      return
    for p in self.training:
      if p.server is not None and p.dp_reference is None:
        raise ConfigError(
            f'config.dp.enabled=True: method {self.method.name!r} phase '
            f'{p.name!r} has a server that does not read the uploads through '
            'their weighted mean alone, so noise on that mean would not '
            'protect it; client-level DP runs with the methods listed in '
            'docs/privacy.md')
    rounds = self.private_rounds(len(self.schedule()))
    self.noise_multiplier = (
        privacy.noise_for_epsilon(dp.epsilon, rounds, dp.delta)
        if dp.epsilon > 0 else float(dp.noise_multiplier))
    try:
      update_noise = privacy.update_noise(self.noise_multiplier,
                                          dp.count_noise, dp.adaptive)
    except ValueError:
      raise ConfigError(
          f'config.dp.count_noise={dp.count_noise!r}: adaptive clipping '
          f'needs 2 * count_noise > the noise multiplier '
          f'({self.noise_multiplier:.4g})') from None
    self._references = {
        p.name: jax.jit(jax.vmap(p.dp_reference))
        for p in self.training if p.server is not None}
    self._clip = jax.jit(privacy.clip_updates)
    self._noise = jax.jit(lambda up, w, clip, key: privacy.add_noise(
        up, w, clip, update_noise, key))
    self._adapt_clip = jax.jit(lambda clip, norms, w, key: privacy.adapt_clip(
        clip, norms, w, dp.target_quantile, dp.clip_lr, dp.count_noise, key))

  def private_rounds(self, upto: int) -> int:
    """Repeats among the first ``upto`` of :meth:`schedule` whose uploads
    reach a server (each one Gaussian mechanism under DP)."""
    return sum(p.server is not None for p, *_ in self.schedule()[:upto])

  def guarantee(self, done: int) -> Optional[dict]:
    """What the run's DP guarantees after ``done`` repeats (None: off)."""
    if not self.private:
      return None
    dp, rounds = self.dp, self.private_rounds(done)
    eps = privacy.epsilon(self.noise_multiplier, rounds, dp.delta)
    return {'epsilon': eps if np.isfinite(eps) else 'inf',
            'delta': dp.delta, 'noise_multiplier': self.noise_multiplier,
            'private_rounds': rounds, 'adaptive_clip': bool(dp.adaptive),
            'accountant': 'RDP (dp_accounting), every client every round',
            'unit': 'client (add or remove one client)'}

  # -- the schedule ------------------------------------------------------------
  @staticmethod
  def max_steps(phase: Phase) -> int:
    return int(np.max(phase.steps, initial=0))

  def schedule(self) -> list[tuple[Phase, int, int, int]]:
    """``(phase, repeat, round number, first global data step)`` of every
    repeat of every training phase, in order; index = checkpoint step - 1."""
    out, cursor = [], 0
    for p in self.training:
      k = self.max_steps(p)
      for r in range(p.repeats):
        out.append((p, r, p.first_round + r, cursor))
        cursor += k
    return out

  # -- state -----------------------------------------------------------------
  def _place(self, tree: PyTree, axis: int = 0) -> PyTree:
    """On a mesh: split the client axis over 'clients'; else unchanged."""
    if self.mesh is None or tree is None:
      return tree
    return sharding.shard_clients(tree, self.mesh, axis)

  def _download(self, phase: Phase, server: PyTree, t: int) -> PyTree:
    if phase.broadcast is None:
      return None
    d = phase.broadcast(server, jnp.int32(t))
    if not phase.personal_download:
      d = lora_lib.replicate(d, self.num_clients)
    return self._place(d)

  def initial_state(self, key: Optional[jax.Array] = None) -> dict:
    """The state before any training (also the structure to restore into);
    ``key`` for the method's init, by default :meth:`Keys.init`."""
    server, client = self.method.init(self.keys.init() if key is None
                                      else key)
    opt = {}
    for p in self.training:
      download = self._download(p, server, p.first_round)
      opt[p.name] = self._opt_inits[p.name](
          self._starts[p.name](client, download))
    state = {'done': jnp.array(0, jnp.int32), 'server': server,
             'client': client, 'opt': opt}
    if self.private:
      state['dp'] = {'clip': jnp.asarray(self.dp.clip, jnp.float32)}
    return state

  def _rngs(self, phase_index: int, index: int,
            clients: Optional[np.ndarray] = None) -> jax.Array:
    """Each client's key of one compiled call (``clients``: those of a
    slice; a client's key is the same in any slice)."""
    keys = jax.random.split(self.keys.steps(phase_index, index),
                            self.num_clients)
    return self._place(keys) if clients is None else keys[clients]

  def _batches(self, step0: int, num_steps: int, real: np.ndarray,
               clients: np.ndarray):
    """``[K, M, ...]`` batches of ``clients`` (the bucket of target counts
    from all N, so a client's compiled step is the full run's)."""
    b = dict(self.sample(step0, num_steps))
    num_targets = num_targets_bucket(b['loss_mask'])
    b = {k: np.asarray(v)[:, clients] for k, v in b.items()}
    active = np.arange(num_steps)[:, None] < real[None, :]       # [K, M]
    b['valid'] = b['valid'] * active[:, :, None]
    return jax.tree.map(jnp.asarray, b), num_targets

  # -- one repeat ----------------------------------------------------------------
  def run_repeat(self, state: dict, index: int, progress=None
                 ) -> tuple[dict, dict]:
    """Runs repeat ``index`` of :meth:`schedule`; returns the new state and
    its metrics (per-client loss, health, bytes, server metrics): the
    server's :meth:`broadcast`, every client's :meth:`client_repeat`, the
    server's :meth:`server_repeat`. A deployment runs the same three, each
    client its own slice.

    The phase's optimizer state in ``state`` is donated: pass a copy to run
    the same state twice."""
    phase = self.schedule()[index][0]
    download = self.broadcast(index, state['server'])
    client, opt, upload, cm = self.client_repeat(
        index, state['client'], state['opt'][phase.name], download,
        dp_clip=state['dp']['clip'] if self.private else None,
        progress=progress)
    server, dp_state, sm = self.server_repeat(
        index, state['server'], upload, np.asarray(cm['healthy']),
        state.get('dp'), cm.get('dp_unclipped'))
    new_state = dict(state, done=jnp.array(index + 1, jnp.int32),
                     server=server, client=client,
                     opt=dict(state['opt'], **{phase.name: opt}))
    if dp_state is not None:
      new_state['dp'] = dp_state
    cm.pop('dp_unclipped', None)
    return new_state, {'phase': phase.name, 'round': cm.pop('round'), **cm,
                       **sm}

  def broadcast(self, index: int, server: PyTree) -> PyTree:
    """The server's download for repeat ``index``: ``[N, ...]`` (the shared
    download replicated, or one per client), or None."""
    phase, _, t, _ = self.schedule()[index]
    return self._download(phase, server, t)

  def client_repeat(self, index: int, client: PyTree, opt: PyTree,
                    download: PyTree, clients: Optional[np.ndarray] = None,
                    dp_clip: Optional[float] = None, progress=None
                    ) -> tuple[PyTree, PyTree, PyTree, dict]:
    """The clients' part of repeat ``index``: start, the K masked steps,
    finish, the health mask, and (under DP) each upload clipped by its
    client to ``dp_clip``, the server's clip in force. ``clients`` are the indices the ``[M, ...]`` trees ``client``,
    ``opt`` and ``download`` hold (default: all N, placed on the mesh); a
    client's keys, batches and steps are those it has in the full run.

    Returns ``(client, opt, upload, metrics)``; ``metrics`` per client:
    ``train_loss``, ``healthy``, ``nonfinite_steps``, bytes down and up,
    and ``dp_unclipped`` (under DP, for adaptive clipping)."""
    phase, _, t, cursor = self.schedule()[index]
    whole = clients is None
    clients = np.arange(self.num_clients) if whole else np.asarray(clients)
    m = len(clients)
    place = self._place if whole else (lambda tree, axis=0: tree)
    p_index = self.method.phases.index(phase) + 1
    client, download = place(client), place(download)
    train = self._starts[phase.name](client, download)
    opt = place(opt)
    if phase.reset_opt:
      opt = self._opt_inits[phase.name](train)
    steps = np.asarray(phase.steps)[clients]
    k = self.max_steps(phase)
    chunk = max(1, min(phase.chunk or k, k)) if k else 0
    healthy = jnp.ones(m, bool)
    losses, tokens, nonfinite = [], [], np.zeros(m, np.int64)
    for c, s0 in enumerate(range(0, k, chunk or 1)):
      real = np.clip(steps - s0, 0, chunk)
      batches, num_targets = self._batches(cursor + s0, chunk, real, clients)
      rngs = self._rngs(p_index, t + c, None if whole else clients)
      train, opt, ok, sm = self._updates[phase.name](
          self.base, train, opt, download, place(batches, 1), rngs,
          jnp.int32(s0),
          num_targets=num_targets)
      train, opt = place((train, opt))
      healthy = healthy & ok
      sm = sharding.to_host(sm)
      losses.append((sm.loss * sm.tokens).sum(1))
      tokens.append(sm.tokens.sum(1))
      nonfinite += sm.nonfinite.sum(1)
      if progress is not None:
        progress(min(s0 + chunk, k), k)
    new_client, upload = self._finishes[phase.name](client, train, download,
                                                    jnp.int32(t))
    # A client that went non-finite keeps its previous state and is left out
    # of the server's mean.
    new_client = jax.tree.map(
        lambda new, old: jnp.where(
            healthy.reshape((m,) + (1,) * (new.ndim - 1)), new, old),
        new_client, client)
    tok = np.sum(tokens, 0) if tokens else np.zeros(m)
    loss = (np.sum(losses, 0) / np.maximum(tok, 1)) if losses else np.zeros(m)
    metrics = {
        'round': t,
        'train_loss': loss.tolist(),
        'train_loss_mean': float(loss.mean()) if m else 0.0,
        'healthy': sharding.to_host(healthy).tolist(),
        'nonfinite_steps': nonfinite.tolist(),
        'bytes_down_per_client': (
            per_client_bytes(download, m) if phase.download_bytes is None else
            sharding.to_host(self._download_bytes[phase.name](download)
                             ).astype(np.int64).tolist()),
        'bytes_up_per_client': (
            per_client_bytes(upload, m) if phase.wire_bytes is None else
            sharding.to_host(self._wire_bytes[phase.name](upload)
                             ).astype(np.int64).tolist()),
    }
    if self.private and phase.server is not None:
      # Client-side clipping, against a reference the server knows; the
      # clip in force is the server's (adaptive clipping moves it).
      clip = jnp.float32(dp_clip)
      upload, norms = self._clip(
          upload, self._references[phase.name](client, download), clip)
      metrics['dp_unclipped'] = sharding.to_host(norms <= clip).tolist()
    return new_client, opt, upload, metrics

  def server_repeat(self, index: int, server: PyTree, uploads: PyTree,
                    healthy: np.ndarray, dp_state: Optional[dict] = None,
                    unclipped: Optional[list] = None
                    ) -> tuple[PyTree, Optional[dict], dict]:
    """The server's part of repeat ``index``: the weights (client weights x
    ``healthy``), under DP the noise on the (clipped) ``uploads [N, ...]``
    and the clip's adaptation from the clients' ``unclipped`` flags, then
    the phase's server function. Returns ``(server, dp_state, metrics)``."""
    phase, _, t, _ = self.schedule()[index]
    weights = jnp.asarray(self.client_weights, jnp.float32) * jnp.asarray(
        healthy, bool)
    metrics = {}
    if phase.server is None:
      return server, dp_state, metrics
    if self.private:
      k_noise, k_count = jax.random.split(self.keys.dp(index))
      clip = dp_state['clip']
      uploads, std = self._noise(uploads, weights, clip, k_noise)
      metrics.update(dp_clip=float(clip), dp_noise_std=float(std))
      if self.dp.adaptive:
        below = jnp.asarray(unclipped, bool)
        clip, frac = self._adapt_clip(clip, jnp.where(below, 0.0, jnp.inf),
                                      weights, k_count)
        metrics['dp_unclipped_fraction'] = float(frac)
      dp_state = {'clip': clip}
      metrics['dp_epsilon'] = self.guarantee(index + 1)['epsilon']
    server, sm = self._servers[phase.name](server, uploads, weights,
                                           jnp.int32(t))
    metrics.update({k: v.tolist() for k, v in sharding.to_host(sm).items()})
    return server, dp_state, metrics

  def run_searches(self, state: dict, progress: Optional[Callable] = None
                   ) -> tuple[dict, dict]:
    """The method's search phases (after training), in order; search ``i``
    gets the key :meth:`Keys.search` ``(i)``. ``progress(phase_name)``, when given,
    returns the ``(done, total)`` callback handed to that search."""
    metrics = {}
    client = state['client']
    for i, p in enumerate(self.searches):
      client, m = p.search(state['server'], client,
                           self.keys.search(i),
                           progress(p.name) if progress else None)
      metrics[p.name] = {k: v.tolist()
                         for k, v in sharding.to_host(m).items()}
    return dict(state, client=client), metrics
