"""FDLoRA (Qi et al. 2024, Algorithm 1) as pure functions over dense pytrees.

Every client ``i`` holds the shared frozen base, a personalized adapter
``theta_p[i]`` (it never leaves the client) and, during a round, a copy of the
global adapter ``theta_s``. The run state is one pytree of arrays with a
leading client axis where a value is per client, so it jits, vmaps and
checkpoints as a whole::

  state = {
    'round':      int32 []          rounds completed (0 after stage 1)
    'personal':   lora [N, ...]     theta_p, client side only
    'global':     lora [...]        theta_s, server side
    'outer':      optax state       server's Nesterov momentum
    'inner':      optax state [N]   clients' AdamW state for the global copy
  }

Stage 1 trains ``personal``; the server's first global adapter is the mean of
the copies the clients upload at the end of it. Stage 2 is :func:`fl_round`.
Stage 3 (AdaFusion) lives in :mod:`fdlora_jax.fusion`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fdlora_jax import lora as lora_lib
from fdlora_jax import sharding
from fdlora_jax.fl.client import (StepMetrics, init_opt_states,
                                  make_clients_update)
from fdlora_jax.fl.server import make_server_update, outer_optimizer
from fdlora_jax.model import num_targets_bucket

PyTree = Any
NEVER = float('inf')  # fl.sync_every: H = infinity, never synchronise


def inner_optimizer(fl_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW (or plain SGD) with the configured learning-rate schedule."""
  lr = fl_cfg.inner_lr
  warmup = int(fl_cfg.inner_warmup_steps)
  kind = fl_cfg.inner_schedule
  if kind == 'constant':
    schedule = optax.constant_schedule(lr)
    if warmup:
      schedule = optax.join_schedules(
          [optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])
  elif kind in ('cosine', 'linear'):
    decay = max(total_steps - warmup, 1)
    tail = (optax.cosine_decay_schedule(lr, decay) if kind == 'cosine'
            else optax.linear_schedule(lr, 0.0, decay))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), tail],
        [max(warmup, 1)]) if warmup else tail
  else:
    raise ValueError(f"fl.inner_schedule must be 'constant', 'cosine' or "
                     f"'linear', got {kind!r}")
  if fl_cfg.inner_optimizer == 'sgd':
    return optax.sgd(schedule)
  if fl_cfg.inner_optimizer != 'adamw':
    raise ValueError(f"fl.inner_optimizer must be 'adamw' or 'sgd', got "
                     f"{fl_cfg.inner_optimizer!r}")
  return optax.adamw(schedule, b1=fl_cfg.inner_b1, b2=fl_cfg.inner_b2,
                     weight_decay=fl_cfg.inner_weight_decay)


@dataclasses.dataclass
class FDLoRA:
  """The compiled pieces of an FDLoRA run over a fixed model and base.

  ``sample(step0, num_steps) -> batches [K, N, B, T]`` supplies training data
  (a pure function of the step, so a resumed run sees the same order).
  ``steps_per_client`` is each client's number of real steps per round (equal
  to ``K`` unless ``fl.inner_unit == 'epochs'``); steps beyond it are masked.
  """
  model: Any
  base: PyTree
  fl_cfg: Any
  num_clients: int
  sample: Callable[[int, int], dict]
  steps_per_round: np.ndarray     # [N] real inner steps per client per round
  stage1_steps: np.ndarray        # [N] real steps per client in stage 1
  client_weights: np.ndarray      # [N] server weights (uniform or #examples)
  seed: int = 0
  mesh: Any = None                # jax Mesh with a 'clients' axis, or None

  def __post_init__(self):
    c = self.fl_cfg
    self.K = int(self.steps_per_round.max())
    total = int(self.stage1_steps.max()) + c.rounds * self.K
    self.inner = inner_optimizer(c, total)
    self.outer = outer_optimizer(c.outer_lr, c.outer_momentum, c.nesterov)
    self.clients_update = make_clients_update(self.model, self.inner,
                                              dropout=c.dropout)
    self.server_update = make_server_update(self.outer)
    self.key = jax.random.key(self.seed)

  # -- helpers ---------------------------------------------------------------
  def _batches(self, step0: int, num_steps: int, real_steps: np.ndarray
               ) -> tuple[dict, int]:
    """Training batches with steps past a client's own count masked out,
    and the static number of loss positions they need (``num_targets``)."""
    b = self.sample(step0, num_steps)
    local = np.arange(num_steps)[:, None]                # [K, 1]
    active = (local < real_steps[None, :])               # [K, N]
    b = dict(b)
    b['valid'] = b['valid'] * active[:, :, None]
    num_targets = num_targets_bucket(b['loss_mask'])
    return self._place(jax.tree.map(jnp.asarray, b), axis=1), num_targets

  def _client_rngs(self, tag: int, index: int) -> jax.Array:
    k = jax.random.fold_in(jax.random.fold_in(self.key, tag), index)
    return self._place(jax.random.split(k, self.num_clients))

  def _place(self, tree: PyTree, axis: int = 0) -> PyTree:
    """On a mesh: split the client axis over 'clients'; else unchanged."""
    if self.mesh is None:
      return tree
    return sharding.shard_clients(tree, self.mesh, axis)

  def initial_state(self, fresh_lora: PyTree) -> dict:
    """The state before stage 1 (also the structure to restore into)."""
    n = self.num_clients
    return {
        'round': jnp.array(0, jnp.int32),
        'personal': lora_lib.replicate(fresh_lora, n),
        'global': fresh_lora,
        'outer': self.outer.init(fresh_lora),
        'inner': init_opt_states(self.inner,
                                 lora_lib.replicate(fresh_lora, n)),
    }

  # -- stage 1: local learning -----------------------------------------------
  def stage1(self, fresh_lora: PyTree, progress=None) -> tuple[dict, dict]:
    """Trains every client's personalized adapter on its own data.

    Returns the initial state and a metrics dict (mean loss, bytes).
    """
    c, n = self.fl_cfg, self.num_clients
    personal = self._place(lora_lib.replicate(fresh_lora, n))
    opt = self._place(init_opt_states(self.inner, personal))
    total = int(self.stage1_steps.max())
    chunk = max(1, min(int(c.stage1_chunk), total)) if total else 0
    losses, counts, nonfinite = [], [], 0
    for i, s0 in enumerate(range(0, total, chunk or 1)):
      real = np.clip(self.stage1_steps - s0, 0, chunk)
      batches, num_targets = self._batches(s0, chunk, real)
      personal, opt, healthy, m = self.clients_update(
          self.base, personal, opt, batches, self._client_rngs(1, i),
          num_targets=num_targets)
      personal, opt = self._place((personal, opt))
      losses.append(np.asarray(m.loss * m.tokens).sum(1))
      counts.append(np.asarray(m.tokens).sum(1))
      nonfinite += int(np.asarray(m.nonfinite).sum())
      if progress is not None:
        progress(min(s0 + chunk, total), total)
    # Each client uploads a copy of its stage-1 adapter as its proposal for
    # the first global adapter (Algorithm 1: theta_s(0) = mean_i theta_p_i).
    uploads = jax.tree.map(jnp.copy, personal)
    weights = jnp.asarray(self.client_weights, jnp.float32)
    global_lora = jax.tree.map(
        lambda u: jnp.tensordot(weights / weights.sum(), u, axes=1), uploads)
    if c.global_init == 'fresh':
      global_lora = fresh_lora
    elif c.global_init != 'mean_personal':
      raise ValueError(f"fl.global_init must be 'mean_personal' or 'fresh', "
                       f"got {c.global_init!r}")
    state = dict(self.initial_state(global_lora), personal=personal)
    up = (lora_lib.num_bytes(fresh_lora)
          if c.global_init == 'mean_personal' else 0)
    loss = np.sum(losses, 0) / np.maximum(np.sum(counts, 0), 1) \
        if losses else np.zeros(n)
    return state, {'stage': 1, 'round': 0, 'train_loss': loss.tolist(),
                   'nonfinite_steps': nonfinite,
                   'bytes_up_per_client': [up] * n,
                   'bytes_down_per_client': [0] * n}

  # -- stage 2: one federated round ------------------------------------------
  def fl_round(self, state: dict) -> tuple[dict, dict]:
    """Round ``t = state['round'] + 1``: download, K local steps, upload,
    outer step, and every H rounds ``theta_p <- theta_s_i``."""
    c, n = self.fl_cfg, self.num_clients
    t = int(state['round']) + 1
    # Server -> clients: every client starts from the current global adapter.
    download = self._place(lora_lib.replicate(state['global'], n))
    inner = self._place(state['inner'])
    if c.reset_inner_opt:
      inner = self._place(init_opt_states(self.inner, download))
    step0 = int(self.stage1_steps.max()) + (t - 1) * self.K
    batches, num_targets = self._batches(step0, self.K, self.steps_per_round)
    uploads, inner, healthy, m = self.clients_update(
        self.base, download, inner, batches, self._client_rngs(2, t),
        num_targets=num_targets)
    uploads, inner = self._place((uploads, inner))
    # Clients -> server: only the global copies. A client whose loss went
    # non-finite gets weight 0, so it cannot poison the global adapter.
    weights = jnp.asarray(self.client_weights, jnp.float32) * healthy
    new_global, outer, sm = self.server_update(state['global'], state['outer'],
                                               uploads, weights)
    personal = state['personal']
    if math.isfinite(c.sync_every) and t % int(c.sync_every) == 0:
      personal = jax.tree.map(
          lambda u, p: jnp.where(healthy.reshape((n,) + (1,) * (p.ndim - 1)),
                                 u, p), uploads, personal)
    new_state = {'round': jnp.array(t, jnp.int32), 'personal': personal,
                 'global': new_global, 'outer': outer, 'inner': inner}
    size = lora_lib.num_bytes(state['global'])
    metrics = round_metrics(t, m, healthy, sm, size, n)
    return new_state, metrics


def round_metrics(t: int, m: StepMetrics, healthy, sm, size: int,
                  n: int) -> dict:
  tokens = np.asarray(m.tokens)
  loss = (np.asarray(m.loss) * tokens).sum(1) / np.maximum(tokens.sum(1), 1)
  return {
      'round': t,
      'train_loss': loss.tolist(),                 # per client
      'train_loss_mean': float(loss.mean()),
      'healthy': np.asarray(healthy).tolist(),
      'nonfinite_steps': np.asarray(m.nonfinite).sum(1).tolist(),
      'delta_norm': float(sm.delta_norm),
      'participants': int(sm.participants),
      'bytes_down_per_client': [size] * n,
      'bytes_up_per_client': [size] * n,
  }
