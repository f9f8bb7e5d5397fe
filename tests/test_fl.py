"""Exact identities of the federated step on the tiny model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fdlora_jax import lora as lora_lib
from fdlora_jax.fl import (FDLoRA, init_opt_states, make_client_update,
                           make_clients_update, pseudo_gradient)
from fdlora_jax.fl import server as server_lib
from fdlora_jax.lora import LoraConfig
from fdlora_jax.model import PRESETS, Llama, init_params

CFG = PRESETS['tiny']
LCFG = LoraConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'down_proj'))
N, K, B, T = 3, 2, 2, 12


def fl_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      rounds=2, inner_lr=1.0, inner_warmup_steps=0, inner_schedule='constant',
      inner_optimizer='sgd', inner_b1=0.9, inner_b2=0.999,
      inner_weight_decay=0.0, outer_lr=1.0, outer_momentum=0.0, nesterov=True,
      dropout=False, stage1_chunk=4, global_init='mean_personal',
      reset_inner_opt=True, sync_every=float('inf')))
  c.update(kw)
  return c


def random_batches(step0, num_steps, seed=0):
  """[K, N, B, T] batches that are a pure function of the step."""
  out = {k: [] for k in ('tokens', 'loss_mask', 'attention_mask', 'valid')}
  for s in range(step0, step0 + num_steps):
    rng = np.random.default_rng(seed * 1000 + s)
    out['tokens'].append(rng.integers(0, CFG.vocab_size, (N, B, T)))
    lm = np.zeros((N, B, T), np.float32)
    lm[..., T // 2:] = 1
    out['loss_mask'].append(lm)
    out['attention_mask'].append(np.ones((N, B, T), np.int32))
    out['valid'].append(np.ones((N, B), np.float32))
  return {k: np.stack(v) for k, v in out.items()}


@pytest.fixture(scope='module')
def setup():
  model = Llama(CFG, LCFG)
  base = init_params(CFG, jax.random.key(0))
  fresh = lora_lib.init(model, jax.random.key(1))
  return model, base, fresh


def make_alg(setup, sample=random_batches, **kw):
  model, base, _ = setup
  return FDLoRA(model=model, base=base, fl_cfg=fl_cfg(**kw), num_clients=N,
                sample=sample, steps_per_round=np.full(N, K),
                stage1_steps=np.full(N, 3), client_weights=np.ones(N))


def test_vmapped_step_equals_separate_steps(setup):
  model, base, fresh = setup
  # eps=1e-3: Adam's g / (|g| + eps) would otherwise blow float reassociation
  # between batched and unbatched matmuls (1e-9 in g) up to lr-sized noise
  # where a gradient is ~0.
  opt = optax.adamw(1e-2, eps=1e-3, weight_decay=0.01)
  loras = lora_lib.stack([jax.tree.map(lambda x, i=i: x + 0.01 * i, fresh)
                          for i in range(N)])
  states = init_opt_states(opt, loras)
  batches = jax.tree.map(jnp.asarray, random_batches(0, K))
  rngs = jax.random.split(jax.random.key(3), N)
  many = make_clients_update(model, opt, donate=False)
  out_l, out_s, healthy, m = many(base, loras, states, batches, rngs)
  one = jax.jit(make_client_update(model, opt))
  # Updates are ~1e-2 per step; 1e-5 leaves room only for float
  # reassociation (seen up to 1.4e-6), not for a mixed-up client.
  for i in range(N):
    pick = lambda t: jax.tree.map(lambda x: x[i], t)
    l_i, s_i, h_i, m_i = one(base, pick(loras), pick(states),
                             jax.tree.map(lambda x: x[:, i], batches),
                             rngs[i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 pick(out_l), l_i)
    np.testing.assert_allclose(m.loss[i], m_i.loss, rtol=1e-5)
  b = out_l['layers']['self_attn']['q_proj']['b']
  assert float(jnp.abs(b[0] - b[1]).max()) > 1e-3  # clients really differ
  assert bool(jnp.all(healthy)) and m.loss.shape == (N, K)
  # The adapters moved.
  assert float(jnp.abs(out_l['layers']['self_attn']['q_proj']['b']).max()) > 0


def test_one_round_of_sgd_equals_fedavg(setup):
  """K plain SGD steps at lr 1, outer SGD lr 1, no momentum == FedAvg."""
  model, base, fresh = setup
  alg = make_alg(setup)
  state, _ = alg.stage1(fresh)
  g0 = state['global']
  new_state, metrics = alg.fl_round(state)
  # Recompute each client's K SGD steps separately, then average.
  one = jax.jit(make_client_update(model, optax.sgd(1.0)))
  batches = jax.tree.map(jnp.asarray, random_batches(3, K))
  rngs = alg._client_rngs(2, 1)
  finals = []
  for i in range(N):
    l_i, *_ = one(base, g0, optax.sgd(1.0).init(g0),
                  jax.tree.map(lambda x: x[:, i], batches), rngs[i])
    finals.append(l_i)
  fedavg = jax.tree.map(lambda *xs: sum(xs) / N, *finals)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               new_state['global'], fedavg)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       new_state['global'], g0)
  assert max(jax.tree.leaves(moved)) > 1e-3
  assert metrics['participants'] == N
  assert metrics['bytes_up_per_client'] == [lora_lib.num_bytes(g0)] * N


def test_stage1_global_is_mean_of_personal(setup):
  _, _, fresh = setup
  state, m = make_alg(setup).stage1(fresh)
  mean = jax.tree.map(lambda x: x.mean(0), state['personal'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               state['global'], mean)
  # Clients trained different adapters on different data.
  p = state['personal']['layers']['self_attn']['q_proj']['b']
  assert float(jnp.abs(p[0] - p[1]).max()) > 1e-4


def test_nesterov_outer_step_matches_hand_computation():
  g = {'w': jnp.array([1.0, 2.0])}
  uploads = {'w': jnp.array([[0.0, 2.0], [1.0, 0.0]])}
  delta = pseudo_gradient(g, uploads, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(delta['w'], [0.5, 1.0])
  outer = server_lib.outer_optimizer(0.1, 0.5, nesterov=True)
  update = server_lib.make_server_update(outer)
  g1, s1, _ = update(g, outer.init(g), uploads, jnp.array([1.0, 1.0]))
  # optax nesterov: m = d + mu m_prev; step = d + mu m  -> 1.5 d at step 1
  np.testing.assert_allclose(g1['w'], g['w'] - 0.1 * 1.5 * delta['w'],
                             rtol=1e-6)


def test_nonfinite_client_never_poisons_global(setup):
  _, _, fresh = setup

  def poisoned(step0, num_steps):
    b = random_batches(step0, num_steps)
    return b

  alg = make_alg(setup, sample=poisoned, inner_optimizer='sgd')
  state, _ = alg.stage1(fresh)
  # Corrupt client 1's data path: give it an infinite learning signal by
  # replacing the base's embedding row of its tokens with inf for one step.
  bad_base = jax.tree.map(lambda x: x, alg.base)
  emb = bad_base['embed_tokens']['embedding']
  b0 = random_batches(3, K)
  bad_tokens = np.unique(b0['tokens'][:, 1])
  other = np.unique(np.concatenate([b0['tokens'][:, 0].ravel(),
                                    b0['tokens'][:, 2].ravel()]))
  only_bad = np.setdiff1d(bad_tokens, other)
  assert only_bad.size
  bad_base['embed_tokens']['embedding'] = emb.at[only_bad].set(jnp.nan)
  alg.base = bad_base
  new_state, metrics = alg.fl_round(state)
  assert metrics['healthy'] == [True, False, True]
  assert metrics['nonfinite_steps'][1] >= 1 and metrics['participants'] == 2
  for leaf in jax.tree.leaves(new_state['global']):
    assert bool(jnp.all(jnp.isfinite(leaf)))


def test_server_never_receives_personalized_params(setup, monkeypatch):
  """Structural: what reaches the server is the uploaded global copies, and
  the new global adapter does not depend on the personalized adapters."""
  _, _, fresh = setup
  seen = []
  alg = make_alg(setup)
  real = alg.server_update

  def spy(global_lora, outer_state, uploads, weights):
    seen.append(jax.tree.map(np.asarray, (global_lora, uploads)))
    return real(global_lora, outer_state, uploads, weights)
  alg.server_update = spy

  state, _ = alg.stage1(fresh)
  marker = jax.tree.map(lambda x: jnp.full_like(x, 123.0), state['personal'])
  s_a, _ = alg.fl_round(state)
  s_b, _ = alg.fl_round(dict(state, personal=marker))
  jax.tree.map(np.testing.assert_array_equal, s_a['global'], s_b['global'])
  for g, uploads in seen:
    for leaf in jax.tree.leaves(uploads) + jax.tree.leaves(g):
      assert not np.any(leaf == 123.0)
  # The uploads have the global adapter's structure with a client axis.
  assert jax.tree.structure(seen[0][1]) == jax.tree.structure(
      state['global'])
  # With H = 1 the personalized adapters become the uploads.
  alg_sync = make_alg(setup, sync_every=1)
  s_c, _ = alg_sync.fl_round(dict(state, personal=marker))
  assert not np.any(np.asarray(
      s_c['personal']['layers']['self_attn']['q_proj']['a']) == 123.0)


def test_masked_steps_change_nothing(setup):
  model, base, fresh = setup
  opt = optax.adamw(1e-2)
  loras = lora_lib.replicate(fresh, N)
  states = init_opt_states(opt, loras)
  batches = random_batches(0, K)
  batches['valid'][:, 2] = 0  # client 2 has no data this round
  out_l, out_s, healthy, m = make_clients_update(model, opt, donate=False)(
      base, loras, states, jax.tree.map(jnp.asarray, batches),
      jax.random.split(jax.random.key(0), N))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[2], b[2]),
               out_l, loras)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[2], b[2]),
               out_s, states)
  assert bool(healthy[2]) and float(m.tokens[2].sum()) == 0
