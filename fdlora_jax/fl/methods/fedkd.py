"""FedKD (Wu, Wu, Lyu, Huang and Xie, "Communication-efficient federated
learning via knowledge distillation", Nature Communications 2022), on LoRA
adapters of a frozen LLaMA.

The paper's private *mentor* and shared *mentee* models are two adapters of
different rank on the same base (``mentor_rank``, ``mentee_rank``), each at
PEFT's scale ``alpha / its rank``. Adaptive mutual distillation, per batch,
with ``L_t``, ``L_s`` the mentor's and the mentee's token NLL::

  mentor: L_t + KL(sg(y_s) || y_t) / sg(L_t + L_s)
  mentee: L_s + KL(sg(y_t) || y_s) / sg(L_t + L_s)

(``sg``: stop-gradient; both trained jointly). ``y`` is ``distill``:
``'token'``, the target token's probability against all others at every
answer token, or ``'option'``, the softmax over the answer options.

Only the mentee's update leaves a client, as a truncated SVD of each factor
matrix (:func:`svd_compress`) keeping the fewest singular values whose
energy share reaches ``T(t)``, rising linearly from ``T_start`` at round 1
to ``T_end`` at the last. The server adds the weighted mean of the
decompressed updates to the mentee. Evaluated: ``mentor`` (the headline)
and ``mentee``. Choices: docs/methods.md, "Choices per method".

Server state ``{'mentee'}``; client state ``{'mentor' [N]}``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import ConfigError, need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.losses import bernoulli_kl, categorical_kl, mean_nll
from fdlora_jax.fl.server import validate_weighting, weighted_mean

PyTree = Any
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
  validate_weighting(c, NAME)


# ---------------------------------------------------------------------------
# SVD compression of an adapter update (FedKD)
# ---------------------------------------------------------------------------
def energy_rank(s: jax.Array, threshold) -> jax.Array:
  """The smallest ``k`` with ``sum(s[:k]**2) >= threshold * sum(s**2)``
  (``s`` descending on its last axis); 0 for an all-zero ``s``."""
  energy = s.astype(jnp.float32) ** 2
  cum = jnp.cumsum(energy, axis=-1)
  total = cum[..., -1:]
  # k = 1 + the number of prefixes still short of the threshold.
  k = jnp.sum(cum < threshold * total, axis=-1) + 1
  return jnp.where(total[..., 0] > 0, jnp.minimum(k, s.shape[-1]), 0)


def svd_compress(tree: PyTree, threshold) -> PyTree:
  """Each leaf ``[..., m, n]`` (e.g. an update of ``a [L, in, r]``) as its
  truncated SVD, one per matrix: ``{'u': [..., m, q], 's': [..., q],
  'v': [..., q, n]}`` with ``q = min(m, n)`` (static shapes), of which only
  the first :func:`energy_rank` ``k`` triplets are kept; the others are zero.

  The kept singular values are all > 0 (a zero one adds no energy, so the
  threshold was met before it), so ``k = count(s > 0)``.
  """
  def one(x):
    x = x.astype(jnp.float32)
    u, s, v = jnp.linalg.svd(x, full_matrices=False)
    k = energy_rank(s, threshold)
    keep = jnp.arange(s.shape[-1]) < k[..., None]                 # [..., q]
    return {'u': jnp.where(keep[..., None, :], u, 0.0),
            's': jnp.where(keep, s, 0.0),
            'v': jnp.where(keep[..., :, None], v, 0.0)}
  return jax.tree.map(one, tree)


def _is_svd(node) -> bool:
  return isinstance(node, dict) and set(node) == {'u', 's', 'v'}


def svd_decompress(compressed: PyTree) -> PyTree:
  """``u diag(s) v`` for every compressed leaf of :func:`svd_compress`."""
  return jax.tree.map(
      lambda c: jnp.einsum('...mq,...q,...qn->...mn', c['u'], c['s'], c['v']),
      compressed, is_leaf=_is_svd)


def svd_wire_bytes(compressed: PyTree) -> jax.Array:
  """Bytes of the kept triplets: ``k (m + n + 1)`` floats per matrix."""
  total = jnp.int32(0)
  for c in jax.tree.leaves(compressed, is_leaf=_is_svd):
    m, n = c['u'].shape[-2], c['v'].shape[-1]
    k = jnp.sum(c['s'] > 0)
    total = total + k.astype(jnp.int32) * (m + n + 1) * c['s'].dtype.itemsize
  return total


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
  (task_t, count), (task_s, _) = mean_nll(lp_t, mask), mean_nll(lp_s, mask)
  mean = lambda x, w: jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)
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
            svd_compress(delta, threshold))

  def server(state, uploads, weights, t):
    delta = weighted_mean(svd_decompress(uploads), weights)
    mentee = jax.tree.map(jnp.add, state['mentee'], delta)
    return {'mentee': mentee}, {'participants': jnp.sum(weights > 0)}

  common = dict(broadcast=lambda state, t: state['mentee'],
                start=lambda client, download: {'mentor': client['mentor'],
                                                'mentee': download},
                loss=loss, finish=finish, server=server,
                wire_bytes=svd_wire_bytes)
  phases = (s.local_phase(**common), s.round_phase(**common))

  def rows(state, client):
    scaled = own_scale({'mentor': client['mentor'],
                        'mentee': lora_lib.replicate(state['mentee'], n)})
    return {'mentor': scaled['mentor'], 'mentee': scaled['mentee']}

  weights = s.example_weights(m.weighting)
  return Method(NAME, init, phases, rows, headline='mentor',
                progress_rows=rows, client_weights=weights)
