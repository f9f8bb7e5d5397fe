"""FedRoD (Chen and Chao, ICLR 2022, "On Bridging Generic and Personalized
Federated Learning for Image Classification") on LoRA adapters.

The adapter is split along its layer axis as in FedRep
(:func:`fdlora_jax.lora.head_start`): the LoRA of the lower layers is the
shared *body*, the LoRA of the top ``head_layers`` layers (0: the top
quarter, at least one) the shared *generic head*. Each client also holds a
*personal head*: a private LoRA of the same top layers. Its prediction is the generic and the
personal head together: the two adapters applied at once, concatenated along
the rank axis, so ``delta_W = generic + personal`` in every head layer
(:func:`fdlora_jax.lora.concat_rank`; body layers get zeros in the personal
half). A fresh personal head has ``b = 0``, so training starts from the
generic prediction.

Both losses are option-level, on :meth:`Forward.option_logits` (the logit of
each answer option's first token where the answer starts):

* body + generic head: the balanced softmax over the options with the
  client's own label prior (:func:`fdlora_jax.fl.losses.balanced_softmax_ce`,
  ``label_counts`` + 1e-6 so an unseen option stays finite), which fits the
  generic head to a class-balanced target;
* personal head: the ordinary cross-entropy over the same option logits of
  the body + generic + personal adapter, with the body and generic head
  held fixed (``stop_gradient``), so the personal head learns the client's
  own label distribution on top of the generic prediction. The option CE
  rather than the token NLL: the personal head then corrects the very
  quantity the generic head was balanced on (FedRoD's personal head is
  trained with the ordinary CE on the same class logits), and it is the
  decision evaluation makes (the options' likelihoods).

Every local step takes both: the loss is the sum of the two terms, each of
which reaches only its own parameters, as in the reference implementation
(every mini-batch updates the generic model with the balanced loss, then the
personal head with the CE on the detached generic output). That is two
forwards a step.

Body + generic head are uploaded and set to the weighted mean of the uploads
(``weighting='examples'``, FedAvg's rule, which FedRoD's server uses); the
personal head and the label prior never leave the client. A ``local`` phase
of ``fl.local_epochs`` precedes the T rounds, as for FedAvg. Evaluated:
``personalized`` (body + generic + personal, the headline) and ``generic``
(body + generic head). Needs answer options whose first tokens differ
(``Setup.option_ids``).

Server state ``{'body', 'generic'}``; client state ``{'personal' [N],
'log_prior' [N, O]}``. The loss sees one client's train tree only, so the
client's log prior rides in it as a frozen leaf (``trainable`` False: it
stays bit-identical).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError, need
from fdlora_jax.fl import losses
from fdlora_jax.fl.engine import Method, Setup
from fdlora_jax.fl.server import pseudo_gradient, tree_norm

NAME = 'fedrod'


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.head_layers = 0     # top layers whose LoRA is a head; 0: L // 4
  c.weighting = 'examples'  # server mean: 'examples' (as FedAvg) | 'uniform'
  return c


def validate(c) -> None:
  m = c.fedrod
  need(m.head_layers >= 0, 'fedrod.head_layers', m.head_layers,
       'must be >= 0 (0: the top quarter of the layers)')
  need(m.weighting in ('uniform', 'examples'), 'fedrod.weighting',
       m.weighting, "must be 'uniform' or 'examples'")


def personalized(body, generic, personal):
  """One client's body + generic + personal adapter (no client axis): the
  generic adapter and the personal head concatenated along the rank axis."""
  return lora_lib.concat_rank(
      lora_lib.join_layers(body, generic),
      lora_lib.join_layers(jax.tree.map(jnp.zeros_like, body), personal))


def build(s: Setup) -> Method:
  c, m, n = s.config, s.config.fedrod, s.num_clients
  if s.option_ids is None:
    raise ConfigError(
        f'config.method={NAME!r}: the balanced softmax needs one class logit '
        f'per answer option, but two options of data.task={c.data.task!r} '
        f'start with the same token; choose another method or '
        f'data.answer_prefix')
  num_layers = s.model.cfg.num_hidden_layers
  nb = lora_lib.head_start(m.head_layers, num_layers)   # body layers
  need(nb >= 1, 'fedrod.head_layers', m.head_layers,
       f'the model has {num_layers} layers and the body needs at least one')
  option_ids = np.asarray(s.option_ids)
  log_prior = losses.label_log_prior(np.asarray(s.label_counts))    # [N, O]

  def init(key):
    body, generic = lora_lib.split_layers(s.lora_init(key), nb)
    _, personal = lora_lib.split_layers(
        s.lora_init(jax.random.fold_in(key, 1)), nb)
    return ({'body': body, 'generic': generic},
            {'personal': lora_lib.replicate(personal, n),
             'log_prior': log_prior})

  def loss(fwd, train, download, batch, rng):
    valid = batch['valid']
    generic = lora_lib.join_layers(train['body'], train['generic'])
    logits, label = fwd.option_logits(generic, batch, option_ids, rng)
    balanced, count = losses.option_ce(
        logits, label, valid, jax.lax.stop_gradient(train['log_prior']))
    both = personalized(jax.lax.stop_gradient(train['body']),
                        jax.lax.stop_gradient(train['generic']),
                        train['personal'])
    logits_p, _ = fwd.option_logits(both, batch, option_ids, rng)
    personal, _ = losses.option_ce(logits_p, label, valid)
    return balanced + personal, count

  def trainable(train, i):
    return dict(jax.tree.map(lambda x: True, train),
                log_prior=jnp.zeros((), bool))

  def server(state, uploads, weights, t):
    # The weighted mean of the uploads (unchanged when every weight is 0).
    delta = pseudo_gradient(state, uploads, weights)
    return jax.tree.map(lambda x, d: x - d, state, delta), {
        'delta_norm': tree_norm(delta), 'participants': jnp.sum(weights > 0)}

  common = dict(
      broadcast=lambda state, t: state,
      start=lambda client, download: dict(download, **client),
      loss=loss, trainable=trainable,
      finish=lambda client, train, download, t: (
          dict(client, personal=train['personal']),
          {'body': train['body'], 'generic': train['generic']}),
      server=server)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def generic_rows(state, client):
    g = lora_lib.join_layers(state['body'], state['generic'])
    return {'generic': lora_lib.replicate(g, n)}

  def rows(state, client):
    body, generic = (lora_lib.replicate(state[k], n)
                     for k in ('body', 'generic'))
    return {'personalized': jax.vmap(personalized)(body, generic,
                                                   client['personal']),
            **generic_rows(state, client)}
  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='personalized',
                progress_rows=generic_rows, client_weights=weights)
