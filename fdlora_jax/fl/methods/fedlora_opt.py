"""FedLoRA-Optimizer (Zhao, Zhu, Zhang, Chen and Guo, "FedLoRA-Optimizer:
Federated LoRA Fine-Tuning with Global and Local Optimization in
Heterogeneous Data Scenarios", arXiv:2510.11274, 2025).

The paper reparametrizes each LoRA factor into magnitude and direction,
``A = A_M A_D`` and ``B = B_M B_D``, finds that A's directions carry the
knowledge shared across clients and B's magnitudes the personal knowledge,
and runs a pipeline: a global optimizer federates A's directions (FedAvg),
then a local optimizer tunes B's magnitudes on each client.

On LoRA of a frozen LLaMA (:func:`fdlora_jax.lora.decompose`), for every
targeted projection and layer, with ``a [in, r]`` and ``b [r, out]``:

* **directions** are the unit vectors ``d_a[:, k]`` (column ``k`` of ``a``,
  norm over ``in``) and ``d_b[k, :]`` (row ``k`` of ``b``, norm over
  ``out``), for each rank component ``k``;
* **magnitudes** are the scalars ``m_a[k]`` and ``m_b[k]``;
* ``a[:, k] = m_a[k] d_a[:, k] / ||d_a[:, k]||`` and
  ``b[k, :] = m_b[k] d_b[k, :] / ||d_b[k, :]||``
  (:func:`fdlora_jax.lora.compose`; the forward normalises, so a direction's
  own norm never matters), and ``delta_W = a b alpha / r`` as for any LoRA.

B enters each stage in the form that stage trains: in the global stage a
plain LoRA factor (``b``), in the local stage decomposed (``m_b``, ``d_b``).
A is decomposed throughout. A fresh adapter is the library's (random ``a``,
zero ``b``: the model is unchanged).

Phases (same data and local steps as FDLoRA, plus the local stage):

1. Global stage, ``local`` (``fl.local_epochs`` epochs, one long first
   round, as in FedAvg) and ``rounds`` (T rounds of K steps): each client
   downloads A's directions ``d_a`` and trains ``global_trains`` (default
   ``d_a`` and ``b``; ``m_a`` stays at the shared initial value, so every
   client starts each round from the server's ``a``, and only ``b`` is
   local). It uploads ``d_a`` only, unit-normalised; the server takes the
   weighted mean (``weighting``) and renormalises every direction to unit
   norm. B never leaves the client.
2. Local stage, ``personalize`` (``local_stage_epochs`` epochs; -1: as many
   steps as the local phase, ``fl.local_steps`` or ``fl.local_epochs``):
   each client downloads the final ``d_a`` once, decomposes its ``b`` and
   trains ``m_b`` only; every other array (``m_a``, ``d_a``, ``d_b``) is
   unchanged.

Choices the paper leaves open, measured on the real LogHub samples (tiny
random-weight model, N = 5, Dirichlet 0.5, T = 30, K = 3, seed 0; mean
training loss of the last 5 rounds, then of the local stage; ln 512 = 6.24
is the untrained model):

* B plain in the global stage (default): 2.17, then 2.06. Trained instead as
  ``m_b`` and ``d_b`` from ``b = 0``, Adam moves each of the r magnitudes by
  about the learning rate per step where a plain ``b`` moves each of its
  ``r * out`` entries by that much, and B barely grew: 5.85, then 5.71.
* ``m_a`` frozen (default) or also trained (``global_trains=('a_dir',
  'a_mag', 'b')``): 2.17 / 2.12, the same test scores (mean F1 .36,
  accuracy .76 for both rows). Frozen keeps A wholly the server's; the
  paper measures A's magnitudes changing far less than B's.

Bytes per round per client: ``d_a`` down and up, each
``4 * r * sum_targets L * in``; the local stage adds one more download of
it.

Rows: ``personalized`` (after the local stage, the headline) and ``global``
(after the global stage: the server's ``d_a`` with each client's ``m_a``
and ``b`` as the global stage left them).

Server state ``{'a_dir'}``; client state ``{'lora': adapter [N] after the
global stage (A decomposed, B plain), 'personal': the adapter [N] after the
local stage (both decomposed)}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.engine import Method, Phase, Setup
from fdlora_jax.fl.server import tree_norm, weighted_mean

NAME = 'fedlora_opt'
# What the global stage may train: A's directions / magnitudes, plain B.
PARTS = ('a_dir', 'a_mag', 'b')


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What clients train in the global stage (only A's directions are sent).
  c.global_trains = ('a_dir', 'b')
  c.local_stage_epochs = -1.0  # m_b, after the rounds; -1: as the local phase
  c.weighting = 'examples'     # server mean: 'examples' (FedAvg) | 'uniform'
  return c


def validate(c) -> None:
  m = c.fedlora_opt
  trains = () if isinstance(m.global_trains, str) else tuple(m.global_trains)
  need(all(p in PARTS for p in trains) and 'a_dir' in trains,
       'fedlora_opt.global_trains', m.global_trains,
       f"must name parts from {PARTS} and include 'a_dir'")
  need(m.local_stage_epochs == -1 or m.local_stage_epochs >= 0,
       'fedlora_opt.local_stage_epochs', m.local_stage_epochs,
       'must be >= 0 (-1: as many steps as the local phase)')
  need(m.weighting in ('uniform', 'examples'), 'fedlora_opt.weighting',
       m.weighting, "must be 'uniform' or 'examples'")


def global_mask(parts, names) -> dict:
  """Trainable mask of the global stage's tree (A decomposed, B plain)."""
  return lora_lib.map_adapters(lambda node: {
      'a': {'d': jnp.array('a_dir' in names),
            'm': jnp.array('a_mag' in names)},
      'b': jnp.array('b' in names)}, parts)


def b_magnitudes_mask(parts) -> dict:
  """Trainable mask of the local stage's tree: ``m_b`` only."""
  return lora_lib.map_adapters(lambda node: {
      'a': {'d': jnp.array(False), 'm': jnp.array(False)},
      'b': {'d': jnp.array(False), 'm': jnp.array(True)}}, parts)


def a_directions(parts):
  return lora_lib.map_adapters(lambda node: node['a']['d'], parts)


def with_a_directions(parts, a_dir):
  return lora_lib.map_adapters(
      lambda node, d: {'a': {'m': node['a']['m'], 'd': d}, 'b': node['b']},
      parts, a_dir)


def build(s: Setup) -> Method:
  c, m, n = s.config, s.config.fedlora_opt, s.num_clients
  stage_steps = (s.local_steps() if m.local_stage_epochs == -1
                 else s.steps(m.local_stage_epochs, 'epochs'))
  unit_a = lambda tree: jax.tree.map(lambda d: lora_lib.unit(d, -2), tree)

  def init(key):
    fresh = s.lora_init(key)
    parts = lora_lib.decompose(fresh, ('a',))
    return {'a_dir': a_directions(parts)}, {
        'lora': lora_lib.replicate(parts, n),
        'personal': lora_lib.replicate(lora_lib.decompose(fresh), n)}

  start = lambda client, download: with_a_directions(client['lora'], download)
  loss = lambda fwd, train, download, batch, rng: fwd.nll(
      lora_lib.compose(train), batch, rng)
  broadcast = lambda state, t: state['a_dir']

  # -- global stage ----------------------------------------------------------------
  def global_finish(client, train, download, t):
    return dict(client, lora=train), unit_a(a_directions(train))

  def server(state, uploads, weights, t):
    mean = unit_a(weighted_mean(uploads, weights))
    a_dir = jax.tree.map(lambda new, old: jnp.where(jnp.sum(weights) > 0,
                                                    new, old),
                         mean, state['a_dir'])
    delta = jax.tree.map(lambda x, y: x - y, state['a_dir'], a_dir)
    return {'a_dir': a_dir}, {'delta_norm': tree_norm(delta),
                              'participants': jnp.sum(weights > 0)}

  stage = dict(broadcast=broadcast, start=start, loss=loss,
               trainable=lambda train, i: global_mask(train, m.global_trains),
               finish=global_finish, server=server)

  # -- local stage: B's magnitudes -------------------------------------------------
  def local_start(client, download):
    return lora_lib.decompose(start(client, download), ('b',))

  def local_finish(client, train, download, t):
    return dict(client, personal=train), None

  def rows(state, client):
    a_dir = lora_lib.replicate(state['a_dir'], n)
    return {'personalized': lora_lib.compose(client['personal']),
            'global': lora_lib.compose(with_a_directions(client['lora'],
                                                         a_dir))}

  phases = (
      s.local_phase(**stage),
      s.round_phase(**stage),
      Phase('personalize', steps=stage_steps,
            first_round=c.fl.rounds + 1, chunk=c.fl.stage1_chunk,
            broadcast=broadcast, start=local_start, loss=loss,
            trainable=lambda train, i: b_magnitudes_mask(train),
            finish=local_finish),
  )
  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=lambda state, client: {
                    'global': rows(state, client)['global']},
                client_weights=weights)
