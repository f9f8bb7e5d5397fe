"""FedKD (Wu, Wu, Lyu, Huang and Xie, "Communication-efficient federated
learning via knowledge distillation", Nature Communications 2022), on LoRA
adapters of a frozen LLaMA.

The paper's large private *mentor* and small shared *mentee* models become
two adapters of different rank on the same frozen base: a private mentor of
rank ``mentor_rank`` (default 16) and a shared mentee of rank
``mentee_rank`` (default 4). The model applies every adapter at the run's
LoRA scale ``alpha / lora.rank``; each adapter here runs with its ``b``
multiplied by ``lora.rank / its_rank`` (``lora.scale_b``), i.e. at PEFT's
own scale ``alpha / its_rank``, and is exported (rows) that way.

Adaptive mutual distillation, per batch, with ``L_t``, ``L_s`` the mentor's
and the mentee's token NLL (task losses)::

  mentor: L_t + KL(sg(y_s) || y_t) / sg(L_t + L_s)
  mentee: L_s + KL(sg(y_t) || y_s) / sg(L_t + L_s)

(``sg``: stop-gradient; the two are summed and trained jointly, which is the
same as two separate optimisers since AdamW is elementwise). Dividing by the
task losses makes distillation strong when both predict well and weak when
they do not. Each model learns from the other's prediction, not from its own
(the authors' code lets both KLs and the divisor reach both models). The
paper's hidden-state and attention MSE terms are left out: both adapters sit
on one frozen base whose hidden states the loss does not see, and their
difference comes from the adapters alone. ``y`` is ``distill``:

* ``'token'`` (default): at every answer token, the model's probability of
  the target token versus all others (``losses.bernoulli_kl`` on
  ``Forward.target_log_probs``), averaged over the answer tokens. It reuses
  the NLL's forward pass and works for every task; full-vocabulary KL would
  need the logits the forward does not return.
* ``'option'``: the softmax over the answer options' first tokens at the
  answer position (``Forward.option_logits``; two more forward passes per
  step; needs options that start with different tokens).

Only the mentee's update ``delta = mentee_trained - mentee_downloaded``
leaves a client, compressed by truncated SVD (``lora.svd_compress``), one SVD
per factor matrix per layer (``a_l`` ``[in, r_s]``, ``b_l`` ``[r_s, out]``:
the mentee's parameter matrices, as the paper compresses each parameter
matrix's gradient; an SVD of ``delta_W`` would leave the server a rank
``2 r_s N`` mean to force back into rank ``r_s`` factors), keeping the fewest
singular values whose energy share is >= ``T(t) = T_start + (T_end -
T_start) (t - 1) / (T - 1)`` at round t: ``T_start`` at round 1 (and in the
``local`` phase, round 0), ``T_end`` at the last (the authors' code uses
``t / T``, never quite ``T_start``). Shapes stay at full rank with the
dropped triplets zeroed; ``wire_bytes`` counts ``k (m + n + 1)`` floats per
matrix, which exceeds the raw ``m n`` when ``k = r_s`` (measured on the tiny
logs run, 7 targets, rank 4: 65-80% of the raw mentee, rising with T). The
server adds the weighted mean of the decompressed updates to the mentee and
broadcasts it whole (the paper also compresses this download; its full size
is counted here).

Bytes per round per client: up ``4 sum_{targets, layers} (k_a (in + r_s +
1) + k_b (r_s + out + 1))``, down ``|mentee| = 4 sum_{targets} L r_s (in +
out)``.

Phases: ``local`` (``fl.local_epochs`` epochs, round 0) and ``rounds`` (T
rounds of K steps), both the same FedKD round. Evaluated: ``mentor`` (each
client's own, the headline: the authors' code tests the mentor) and
``mentee`` (shared).

Server state ``{'mentee'}``; client state ``{'mentor' [N]}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError, need
from fdlora_jax.fl.engine import Method, Setup
from fdlora_jax.fl.losses import bernoulli_kl, categorical_kl
from fdlora_jax.fl.server import weighted_mean

NAME = 'fedkd'
DISTILL = ('token', 'option')


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mentor_rank = 16        # private mentor adapter
  c.mentee_rank = 4         # shared mentee adapter
  c.T_start = 0.95          # paper: SVD energy threshold at the first round
  c.T_end = 0.98            # paper: ... rising linearly to the last round
  c.distill = 'token'       # 'token' | 'option' (see the module docstring)
  c.weighting = 'uniform'   # server mean: 'uniform' (paper) | 'examples'
  return c


def validate(c) -> None:
  m = c.fedkd
  for field in ('mentor_rank', 'mentee_rank'):
    need(isinstance(m[field], int) and m[field] >= 1, f'fedkd.{field}',
         m[field], 'must be an integer >= 1')
  need(0 < m.T_start <= 1, 'fedkd.T_start', m.T_start, 'must be in (0, 1]')
  need(m.T_start <= m.T_end <= 1, 'fedkd.T_end', m.T_end,
       'must be in [T_start, 1]')
  need(m.distill in DISTILL, 'fedkd.distill', m.distill,
       f'choose from {DISTILL}')
  need(m.weighting in ('uniform', 'examples'), 'fedkd.weighting', m.weighting,
       "must be 'uniform' or 'examples'")


def energy_threshold(t, rounds: int, start: float, end: float):
  """``T(t)``: ``start`` at round 1 (and before), ``end`` at round
  ``rounds``, linear in between."""
  frac = jnp.clip((t - 1) / max(rounds - 1, 1), 0.0, 1.0)
  return start + (end - start) * frac


def distillation_terms(fwd, train, batch, rng, distill='token',
                       option_ids=None):
  """``{'task_t', 'task_s', 'kd_t', 'kd_s', 'count'}`` of one batch: the
  mentor's (t) and mentee's (s) NLL, and each one's KL towards the other,
  already divided by ``sg(task_t + task_s)``. ``train`` holds the two
  adapters at their own scale."""
  rt, rs = jax.random.split(rng) if rng is not None else (None, None)
  lp_t, mask = fwd.target_log_probs(train['mentor'], batch, rt)
  lp_s, _ = fwd.target_log_probs(train['mentee'], batch, rs)
  count = jnp.sum(mask)
  mean = lambda x, w: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
  task_t, task_s = mean(-lp_t, mask), mean(-lp_s, mask)
  sg = jax.lax.stop_gradient
  if distill == 'token':
    kl_t = mean(bernoulli_kl(sg(lp_s), lp_t), mask)
    kl_s = mean(bernoulli_kl(sg(lp_t), lp_s), mask)
  else:
    valid = batch.get('valid', jnp.ones(batch['tokens'].shape[0]))
    y_t, _ = fwd.option_logits(train['mentor'], batch, option_ids, rt)
    y_s, _ = fwd.option_logits(train['mentee'], batch, option_ids, rs)
    kl_t = mean(categorical_kl(sg(y_s), y_t), valid)
    kl_s = mean(categorical_kl(sg(y_t), y_s), valid)
  denom = jnp.maximum(sg(task_t + task_s), 1e-6)
  return {'task_t': task_t, 'task_s': task_s, 'kd_t': kl_t / denom,
          'kd_s': kl_s / denom, 'count': count}


def build(s: Setup) -> Method:
  c, m, n = s.config, s.config.fedkd, s.num_clients
  if m.distill == 'option' and s.option_ids is None:
    raise ConfigError("config.fedkd.distill='option': the answer options do "
                      "not start with distinct tokens; use 'token'")
  r_cfg = s.model.lora.rank
  own_scale = lambda tree: {   # each adapter at alpha / its own rank
      'mentor': lora_lib.scale_b(tree['mentor'], r_cfg / m.mentor_rank),
      'mentee': lora_lib.scale_b(tree['mentee'], r_cfg / m.mentee_rank)}

  def init(key):
    k_t, k_s = jax.random.split(key)
    mentor = lora_lib.init_rank(s.model, m.mentor_rank, k_t)
    mentee = lora_lib.init_rank(s.model, m.mentee_rank, k_s)
    return {'mentee': mentee}, {'mentor': lora_lib.replicate(mentor, n)}

  def loss(fwd, train, download, batch, rng):
    terms = distillation_terms(fwd, own_scale(train), batch, rng, m.distill,
                               s.option_ids)
    total = terms['task_t'] + terms['task_s'] + terms['kd_t'] + terms['kd_s']
    return total, terms['count']

  def finish(client, train, download, t):
    delta = jax.tree.map(lambda x, d: x - d, train['mentee'], download)
    delta = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0.0), delta)
    threshold = energy_threshold(t, c.fl.rounds, m.T_start, m.T_end)
    return (dict(client, mentor=train['mentor']),
            lora_lib.svd_compress(delta, threshold))

  def server(state, uploads, weights, t):
    delta = weighted_mean(lora_lib.svd_decompress(uploads), weights)
    mentee = jax.tree.map(jnp.add, state['mentee'], delta)
    return {'mentee': mentee}, {'participants': jnp.sum(weights > 0)}

  common = dict(broadcast=lambda state, t: state['mentee'],
                start=lambda client, download: {'mentor': client['mentor'],
                                                'mentee': download},
                loss=loss, finish=finish, server=server,
                wire_bytes=lora_lib.svd_wire_bytes)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    scaled = own_scale({'mentor': client['mentor'],
                        'mentee': lora_lib.replicate(state['mentee'], n)})
    return {'mentor': scaled['mentor'], 'mentee': scaled['mentee']}

  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='mentor',
                progress_rows=rows, client_weights=weights)
