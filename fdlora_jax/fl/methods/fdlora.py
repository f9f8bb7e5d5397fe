"""FDLoRA (Qi et al. 2024, "FDLoRA: Personalized Federated Learning of Large
Language Model via Dual LoRA Tuning", Algorithm 1).

Every client holds a personalized adapter ``theta_p`` that never leaves it,
and trains copies of one global adapter ``theta_s`` that the server updates
DiLoCo-style with an outer Nesterov step. Phases:

1. ``local``: each client trains ``theta_p`` for ``fl.local_epochs`` epochs;
   each uploads a copy, and ``theta_s(0) = mean_i theta_p_i``
   (``global_init='mean_personal'``; ``'fresh'`` keeps a fresh adapter and
   uploads nothing).
2. ``rounds``: T rounds; each client downloads ``theta_s``, runs K AdamW steps
   on its copy and uploads it; the server steps on the pseudo-gradient
   ``mean_i (theta_s - theta_s_i)`` with ``optax.sgd(outer_lr,
   outer_momentum, nesterov=True)``. Every H = ``sync_every`` rounds a client
   sets ``theta_p <- theta_s_i`` (``inf``: never).
3. ``fusion``: AdaFusion per client: an evosax search for ``w = (w1, w2)``
   minimising the few-shot loss of ``w1 theta_p + w2 theta_s`` plus
   ``lam |w|_1`` (:mod:`fdlora_jax.fusion`), with the paper's fixed-weight
   baselines (Table 6) evaluated beside it.

Server state ``{'global', 'outer'}``; client state ``{'personal' [N],
'fusion_w' [N, 2]}``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import fusion as fusion_lib
from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Phase, Setup
from fdlora_jax.fl.losses import token_nll
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import (outer_optimizer, outer_step,
                                  validate_weighting, weighted_mean)

NAME = 'fdlora'
# Fields a resumed run may change (Method.resumable): the fusion search runs
# after the last checkpoint, so its settings do not shape the saved state.
RESUMABLE = ('fdlora.fusion.',)
GLOBAL_INITS = ('mean_personal', 'fresh')


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.outer_lr = 1e-3         # paper: 1e-3 (DiLoCo uses 0.7)
  c.outer_momentum = 0.5    # paper: 0.5
  c.nesterov = True         # paper / DiLoCo: Nesterov momentum
  c.sync_every = float('inf')  # H: theta_p <- theta_s_i every H rounds
  c.global_init = 'mean_personal'  # paper: theta_s(0) = mean_i theta_p_i
  c.reset_inner_opt = False  # keep each client's AdamW state across rounds
  c.weighting = 'uniform'   # server mean: 'uniform' | 'examples'
  c.fusion = fusion_lib.fusion_config()
  # Fusion baselines of the paper's Table 6, evaluated next to AdaFusion.
  c.fusion.baselines = ('average', 'sum', 'random')
  return c


def validate(c) -> None:
  m = c.fdlora
  need(m.outer_lr > 0, 'fdlora.outer_lr', m.outer_lr, 'must be > 0')
  need(0 <= m.outer_momentum < 1, 'fdlora.outer_momentum', m.outer_momentum,
       'must be in [0, 1)')
  need(m.sync_every >= 1, 'fdlora.sync_every', m.sync_every,
       'H must be >= 1 (inf: never)')
  need(m.global_init in GLOBAL_INITS, 'fdlora.global_init', m.global_init,
       f'choose from {GLOBAL_INITS}')
  validate_weighting(c, NAME)
  fusion_lib.validate_config(m.fusion, 'fdlora.fusion')
  for kind in m.fusion.baselines:
    need(kind in fusion_lib.BASELINES, 'fdlora.fusion.baselines', kind,
         f'choose from {fusion_lib.BASELINES}')


def build(s: Setup) -> Method:
  c, m, n = s.config, s.config.fdlora, s.num_clients
  outer = outer_optimizer(m.outer_lr, m.outer_momentum, m.nesterov)
  sync = int(m.sync_every) if math.isfinite(m.sync_every) else 0
  mean_personal = m.global_init == 'mean_personal'

  def init(key):
    fresh = s.lora_init(key)
    w0 = jnp.tile(jnp.asarray(m.fusion.init, jnp.float32), (n, 1))
    return ({'global': fresh, 'outer': outer.init(fresh)},
            {'personal': lora_lib.replicate(fresh, n), 'fusion_w': w0})

  # -- phase 1: local learning of theta_p --------------------------------------
  def local_finish(client, train, download, t):
    return dict(client, personal=train), (train if mean_personal else None)

  def local_server(server, uploads, weights, t):
    g = weighted_mean(uploads, weights) if mean_personal else server['global']
    return {'global': g, 'outer': outer.init(g)}, {}

  # -- phase 2: federated rounds on copies of theta_s ----------------------------
  def round_finish(client, train, download, t):
    personal = client['personal']
    if sync:
      personal = jax.tree.map(lambda u, p: jnp.where(t % sync == 0, u, p),
                              train, personal)
    return dict(client, personal=personal), train

  def round_server(server, uploads, weights, t):
    g, o, metrics = outer_step(outer, server['global'], server['outer'],
                               uploads, weights)
    return {'global': g, 'outer': o}, metrics

  # -- phase 3: AdaFusion --------------------------------------------------------
  def fusion(server, client, key, progress=None):
    global_n = lora_lib.replicate(server['global'], n)
    fitness = fusion_lib.make_fitness_fn(s.model, s.base, client['personal'],
                                         global_n, s.few_shot,
                                         lam=m.fusion.lam)
    w, history = fusion_lib.adafusion(fitness, n, m.fusion, key, progress)
    return dict(client, fusion_w=w), {
        'fusion_weights': w, 'fusion_best_fitness': history['best_fitness']}

  def rows(server, client):
    personal = client['personal']
    global_n = lora_lib.replicate(server['global'], n)
    out = {'personalized': personal, 'global': global_n,
           'fused': fusion_lib.fuse(personal, global_n, client['fusion_w'])}
    for kind in m.fusion.baselines:
      wb = fusion_lib.baseline_weights(kind, n, s.keys.rows(),
                                       bounds=tuple(m.fusion.bounds))
      out[f'fusion_{kind}'] = fusion_lib.fuse(personal, global_n, wb)
    return out

  start_personal = lambda client, download: client['personal']
  start_download = lambda client, download: download
  phases = (
      # Under DP, stage 1's update is measured from the adapter every
      # client starts from, the server's initial one.
      s.local_phase(start=start_personal, loss=token_nll, finish=local_finish,
                    server=local_server,
                    dp_reference=lambda client, download: client['personal']),
      s.round_phase(broadcast=lambda server, t: server['global'],
                    start=start_download, loss=token_nll, finish=round_finish,
                    server=round_server, dp_reference=downloaded,
                    reset_opt=m.reset_inner_opt),
      Phase('fusion', search=fusion),
  )
  weights = s.example_weights(m.weighting)
  return Method(
      NAME, init, phases, rows, headline='fused',
      progress_rows=lambda server, client: {
          'global': lora_lib.replicate(server['global'], n)},
      client_weights=weights, resumable=RESUMABLE)
