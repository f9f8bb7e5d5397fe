"""FedDPA (Yang, Long, Shen, Jiang and Blumenstein, "Dual-Personalizing
Adapter for Federated Foundation Models", NeurIPS 2024), its iterative form
FedDPA-T.

Every client holds a global adapter, averaged by the server as in FedAvg,
and a local adapter that never leaves it. The two are applied together: the
model's output is ``W x + w_g delta_g x + w_l delta_l x`` (the adapters'
outputs mixed, :func:`fdlora_jax.lora.mixed`, not their factors).

Training. A first ``local`` phase trains copies of a fresh global adapter for
the stage-1 steps and averages them (the reference code's first round trains
the global adapter alone). Then every round each client first trains its
local adapter for K steps with the downloaded global adapter frozen beside it
(``w_l = local_weight``, ``w_g = 1 - local_weight``), then trains its copy of
the global adapter for K steps (alone, or with the local one frozen at 0.5 /
0.5: ``joint_global``) and uploads that copy; the server sets the global
adapter to the weighted mean. One optimizer over both adapters, fresh every
round.

Inference (the instance-wise dynamic weighting). A test instance ``x`` gets
``w_g(x) = max_weight * mean_j cos(e(x), e(x_j))`` and ``w_l = 1 - w_g``,
where ``e`` is the final hidden state at the prompt's last token under the
local adapter and ``x_j`` are the client's few-shot training instances
(``data.few_shot``). Rows: ``dynamic`` (that rule, the headline), ``fixed``
(``w_g = fixed_weight`` for every instance), ``global`` and ``local``.
Choices: docs/methods.md, "Choices per method".

Server state ``{'global'}``; client state ``{'local' [N], 'k' [N]}`` (``k``:
the client's local steps per round, where the global adapter's begin).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fdlora_jax import lora as lora_lib
from fdlora_jax.errors import need
from fdlora_jax.fl.api import Method, Setup
from fdlora_jax.fl.losses import token_nll
from fdlora_jax.fl.privacy import downloaded
from fdlora_jax.fl.server import mean_step, validate_weighting
from fdlora_jax.model import hidden_at, prompt_end

NAME = 'feddpa'
# Fields a resumed run may change: the inference weights act after the last
# checkpoint.
RESUMABLE = ('feddpa.max_weight', 'feddpa.fixed_weight')


def config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.local_weight = 0.5      # reference code: local_weight 0.5
  c.joint_global = False    # reference code: glocal False (global alone)
  c.max_weight = 0.5        # reference README: max_weight 0.5
  c.fixed_weight = 0.5      # reference code: weight 0.5 without auto
  c.weighting = 'examples'  # server mean, as the reference's FedAvg
  return c


def validate(c) -> None:
  m = c.feddpa
  for name in ('local_weight', 'fixed_weight'):
    need(0 <= m[name] <= 1, f'feddpa.{name}', m[name], 'must be in [0, 1]')
  need(0 < m.max_weight <= 1, 'feddpa.max_weight', m.max_weight,
       'must be in (0, 1]')
  need(c.data.few_shot >= 1, 'data.few_shot', c.data.few_shot,
       "FedDPA's instance weights compare each test instance with the "
       "client's few-shot training instances: needs >= 1")
  validate_weighting(c, NAME)


def instance_weights(e: jax.Array, refs: jax.Array, valid: jax.Array,
                     max_weight: float) -> jax.Array:
  """``[w_global, w_local]`` of one test instance: ``w_global = max_weight *
  mean_j cos(e, refs[j])`` over the valid references (0 with none), as
  ``torch.cosine_similarity`` (norms' product clamped at 1e-8)."""
  dots = refs @ e
  norms = jnp.maximum(jnp.linalg.norm(refs, axis=-1) * jnp.linalg.norm(e),
                      1e-8)
  valid = valid.astype(jnp.float32)
  mean = jnp.sum(valid * dots / norms) / jnp.maximum(valid.sum(), 1.0)
  w = max_weight * mean
  return jnp.stack([w, 1.0 - w])


def build(s: Setup) -> Method:
  c, m, n = s.config, s.config.feddpa, s.num_clients
  k = s.steps(c.fl.inner_steps, c.fl.inner_unit)            # [N] K per client
  local_w = float(m.local_weight)
  late_w = (0.5, 0.5) if m.joint_global else (0.0, 1.0)     # (local, global)

  def init(key):
    fresh = s.lora_init(key)
    return ({'global': fresh},
            {'local': lora_lib.replicate(fresh, n),
             'k': jnp.asarray(k, jnp.float32)})

  def server(state, uploads, weights, t):
    g, metrics = mean_step(state['global'], uploads, weights)
    return {'global': g}, metrics

  # -- rounds: K steps of the local adapter, then K of the global one -------
  def start(client, download):
    return {'local': client['local'], 'global': download, 'k': client['k']}

  def loss(fwd, train, download, batch, rng):
    on_local = fwd.step < train['k']
    w = jnp.stack([jnp.where(on_local, local_w, late_w[0]),
                   jnp.where(on_local, 1.0 - local_w, late_w[1])])
    both = lora_lib.mixed((train['local'], train['global']), w)
    return fwd.nll(both, batch, rng)

  def trainable(train, i):
    on_local = i < train['k']
    return {'local': jax.tree.map(lambda x: on_local, train['local']),
            'global': jax.tree.map(lambda x: ~on_local, train['global']),
            'k': jnp.array(False)}

  def finish(client, train, download, t):
    return dict(client, local=train['local']), train['global']

  broadcast = lambda state, t: state['global']
  phases = (
      s.local_phase(broadcast=broadcast, start=lambda client, download:
                    download, loss=token_nll,
                    finish=lambda client, train, download, t: (client, train),
                    server=server, dp_reference=downloaded),
      s.round_phase(broadcast=broadcast, start=start, loss=loss,
                    trainable=trainable, finish=finish, server=server,
                    dp_reference=downloaded, steps=2 * k, reset_opt=True),
  )

  # -- inference -------------------------------------------------------------
  max_w = float(m.max_weight)

  def weigh(e, context):
    return instance_weights(e, context['refs'], context['valid'], max_w)

  @jax.jit
  def references(base, local, shots):
    """``[N, F, H]`` hidden states of every client's few-shot instances at
    their prompts' last token, under its local adapter (the base an
    argument, not a constant baked into the compiled program)."""
    return jax.vmap(lambda lo, tok, am, lm: hidden_at(
        s.model, {'params': base, 'lora': lo}, tok, am, prompt_end(lm)))(
            local, shots['tokens'], shots['attention_mask'],
            shots['loss_mask'])

  def rows(state, client):
    local, global_n = client['local'], lora_lib.replicate(state['global'], n)
    valid = jnp.asarray(s.few_shot['loss_mask']).sum(-1) > 0   # [N, F]
    dynamic = lora_lib.InstanceMix(
        parts=(global_n, local), probe=local,
        context={'refs': references(s.base, local, s.few_shot),
                 'valid': valid}, weigh=weigh)
    fixed = lora_lib.mixed((global_n, local),
                           [m.fixed_weight, 1.0 - m.fixed_weight])
    return {'dynamic': dynamic, 'fixed': fixed, 'global': global_n,
            'local': local}

  return Method(
      NAME, init, phases, rows, headline='dynamic',
      progress_rows=lambda state, client: {
          'global': lora_lib.replicate(state['global'], n)},
      client_weights=s.example_weights(m.weighting), resumable=RESUMABLE)
