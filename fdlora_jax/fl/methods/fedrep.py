"""FedRep (Collins et al., ICML 2021, "Exploiting Shared Representations for
Personalized Federated Learning", Algorithm 1) on one LoRA adapter.

The adapter is split along its layer axis: the LoRA of the lower layers is
the shared representation (the *body*), the LoRA of the top ``head_layers``
layers is each client's personal *head* (0: the top quarter, at least one
layer; at least one layer is always left to the body). In the paper the head
is the last layer(s) of a small network; here the base model, LM head
included, is frozen, so the trainable part closest to the output, the LoRA
of the top decoder layers, plays the head.

Every repeat (the stage-1 ``local`` phase and each of the T ``rounds``), a
client downloads the body and takes its K local steps on the token NLL of
the whole adapter (body + its own head):

* steps ``0 .. head_steps - 1`` train the head, the body frozen;
* steps ``head_steps .. K - 1`` train the body, the head frozen.

Frozen parts stay bit-identical (the engine's ``trainable`` mask by local
step). The client uploads the body only (its layers sliced off the layer
axis, so the bytes up and down are the body's); the head never leaves the
client. The server sets the body to the weighted mean of the uploads
(``weighting='examples'``, as FedAvg; ``'uniform'``: the paper's plain mean).
Evaluated: ``personalized``, the body with each client's own head.

K = 1 leaves no step for the body, so ``validate`` refuses ``head_steps >=
fl.inner_steps`` with ``fl.inner_unit='steps'`` (FedRep needs K >= 2). With
``'epochs'`` the steps per client vary; a client whose repeat has at most
``head_steps`` steps (e.g. a stage-1 phase of one step) trains only its head
in that repeat and uploads the body unchanged.

Server state ``{'body'}``; client state ``{'head' [N]}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.engine import Method, Setup
from fdlora_jax.fl.server import pseudo_gradient, tree_norm

NAME = 'fedrep'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.head_layers = 0     # top layers whose LoRA is the personal head; 0: L // 4
  c.head_steps = 1      # local steps on the head (body frozen), then the body
  c.weighting = 'examples'  # server mean: 'examples' (as FedAvg) | 'uniform'
  return c


def validate(c) -> None:
  m = c.fedrep
  need(m.head_layers >= 0, 'fedrep.head_layers', m.head_layers,
       'must be >= 0 (0: the top quarter of the layers)')
  need(m.head_steps >= 1, 'fedrep.head_steps', m.head_steps, 'must be >= 1')
  if c.fl.inner_unit == 'steps':
    need(m.head_steps < c.fl.inner_steps, 'fedrep.head_steps', m.head_steps,
         f'must be < fl.inner_steps (K={c.fl.inner_steps}): the body trains '
         f'in the K - head_steps steps after the head, so FedRep needs K >= 2')
  need(m.weighting in ('uniform', 'examples'), 'fedrep.weighting',
       m.weighting, "must be 'uniform' or 'examples'")


def build(s: Setup) -> Method:
  m, n = s.config.fedrep, s.num_clients
  num_layers = s.model.cfg.num_hidden_layers
  nb = lora_lib.head_start(m.head_layers, num_layers)   # body layers
  need(nb >= 1, 'fedrep.head_layers', m.head_layers,
       f'the model has {num_layers} layers and the body needs at least one')
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
    # body - sum_i w_i (body - body_i) / sum_i w_i: the weighted mean of the
    # uploads, and the body unchanged when every weight is 0.
    delta = pseudo_gradient(state['body'], uploads, weights)
    body = jax.tree.map(lambda x, d: x - d, state['body'], delta)
    return {'body': body}, {
        'delta_norm': tree_norm(delta), 'participants': jnp.sum(weights > 0)}

  common = dict(
      broadcast=lambda state, t: state['body'],
      start=lambda client, download: {'body': download,
                                      'head': client['head']},
      loss=loss, trainable=trainable,
      finish=lambda client, train, download, t: (
          dict(client, head=train['head']), train['body']),
      server=server)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    body = lora_lib.replicate(state['body'], n)
    return {'personalized': jax.vmap(lora_lib.join_layers)(body,
                                                           client['head'])}
  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=rows, client_weights=weights)
