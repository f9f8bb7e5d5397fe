"""FedLoRA-Optimizer (Zhao, Zhu, Zhang, Chen and Guo, "FedLoRA-Optimizer:
Federated LoRA Fine-Tuning with Global and Local Optimization in
Heterogeneous Data Scenarios", arXiv:2510.11274, 2025).

The paper writes each LoRA factor as magnitude and direction, ``A = A_M
A_D`` and ``B = B_M B_D``: A's directions carry the knowledge shared across
clients, B's magnitudes the personal knowledge. A global optimizer federates
A's directions (FedAvg), then a local optimizer tunes B's magnitudes.

Here (:func:`decompose`, :func:`compose`) every rank component ``k`` of ``a
[in, r]`` and ``b [r, out]`` is a magnitude ``m[k]`` and a unit direction
(column ``k`` of ``a``, row ``k`` of ``b``). Phases:

1. Global stage, ``local`` and ``rounds``: each client downloads A's
   directions ``d_a``, trains ``global_trains`` (default ``d_a`` and plain
   ``b``) and uploads ``d_a``; the server takes the weighted mean
   (``weighting``) and renormalises every direction. B never leaves.
2. Local stage, ``personalize`` (``local_stage_epochs``): each client
   decomposes its ``b`` and trains ``m_b`` only.

Evaluated: ``personalized`` (after the local stage, the headline) and
``global`` (after the global stage). Choices: docs/methods.md.

Server state ``{'a_dir'}``; client state ``{'lora' [N]}`` (after the global
stage: A decomposed, B plain) and ``{'personal' [N]}`` (after the local).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Phase, Setup
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import (replace_step, validate_weighting,
                                  weighted_mean)

PyTree = Any
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
  validate_weighting(c, NAME)


# ---------------------------------------------------------------------------
# Magnitude and direction of each rank component
# ---------------------------------------------------------------------------
# ``a [..., in, r]`` = m_a [..., r] * d_a / ||d_a|| column by column (norms
# over ``in``); ``b [..., r, out]`` = m_b [..., r] * d_b / ||d_b|| row by row
# (norms over ``out``). A decomposed node is
# ``{'a': {'m': [..., r], 'd': [..., in, r]}, 'b': {'m': [..., r],
# 'd': [..., r, out]}}``.
def unit(x: jax.Array, axis: int) -> jax.Array:
  """``x / ||x||`` along ``axis``; a zero vector becomes the constant unit
  vector ``1 / sqrt(size)`` (any direction reproduces a zero magnitude).
  The gradient is finite everywhere (0 at a zero vector)."""
  squares = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  nonzero = squares > 0
  norm = jnp.sqrt(jnp.where(nonzero, squares, 1.0))
  fallback = jnp.asarray(1.0 / np.sqrt(x.shape[axis]), x.dtype)
  return jnp.where(nonzero, x / norm, fallback)


def decompose(lora: PyTree, factors: Sequence[str] = ('a', 'b')) -> PyTree:
  """Each rank component of the named factors (``'a'``, ``'b'``) as a
  magnitude and a unit-norm direction; other factors stay as they are."""
  def factor(x, name):
    if name not in factors or isinstance(x, dict):
      return x
    axis = -2 if name == 'a' else -1
    return {'m': jnp.linalg.norm(x, axis=axis), 'd': unit(x, axis)}
  return lora_lib.map_adapters(lambda n: {'a': factor(n['a'], 'a'),
                                          'b': factor(n['b'], 'b')}, lora)


def compose(parts: PyTree) -> PyTree:
  """The plain adapter of :func:`decompose`'s form (a factor that is already
  plain passes through); directions are normalised here, so their own norm
  never matters."""
  def factor(x, name):
    if not isinstance(x, dict):
      return x
    if name == 'a':
      return x['m'][..., None, :] * unit(x['d'], -2)
    return x['m'][..., :, None] * unit(x['d'], -1)
  return lora_lib.map_adapters(lambda n: {'a': factor(n['a'], 'a'),
                                          'b': factor(n['b'], 'b')}, parts)


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
  unit_a = lambda tree: jax.tree.map(lambda d: unit(d, -2), tree)

  def init(key):
    fresh = s.lora_init(key)
    parts = decompose(fresh, ('a',))
    return {'a_dir': a_directions(parts)}, {
        'lora': lora_lib.replicate(parts, n),
        'personal': lora_lib.replicate(decompose(fresh), n)}

  start = lambda client, download: with_a_directions(client['lora'], download)
  loss = lambda fwd, train, download, batch, rng: fwd.nll(
      compose(train), batch, rng)
  broadcast = lambda state, t: state['a_dir']

  # -- global stage ----------------------------------------------------------------
  def global_finish(client, train, download, t):
    return dict(client, lora=train), unit_a(a_directions(train))

  def server(state, uploads, weights, t):
    mean = unit_a(weighted_mean(uploads, weights))
    a_dir = jax.tree.map(lambda new, old: jnp.where(jnp.sum(weights) > 0,
                                                    new, old),
                         mean, state['a_dir'])
    a_dir, metrics = replace_step(state['a_dir'], a_dir, weights)
    return {'a_dir': a_dir}, metrics

  stage = dict(broadcast=broadcast, start=start, loss=loss,
               trainable=lambda train, i: global_mask(train, m.global_trains),
               finish=global_finish, server=server, dp_reference=downloaded)

  # -- local stage: B's magnitudes -------------------------------------------------
  def local_start(client, download):
    return decompose(start(client, download), ('b',))

  def local_finish(client, train, download, t):
    return dict(client, personal=train), None

  def rows(state, client):
    a_dir = lora_lib.replicate(state['a_dir'], n)
    return {'personalized': compose(client['personal']),
            'global': compose(with_a_directions(client['lora'],
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
