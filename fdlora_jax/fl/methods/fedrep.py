"""FedRep (Collins et al., ICML 2021, "Exploiting Shared Representations for
Personalized Federated Learning", Algorithm 1) on one LoRA adapter.

The adapter is split along its layer axis (:mod:`fdlora_jax.fl.layer_split`):
the LoRA of the lower layers is the shared representation (the *body*), the
LoRA of the top ``head_layers`` layers is each client's personal *head* (0:
the top quarter, at least one layer; at least one layer is always left to
the body).

Every repeat (the stage-1 ``local`` phase and each of the T ``rounds``), a
client downloads the body and takes its K local steps on the token NLL of
the whole adapter (body + its own head):

* steps ``0 .. head_steps - 1`` train the head, the body frozen;
* steps ``head_steps .. K - 1`` train the body, the head frozen.

The client uploads the body only; the head never leaves the client. The
server sets the body to the weighted mean of the uploads (``weighting``).
Evaluated: ``personalized``, the body with each client's own head. FedRep
needs K >= 2 (``validate``). Choices: docs/methods.md, "Choices per method".

Server state ``{'body'}``; client state ``{'head' [N]}``.
"""

from __future__ import annotations

import jax
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.layer_split import body_layers, validate_head_layers
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import mean_step, validate_weighting

NAME = 'fedrep'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.head_layers = 0     # top layers whose LoRA is the personal head; 0: L // 4
  c.head_steps = 1      # local steps on the head (body frozen), then the body
  c.weighting = 'examples'  # server mean: 'examples' (as FedAvg) | 'uniform'
  return c


def validate(c) -> None:
  m = c.fedrep
  validate_head_layers(c, NAME)
  need(m.head_steps >= 1, 'fedrep.head_steps', m.head_steps, 'must be >= 1')
  if c.fl.inner_unit == 'steps':
    need(m.head_steps < c.fl.inner_steps, 'fedrep.head_steps', m.head_steps,
         f'must be < fl.inner_steps (K={c.fl.inner_steps}): the body trains '
         f'in the K - head_steps steps after the head, so FedRep needs K >= 2')
  validate_weighting(c, NAME)


def build(s: Setup) -> Method:
  m, n = s.config.fedrep, s.num_clients
  nb = body_layers(s, NAME)
  head_steps = int(m.head_steps)

  def init(key):
    body, head = lora_lib.split_layers(s.lora_init(key), nb)
    return {'body': body}, {'head': lora_lib.replicate(head, n)}

  def loss(fwd, train, download, batch, rng):
    return fwd.nll(lora_lib.join_layers(train['body'], train['head']), batch,
                   rng)

  def trainable(train, i):
    on_head = i < head_steps
    return {'body': jax.tree.map(lambda x: ~on_head, train['body']),
            'head': jax.tree.map(lambda x: on_head, train['head'])}

  def server(state, uploads, weights, t):
    body, metrics = mean_step(state['body'], uploads, weights)
    return {'body': body}, metrics

  common = dict(
      broadcast=lambda state, t: state['body'],
      start=lambda client, download: {'body': download,
                                      'head': client['head']},
      loss=loss, trainable=trainable,
      finish=lambda client, train, download, t: (
          dict(client, head=train['head']), train['body']),
      server=server, dp_reference=downloaded)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    body = lora_lib.replicate(state['body'], n)
    return {'personalized': jax.vmap(lora_lib.join_layers)(body,
                                                           client['head'])}
  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=rows, client_weights=weights)
