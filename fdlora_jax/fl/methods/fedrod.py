"""FedRoD (Chen and Chao, ICLR 2022, "On Bridging Generic and Personalized
Federated Learning for Image Classification") on LoRA adapters.

The adapter is split along its layer axis as in FedRep
(:mod:`fdlora_jax.fl.layer_split`): the LoRA of the lower layers is the
shared *body*, the LoRA of the top ``head_layers`` layers the shared
*generic head*. Each client also holds a *personal head*, a private LoRA of
the same top layers, applied together with the generic one (concatenated on
the rank axis: ``delta_W = generic + personal``; :func:`personalized`).

Both losses are option-level, on :meth:`Forward.option_logits`; every local
step takes their sum, each term reaching only its own parameters:

* body + generic head: the balanced softmax with the client's own label
  prior (:func:`fdlora_jax.fl.losses.option_ce` with
  :func:`~fdlora_jax.fl.losses.label_log_prior`);
* personal head: the ordinary option cross-entropy of body + generic +
  personal, the body and generic head held fixed (``stop_gradient``).

Body + generic head are uploaded and set to the weighted mean of the uploads
(``weighting``). Evaluated: ``personalized`` (the headline) and ``generic``.
Choices: docs/methods.md, "Choices per method".

Server state ``{'body', 'generic'}``; client state ``{'personal' [N],
'log_prior' [N, O]}`` (the prior rides in the trained tree, frozen).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl import layer_split, losses
from fdlora_jax.fl import server as server_lib
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.privacy import downloaded

NAME = 'fedrod'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.head_layers = 0     # top layers whose LoRA is a head; 0: L // 4
  c.weighting = 'examples'  # server mean: 'examples' (as FedAvg) | 'uniform'
  return c


def validate(c) -> None:
  layer_split.validate_head_layers(c, NAME)
  server_lib.validate_weighting(c, NAME)


def personalized(body, generic, personal):
  """One client's body + generic + personal adapter (no client axis): the
  generic adapter and the personal head concatenated along the rank axis."""
  return lora_lib.concat_rank(
      lora_lib.join_layers(body, generic),
      lora_lib.join_layers(jax.tree.map(jnp.zeros_like, body), personal))


def build(s: Setup) -> Method:
  n, sg = s.num_clients, jax.lax.stop_gradient
  need(s.option_ids is not None, 'method', NAME,
       f'the balanced softmax needs one class logit per answer option, but '
       f'two options of data.task={s.config.data.task!r} start with the same '
       f'token; choose another method or data.answer_prefix')
  nb = layer_split.body_layers(s, NAME)

  def init(key):
    body, generic = lora_lib.split_layers(s.lora_init(key), nb)
    _, personal = lora_lib.split_layers(
        s.lora_init(jax.random.fold_in(key, 1)), nb)
    return ({'body': body, 'generic': generic},
            {'personal': lora_lib.replicate(personal, n),
             'log_prior': losses.label_log_prior(s.label_counts)})   # [N, O]

  def loss(fwd, train, download, batch, rng):
    def option_ce(lora, log_prior=None):
      logits, label = fwd.option_logits(lora, batch, s.option_ids, rng)
      return losses.option_ce(logits, label, batch['valid'], log_prior)
    generic = lora_lib.join_layers(train['body'], train['generic'])
    balanced, count = option_ce(generic, sg(train['log_prior']))
    personal, _ = option_ce(personalized(
        sg(train['body']), sg(train['generic']), train['personal']))
    return balanced + personal, count

  common = dict(
      broadcast=lambda state, t: state,
      start=lambda client, download: dict(download, **client), loss=loss,
      trainable=lambda train, i: dict(jax.tree.map(lambda x: True, train),
                                      log_prior=jnp.zeros((), bool)),
      finish=lambda client, train, download, t: (
          dict(client, personal=train['personal']),
          {'body': train['body'], 'generic': train['generic']}),
      server=lambda state, uploads, weights, t: server_lib.mean_step(
          state, uploads, weights),
      dp_reference=downloaded)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def generic_rows(state, client):
    g = lora_lib.join_layers(state['body'], state['generic'])
    return {'generic': lora_lib.replicate(g, n)}

  def rows(state, client):
    both = jax.vmap(personalized, in_axes=(None, None, 0))(
        state['body'], state['generic'], client['personal'])
    return {'personalized': both, **generic_rows(state, client)}
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=generic_rows,
                client_weights=s.example_weights(s.config.fedrod.weighting))
