"""FedAMP (Huang, Chu, Zhou, Wang, Liu, Pei and Zhang, "Personalized
Cross-Silo Federated Learning on Non-IID Data", AAAI 2021), on LoRA adapters
of a frozen LLaMA.

Every client owns one adapter ``w_i``. Attentive message passing runs on the
server: for each client it builds a personalized cloud adapter ``u_i =
sum_j xi_ij w_j`` and sends it to that client only, with the paper's
heuristic attention (HeurFedAMP):

  xi_ij = (1 - xi_ii) exp(sigma cos(w_i, w_j)) / sum_{h != i} exp(sigma
          cos(w_i, w_h))     for j != i,       xi_ii = ``self_weight``,

``cos`` being the cosine similarity of two clients' weight deltas ``a b``
(``similarity='delta'``) or of their flattened parameters (``'adapter'``).
A client with weight 0 is no one's neighbour and keeps its previous ``u_i``.

Each client then takes the proximal step ``argmin_w F_i(w) + lam/2 ||w -
u_i||^2`` by K AdamW steps on the token NLL plus the proximal term, starting
from ``u_i``. Phases: ``local`` (plain NLL from a fresh adapter; the server
computes the first ``u``) and ``rounds``. Evaluated: ``personalized``, the
clients' own adapters. Choices: docs/methods.md, "Choices per method".

Server state ``{'u' [N]}``; client state ``{'lora' [N]}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.losses import proximal, token_nll
from fdlora_jax.fl.server import (delta_cosine, flatten_clients, mix,
                                  pairwise_cosine)

NAME = 'fedamp'
SIMILARITIES = ('delta', 'adapter')


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.sigma = 10.0        # sharpness of exp(sigma * cos) over the neighbours
  c.self_weight = 0.5   # xi_ii: the share of u_i that is w_i itself
  c.lam = 1.0           # proximal pull lam/2 ||w - u_i||^2 (lambda/alpha_k)
  c.similarity = 'delta'  # cos of 'delta' (delta_W = a b) | 'adapter' (a, b)
  return c


def validate(c) -> None:
  m = c.fedamp
  need(m.sigma >= 0, 'fedamp.sigma', m.sigma, 'must be >= 0')
  need(0 <= m.self_weight <= 1, 'fedamp.self_weight', m.self_weight,
       'must be in [0, 1]')
  need(m.lam >= 0, 'fedamp.lam', m.lam, 'must be >= 0')
  need(m.similarity in SIMILARITIES, 'fedamp.similarity', m.similarity,
       f'choose from {SIMILARITIES}')


def attention_weights(cos: jax.Array, weights: jax.Array, sigma: float,
                      self_weight: float) -> jax.Array:
  """``xi [N, N]`` from the cosine similarities ``cos [N, N]``: row i puts
  ``self_weight`` on i and shares ``1 - self_weight`` over its neighbours
  (``weights > 0``, j != i) in proportion to ``exp(sigma cos_ij)``. Every
  row sums to 1; a row without neighbours is ``e_i``."""
  n = cos.shape[0]
  eye = jnp.eye(n, dtype=bool)
  neighbour = (weights[None, :] > 0) & ~eye
  logits = jnp.where(neighbour, sigma * cos, -jnp.inf)
  has = jnp.any(neighbour, axis=1, keepdims=True)
  soft = jax.nn.softmax(jnp.where(has, logits, 0.0), axis=1)
  off = jnp.where(neighbour, soft * (1.0 - self_weight), 0.0)
  return off + jnp.where(eye, jnp.where(has, self_weight, 1.0), 0.0)


def build(s: Setup) -> Method:
  m, n = s.config.fedamp, s.num_clients

  def init(key):
    fresh = lora_lib.replicate(s.lora_init(key), n)
    return {'u': fresh}, {'lora': fresh}

  def server(state, uploads, weights, t):
    cos = (delta_cosine(uploads) if m.similarity == 'delta' else
           pairwise_cosine(flatten_clients(uploads)))
    xi = attention_weights(cos, weights, m.sigma, m.self_weight)
    ok = weights > 0
    u = mix(uploads, jnp.where(ok[:, None], xi, 0.0))
    u = jax.tree.map(
        lambda new, old: jnp.where(ok.reshape((-1,) + (1,) * (new.ndim - 1)),
                                   new, old), u, state['u'])
    return {'u': u}, {'attention': xi, 'cosine': cos,
                      'participants': jnp.sum(ok)}

  def prox_nll(fwd, train, download, batch, rng):
    value, count = token_nll(fwd, train, download, batch, rng)
    return value + proximal(train, download, m.lam), count

  finish = lambda client, train, download, t: (dict(client, lora=train), train)
  phases = (
      s.local_phase(start=lambda client, download: client['lora'],
                    loss=token_nll, finish=finish, server=server),
      s.round_phase(broadcast=lambda state, t: state['u'],
                    personal_download=True,
                    start=lambda client, download: download, loss=prox_nll,
                    finish=finish, server=server),
  )
  rows = lambda state, client: {'personalized': client['lora']}
  return Method(NAME, init, phases, rows, progress_rows=rows)
