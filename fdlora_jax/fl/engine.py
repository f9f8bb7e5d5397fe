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
    self._privatize = jax.jit(lambda up, ref, w, clip, key: privacy.privatize(
        up, ref, w, clip, update_noise, key))
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

  def _private_uploads(self, phase: Phase, index: int, upload, client,
                       download, weights, dp_state: dict
                       ) -> tuple[Any, dict, dict]:
    """The uploads the server sees under DP, the DP state after the round
    and the round's DP metrics; ``client`` is the state before the repeat."""
    k_noise, k_count = jax.random.split(self.keys.dp(index))
    clip = dp_state['clip']
    reference = self._references[phase.name](client, download)
    upload, m = self._privatize(upload, reference, weights, clip, k_noise)
    metrics = {'dp_clip': float(clip), 'dp_noise_std': float(m['noise_std'])}
    if self.dp.adaptive:
      clip, below = self._adapt_clip(clip, m['norms'], weights, k_count)
      metrics['dp_unclipped_fraction'] = float(below)
    eps = self.guarantee(index + 1)["epsilon"]
    metrics['dp_epsilon'] = eps
    return upload, {'clip': clip}, metrics

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

  def _rngs(self, phase_index: int, index: int) -> jax.Array:
    return self._place(jax.random.split(self.keys.steps(phase_index, index),
                                        self.num_clients))

  def _batches(self, step0: int, num_steps: int, real: np.ndarray):
    b = dict(self.sample(step0, num_steps))
    active = np.arange(num_steps)[:, None] < real[None, :]       # [K, N]
    b['valid'] = b['valid'] * active[:, :, None]
    num_targets = num_targets_bucket(b['loss_mask'])
    return self._place(jax.tree.map(jnp.asarray, b), axis=1), num_targets

  # -- one repeat ----------------------------------------------------------------
  def run_repeat(self, state: dict, index: int, progress=None
                 ) -> tuple[dict, dict]:
    """Runs repeat ``index`` of :meth:`schedule`; returns the new state and
    its metrics (per-client loss, health, bytes, server metrics).

    The phase's optimizer state in ``state`` is donated: pass a copy to run
    the same state twice."""
    phase, _, t, cursor = self.schedule()[index]
    n = self.num_clients
    p_index = self.method.phases.index(phase) + 1
    server, client = state['server'], self._place(state['client'])
    download = self._download(phase, server, t)
    train = self._starts[phase.name](client, download)
    opt = self._place(state['opt'][phase.name])
    if phase.reset_opt:
      opt = self._opt_inits[phase.name](train)
    steps = np.asarray(phase.steps)
    k = self.max_steps(phase)
    chunk = max(1, min(phase.chunk or k, k)) if k else 0
    healthy = jnp.ones(n, bool)
    losses, tokens, nonfinite = [], [], np.zeros(n, np.int64)
    for c, s0 in enumerate(range(0, k, chunk or 1)):
      real = np.clip(steps - s0, 0, chunk)
      batches, num_targets = self._batches(cursor + s0, chunk, real)
      train, opt, ok, m = self._updates[phase.name](
          self.base, train, opt, download, batches, self._rngs(p_index, t + c),
          jnp.int32(s0), num_targets=num_targets)
      train, opt = self._place((train, opt))
      healthy = healthy & ok
      losses.append(np.asarray(m.loss * m.tokens).sum(1))
      tokens.append(np.asarray(m.tokens).sum(1))
      nonfinite += np.asarray(m.nonfinite).sum(1)
      if progress is not None:
        progress(min(s0 + chunk, k), k)
    new_client, upload = self._finishes[phase.name](client, train, download,
                                                    jnp.int32(t))
    # A client that went non-finite keeps its previous state and is left out
    # of the server's mean.
    new_client = jax.tree.map(
        lambda new, old: jnp.where(
            healthy.reshape((n,) + (1,) * (new.ndim - 1)), new, old),
        new_client, client)
    weights = jnp.asarray(self.client_weights, jnp.float32) * healthy
    server_metrics, sent, extra = {}, upload, {}
    if phase.server is not None:
      if self.private:
        upload, extra['dp'], dp_metrics = self._private_uploads(
            phase, index, upload, client, download, weights, state['dp'])
        server_metrics.update(dp_metrics)
      server, sm = self._servers[phase.name](server, upload, weights,
                                             jnp.int32(t))
      server_metrics.update({k: np.asarray(v).tolist() for k, v in sm.items()})
    tok = np.sum(tokens, 0) if tokens else np.zeros(n)
    loss = (np.sum(losses, 0) / np.maximum(tok, 1)) if losses else np.zeros(n)
    new_state = dict(state, done=jnp.array(index + 1, jnp.int32),
                     server=server, client=new_client,
                     opt=dict(state['opt'], **{phase.name: opt}), **extra)
    metrics = {
        'phase': phase.name, 'round': t,
        'train_loss': loss.tolist(),
        'train_loss_mean': float(loss.mean()) if n else 0.0,
        'healthy': np.asarray(healthy).tolist(),
        'nonfinite_steps': nonfinite.tolist(),
        'bytes_down_per_client': (
            per_client_bytes(download, n) if phase.download_bytes is None else
            np.asarray(self._download_bytes[phase.name](download),
                       np.int64).tolist()),
        'bytes_up_per_client': (
            per_client_bytes(sent, n) if phase.wire_bytes is None else
            np.asarray(self._wire_bytes[phase.name](sent),
                       np.int64).tolist()),
        **server_metrics,
    }
    return new_state, metrics

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
      metrics[p.name] = {k: np.asarray(v).tolist() for k, v in m.items()}
    return dict(state, client=client), metrics
